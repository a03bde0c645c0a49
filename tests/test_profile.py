"""``fvlm profile`` on the shipped 7B configs prints the papers' efficiency figures; the configs are
the real architectures (built on the meta device); budgets map to selector parameters."""
from __future__ import annotations

import json

import pytest

import fvlm
from fvlm import cli
from fvlm.errors import FVLMError
from fvlm.metrics import MIB
from fvlm.profiling import analytic, report
from fvlm.profiling.arch import build_meta_model, load_architecture, model_info, shipped_models
from fvlm.profiling.meta import meta_check
from fvlm.selectors.base import Stage


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line, no wrapped numbers


def _profile(capsys, *argv) -> tuple[int, str]:
    code = cli.main(["profile", *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def _row(out: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is ``label``."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in:\n{out}")


def test_profile_prints_the_papers_llava15_figures(capsys, tmp_path):
    code, out = _profile(capsys, "--model", "llava-1.5-7b", "--schedule", "1:218,10:128,15:54",
                         "--schedule", "1:92,10:54,15:22", "--json", str(tmp_path / "p.json"))
    assert code == 0
    assert "KV cache per token: 0.5 MiB" in out
    keep = _row(out, "keep_all")
    assert keep[2:5] == ["576", "576.00", "2.986"]  # LLM input, layer average, paper TFLOPs
    assert keep[8] == "318.0"  # 636 tokens x 0.5 MiB: the PIO-FVLM table's KV figure
    avg128 = _row(out, "1:218,10:128,15:54")
    avg64 = _row(out, "1:92,10:54,15:22")
    assert avg128[3] == "128.00" and avg64[3] == "64.00"
    assert avg64[8] == "62.0" and avg64[9] == "5.13x"  # the table's 318 -> 62 MB (5.13x)
    assert "paper convention" in out and "full convention" in out

    data = json.loads((tmp_path / "p.json").read_text())
    rows = {r["label"]: r for r in data["rows"]}
    assert data["kv_bytes_per_token"] == MIB // 2
    assert rows["keep_all"]["paper_flops"] == 2_986_076_012_544
    assert rows["1:218,10:128,15:54"]["layer_average"] == 128.0
    assert rows["1:92,10:54,15:22"]["layer_average"] == 64.0
    assert rows["1:92,10:54,15:22"]["visual_per_layer"][:2] == [576, 92]
    assert rows["1:92,10:54,15:22"]["kv_bytes"] == 62 * MIB
    full = rows["keep_all"]["full_flops"]
    assert full["total"] == full["vision"] + full["projector"] + full["llm"] + full["lm_head"] + full["overhead"]


def test_profile_prints_the_papers_llava_next_figure(capsys):
    code, out = _profile(capsys, "--model", "llava-next-7b", "--text-tokens", "0")
    assert code == 0
    keep = _row(out, "keep_all")
    assert keep[2] == "2880" and keep[4] == "16.67"
    assert keep[8] == "1440.0"  # 2,880 x 0.5 MiB
    assert "KV cache per token: 0.5 MiB" in out


def test_profile_qwen_gqa_kv(capsys):
    code, out = _profile(capsys, "--model", "qwen2.5-vl-7b", "--selector", "random", "--budget", "64")
    assert code == 0
    assert "KV cache per token: 0.0546875 MiB" in out  # 28 layers x 2 x 4 KV heads x 128 x 2 B
    row = _row(out, "random @64")
    assert row[2:4] == ["64", "64.00"]


def test_profile_selectors_at_budgets(capsys, tmp_path):
    code, out = _profile(capsys, "--selector", "random", "--selector", "uniform", "--selector", "keep_all",
                         "--budget", "192", "64", "--set", "layer=input", "--json", str(tmp_path / "s.json"))
    assert code == 0
    for label in ("random @192", "random @64", "uniform @192", "uniform @64"):
        assert _row(out, label)[3] == label.split("@")[1] + ".00"
    assert "skipping keep_all" in out  # no budget parameter: said so, the others still run
    data = json.loads((tmp_path / "s.json").read_text())
    assert [r["params"] for r in data["rows"] if r["selector"] == "random"] == [
        {"layer": "input", "keep": 192}, {"layer": "input", "keep": 64}]


def test_budget_search_for_an_in_llm_count():
    """A count kept after K layers is solved for the layer average (FastV: R = (32*64 - 2*576) / 30)."""
    arch = load_architecture("llava-1.5-7b")
    selector, kwargs, stages = analytic.selector_for_average("random", 64, arch, {"layer": 2})
    assert kwargs == {"layer": 2, "keep": 30} and stages == [Stage(2, 30)]
    row = analytic.profile_selector(arch, "random", budget=64, params={"layer": 2})
    assert row.layer_average == pytest.approx((2 * 576 + 30 * 30) / 32)
    if "fastv" in fvlm.list_selectors():
        assert analytic.selector_for_average("fastv", 64, arch)[1]["keep"] == 30


def test_profile_rows_analytic():
    arch = load_architecture("llava-1.5-7b")
    ref = analytic.keep_all_row(arch)
    row = analytic.profile_stages(arch, analytic.parse_schedule("vision:96,16:32"), label="enc")
    assert row.counts.llm_input == 96 and row.layer_average == 64.0
    assert row.full.vision == ref.full.vision  # the vision tower always sees every patch
    assert row.kv_bytes == 62 * MIB
    assert analytic.format_schedule([Stage("input", 0.25)], 576) == "input:144"
    assert report.sig(2.98607) == "2.986" and report.sig(16.6698) == "16.67" and report.sig(0.32573) == "0.3257"
    with pytest.raises(FVLMError, match="WHERE:KEEP"):
        analytic.parse_schedule("1-218")
    with pytest.raises(FVLMError, match="bad schedule entry"):
        analytic.parse_schedule("later:5")


def test_profile_errors(capsys):
    code, out = _profile(capsys, "--model", "llava-99b")
    assert code == 2 and "unknown model 'llava-99b'" in out  # usage errors exit 2
    code, out = _profile(capsys, "--budget", "64")
    assert code == 2 and "--budget needs at least one --selector" in out
    code, out = _profile(capsys, "--schedule", "1:700")
    assert code == 2 and "keeps 700 visual tokens but only 576 remain" in out


def test_profile_refuses_a_layer_average_out_of_a_selectors_reach(capsys):
    code, out = _profile(capsys, "--selector", "fastv", "--budget", "10")  # layers 0-1 alone average 36
    assert code == 2 and "cannot reach a layer average of 10 through 'keep': the nearest it gets is 36.9" in out
    code, out = _profile(capsys, "--selector", "random", "--budget", "0")
    assert code == 2 and "outside (0, 576]" in out


def test_profile_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, out = _profile(capsys, "--schedule", "1:218,10:128,15:54", "--selector", "random", "--budget", "128", "64",
                         "--plot", str(tmp_path / "p.png"))
    assert code == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    arch = load_architecture("llava-1.5-7b")
    with pytest.raises(FVLMError, match=r"fvlm\[plot\]"):
        report.plot_profile(arch, [analytic.keep_all_row(arch)], tmp_path / "x.png")


def test_shipped_configs_are_the_real_architectures():
    """Built on the meta device (no weights, no memory): parameter counts of the released models, and
    ModelInfo from the registered adapter as at run time."""
    assert {"llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "llava-onevision-7b"} <= set(shipped_models())
    params = {}
    for name in ("llava-1.5-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "llava-onevision-7b"):
        model = build_meta_model(load_architecture(name))
        params[name] = sum(p.numel() for p in model.parameters())
        assert all(p.device.type == "meta" for p in model.parameters())
    assert round(params["llava-1.5-7b"] / 1e9, 2) == 7.06
    assert round(params["qwen2.5-vl-7b"] / 1e9, 2) == 8.29
    assert round(params["qwen3-vl-8b"] / 1e9, 2) == 8.77  # the published parameter counts
    assert round(params["llava-onevision-7b"] / 1e9, 2) == 8.03
    info = model_info(load_architecture("qwen3-vl-8b"))
    assert (info.family, info.num_layers, info.num_kv_heads, info.head_dim, info.mrope) == ("qwen3_vl", 36, 8, 128, True)
    info = model_info(load_architecture("qwen2.5-vl-7b"))
    assert (info.family, info.num_layers, info.num_kv_heads, info.head_dim, info.mrope) == ("qwen2_5_vl", 28, 4, 128, True)


@pytest.mark.parametrize("name", ["llava-1.5-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "llava-onevision-7b"])
def test_meta_device_check_matches_the_analytic_counts(name):
    """The real 7B transformers model on the meta device: torch's FLOP formulas and the real
    DynamicCache agree exactly with the full-convention count and the analytic KV bytes."""
    result = meta_check(load_architecture(name))
    for key in ("llm", "kv_bytes", "vision"):
        if result[key] is not None:
            measured, analytic_value = result[key]
            assert measured == analytic_value, key
    kv = {"llava-1.5-7b": 318 * MIB, "qwen2.5-vl-7b": 636 * 57344,  # bytes per token x tokens
          "qwen3-vl-8b": 636 * 36 * 2 * 8 * 128 * 2, "llava-onevision-7b": 3759 * 28 * 2 * 4 * 128 * 2}
    assert result["kv_bytes"][0] == kv[name]
    assert (result["vision"] is None) == name.startswith("qwen")
