"""Each method's default (paper-recipe) settings pick what its authors' code picks.

A small random LLaVA with LLaVA-1.5's layout (576 visual tokens at offset 35, 17 decoder layers,
SDPA) runs a left-padded batch of two prompts under ``fvlm.prune``; every stage's selection of each
sample is compared with an independent single-sample reference written from the specs
(``authors_reference.py``: plain loops, eager attention maps, no fvlm code), index for index and
merged vectors to float tolerance, at 64 / 128 / 192. At 128 fvlm also runs each sample alone on
the eager model (batch == per sample, SDPA == eager). The recipes of the paper tables are checked
for the authors' settings on the real architectures (meta-device models, no weights).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import authors_reference as ref
import fvlm
from fvlm.commands import run as run_cmd
from fvlm.profiling.arch import build_meta_model, load_architecture
from fvlm.selectors.dart import DART
from fvlm.selectors.diversity import DivPrune, VisionZip
from fvlm.selectors.fastv import FastV
from fvlm.selectors.pio_fvlm import PIOFVLM
from fvlm.selectors.sparsevlm import SparseVLM
from fvlm.testing import IMAGE_ID, llava15_layout_inputs, llava15_layout_model, llm_input_embeddings, sample_inputs

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BUDGETS = (64, 128, 192)
LAYOUTS = ((35, 40), (30, 28))  # (offset of the image, text after it): sample 1 is left-padded
PIO_COUNTS = {64: [92, 54, 22], 128: [218, 128, 54], 192: [344, 202, 86]}  # after layers 1, 10, 15
VISIONZIP = {64: (54, 10), 128: (108, 20), 192: (162, 30)}


@pytest.fixture(scope="module")
def setup():
    """Models (SDPA and eager, same weights), the padded batch, and per sample its unpadded inputs,
    LLM input embeddings (from the eager model, no pruning) and visual positions."""
    sdpa, eager = llava15_layout_model(), llava15_layout_model(attn_implementation="eager")
    batch = llava15_layout_inputs(LAYOUTS)
    samples = []
    for b in range(len(LAYOUTS)):
        single = sample_inputs(batch, b)
        vis = (single["input_ids"][0] == IMAGE_ID).nonzero().flatten().tolist()
        samples.append({"inputs": single, "embeds": llm_input_embeddings(eager, single)[0], "vis": vis})
    return {"sdpa": sdpa, "eager": eager, "batch": batch, "samples": samples}


def run(model, selector, inputs, **prune_kwargs):
    """Run ``selector`` on ``inputs``; return every stage's selection (indices per sample, embeddings)
    and the session."""
    seen, inner = [], selector.select

    def recording(ctx):
        out = inner(ctx)
        seen.append(out if isinstance(out, fvlm.Selection) else fvlm.Selection(out))
        return out

    selector.select = recording
    with fvlm.prune(model, selector, **prune_kwargs) as session, torch.no_grad():
        model(**inputs)
    return seen, session


def picks(selection, b) -> list[int]:
    return [i for i in selection.indices[b].tolist() if i >= 0]


def merged(selection, b, start: int) -> torch.Tensor:
    rows = [j for j, i in enumerate(selection.indices[b].tolist()) if i >= 0]
    return selection.embeddings[b, rows[start:]]


def check_single(setup, make, batch_stages):
    """fvlm on each sample alone, eager model: the same picks as in the padded SDPA batch."""
    for b, sample in enumerate(setup["samples"]):
        stages, _ = run(setup["eager"], make(), sample["inputs"])
        assert [picks(st, 0) for st in stages] == [picks(st, b) for st in batch_stages], f"sample {b}"


# ------------------------------------------------------------------------------ the methods
@pytest.mark.parametrize("budget", BUDGETS)
def test_fastv(setup, budget):
    stages, session = run(setup["sdpa"], FastV(k=2, keep=budget), setup["batch"])
    assert session.positions == "original"
    for b, s in enumerate(setup["samples"]):
        assert [picks(stages[0], b)] == ref.fastv(setup["eager"], s["embeds"], s["vis"], 2, budget)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("recycle", [True, False])
def test_sparsevlm(setup, budget, recycle):
    stages, session = run(setup["sdpa"], SparseVLM(budget=budget, recycle=recycle), setup["batch"])
    assert session.positions == "compact" and [st.where for st in session.schedule] == ["input", 3, 7, 16]
    for b, s in enumerate(setup["samples"]):
        expected = ref.sparsevlm(setup["eager"], s["embeds"], s["vis"], budget, recycle)
        assert len(expected) == len(stages) - 1 == 3
        for stage, (kept, centres, vectors) in zip(stages[1:], expected):
            assert picks(stage, b) == kept + centres  # kept in order, then the merged tokens' carriers
            if recycle:
                torch.testing.assert_close(merged(stage, b, len(kept)), torch.stack(vectors), atol=2e-5, rtol=1e-4)
    trace = session.trace
    if recycle and budget == 192:  # 576 -> 309 -> 204 -> 113: the authors' 206.50, their log's 192.03
        assert trace.layer_average[0] == (3 * 576 + 4 * 309 + 9 * 204 + 1 * 113) / 17
        assert trace.visual_per_layer[0][3:] == [309] * 4 + [204] * 9 + [113]
    if budget == 128:
        check_single(setup, lambda: SparseVLM(budget=budget, recycle=recycle), stages)


@pytest.mark.parametrize("budget", BUDGETS)
def test_sparsevlm_plus(setup, budget):
    stages, session = run(setup["sdpa"], SparseVLM(budget=budget, version="v2.0"), setup["batch"])
    assert session.positions == "original"
    for b, s in enumerate(setup["samples"]):
        expected = ref.sparsevlm(setup["eager"], s["embeds"], s["vis"], budget, recycle=False, version="2.0")
        assert [picks(stage, b) for stage in stages[1:]] == [kept for kept, _, _ in expected]


@pytest.mark.parametrize("budget", BUDGETS)
def test_dart(setup, budget):
    make = lambda: DART(layer=2, keep=budget, exact_budget=False)  # noqa: E731
    stages, session = run(setup["sdpa"], make(), setup["batch"])
    assert session.positions == "original"
    expected = [ref.dart(setup["eager"], s["embeds"], s["vis"], budget) for s in setup["samples"]]
    for b in range(2):
        assert [picks(stages[0], b)] == expected[b]
        assert len(picks(stages[0], b)) == 4 + 8 * (budget // 8)
    if budget == 128:
        check_single(setup, make, stages)
        # the position order is a named option and picks differently
        by_position = ref.dart(setup["eager"], setup["samples"][0]["embeds"], setup["samples"][0]["vis"], budget,
                               order="position")
        stages, _ = run(setup["sdpa"], DART(layer=2, keep=budget, exact_budget=False, pivot_order="position"),
                        setup["batch"])
        assert [picks(stages[0], 0)] == by_position != expected[0]


@pytest.mark.parametrize("budget", BUDGETS)
def test_visionzip_llm_input(setup, budget):
    """The LLM sees [prefix, proj(CLS), dominant, contextual, text] with contiguous positions."""
    dominant, contextual = VISIONZIP[budget]
    model = setup["sdpa"]
    seen = {}
    with fvlm.prune(model, VisionZip(dominant, contextual)) as session, torch.no_grad():
        handle = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
        try:
            model(**setup["batch"])
        finally:
            handle.remove()
    assert session.positions == "compact"
    valid = seen["attention_mask"].bool()
    for b, s in enumerate(setup["samples"]):
        with torch.no_grad():
            image = ref.visionzip(setup["eager"], s["inputs"]["pixel_values"][0], dominant, contextual)
        embeds, vis = s["embeds"], s["vis"]
        expected = torch.cat([embeds[: vis[0]], image, embeds[vis[-1] + 1:]])
        got = seen["inputs_embeds"][b, valid[b]]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        positions = seen["position_ids"][0 if seen["position_ids"].shape[0] == 1 else b][valid[b]]
        assert (positions - positions[0]).tolist() == list(range(len(expected)))


@pytest.mark.parametrize("budget", BUDGETS)
def test_divprune(setup, budget):
    stages, session = run(setup["sdpa"], DivPrune(keep=budget), setup["batch"])
    assert session.positions == "compact"
    for b, s in enumerate(setup["samples"]):
        assert [picks(stages[0], b)] == ref.divprune(s["embeds"], s["vis"], budget)


@pytest.mark.parametrize("budget", BUDGETS)
def test_pio_fvlm(setup, budget):
    make = lambda: PIOFVLM(layers=[1, 10, 15], keep=PIO_COUNTS[budget])  # noqa: E731
    stages, session = run(setup["sdpa"], make(), setup["batch"])
    assert session.positions == "compact"
    expected = [ref.pio_fvlm(setup["eager"], s["embeds"], s["vis"], [1, 10, 15], PIO_COUNTS[budget])
                for s in setup["samples"]]
    for b in range(2):
        assert [picks(stage, b) for stage in stages] == expected[b]
    if budget == 128:
        check_single(setup, make, stages)


# ---------------------------------------------------------------------------- the recipes
_ARCH: dict = {}


def meta_session(arch_name: str, selector, positions):
    """A session on the real architecture (meta device): its schedule and resolved positions."""
    if arch_name not in _ARCH:
        _ARCH[arch_name] = build_meta_model(load_architecture(arch_name))
    return fvlm.PruningSession(_ARCH[arch_name], selector, positions=positions)


def chain(session, original: int, images: int = 1) -> list[int]:
    """Visual tokens after each stage for one prompt of ``original`` visual tokens."""
    out, n = [], torch.tensor([original])
    for stage in session.schedule:
        n = session.selector.keep_count(stage, n, torch.tensor([original]), torch.tensor([images]))
        out.append(int(n))
    return out


def authors_settings(method: str, budget: int) -> dict:
    """The authors' settings of each table cell (written from the specs)."""
    if method == "fastv":
        return {"positions": "original", "stages": [(2, budget)], "chain": [budget]}
    if method == "sparsevlm":
        counts = ref.V15[budget]
        recycled = {192: [309, 204, 113], 128: [312, 117, 39], 64: [82, 32, 18]}[budget]
        return {"positions": "compact", "stages": [("input", 1.0), (3, counts[0]), (7, counts[1]), (16, counts[2])],
                "chain": [576] + recycled}
    if method == "dart":
        return {"positions": "original", "stages": [(2, 4 + 8 * (budget // 8))], "chain": [4 + 8 * (budget // 8)]}
    if method == "visionzip":
        return {"positions": "compact", "stages": [("vision", budget)], "chain": [budget]}
    if method == "divprune":
        return {"positions": "compact", "stages": [("input", budget)], "chain": [budget]}
    if method == "pio_fvlm":
        return {"positions": "compact", "layers": [1, 10, 15], "chain": PIO_COUNTS[budget]}
    if method == "pio_fvlm_encoder":  # the encoder keeps 1.5x, then PIO-FVLM 0.5x the average after layer 16
        return {"positions": "compact", "layers": [16], "chain": [budget * 3 // 2, budget // 2]}
    if method == "cdpruner":  # "Retain k tokens" before the LLM (CDPruner's LLaVA code renumbers)
        return {"positions": "compact", "stages": [("vision", budget)], "chain": [budget]}
    if method == "vscan":  # 1.5x the average from the encoder, 0.5x after layer 16 (64: the authors' 96 / 32)
        return {"positions": "compact", "stages": [("vision", budget * 3 // 2), (16, budget // 2)],
                "chain": [budget * 3 // 2, budget // 2]}
    if method == "pool":  # a control: the file names the count (2x2 -> 144, 3x3 -> 64)
        return {"positions": "compact", "stages": [("input", budget)], "chain": [budget]}
    raise KeyError(method)


def _cells():
    return sorted(p.stem for p in (RECIPES / "llava-1.5-7b").glob("*.yaml") if p.stem != "vanilla")


@pytest.mark.parametrize("cell", _cells())
def test_llava_recipe_uses_the_authors_settings(cell):
    method, budget = cell.rsplit("-", 1)
    _, cfg, selector, _ = run_cmd.parse(["-c", str(RECIPES / "llava-1.5-7b" / f"{cell}.yaml")])
    session = meta_session("llava-1.5-7b", selector, cfg.model.positions)
    want = authors_settings(method, int(budget))
    assert cfg.model.positions is None and session.positions == want["positions"]
    assert chain(session, 576) == want["chain"]
    if "stages" in want:
        assert [(s.where, s.keep) for s in session.schedule] == want["stages"]
    pio = [p for p in getattr(selector, "selectors", [selector]) if isinstance(p, PIOFVLM)]
    if "layers" in want:
        (pio,) = pio
        assert (pio.layers, pio.proxy_block, pio.proxy_head, pio.k_last, pio.tau, pio.nms) == (
            want["layers"], "next", "lm_head", 4, 0.8, True)
    if method == "sparsevlm":
        assert (selector.version, selector.recycle) == ("v1.5", True)
    if method == "dart":
        assert (selector.pivot_order, selector.pivots_visual, selector.pivots_text) == ("authors", 4, 4)


def test_qwen_recipe_uses_the_authors_qwen_proxy():
    path = RECIPES / "qwen2.5-vl-7b" / "pio_fvlm_encoder-11.yaml"
    parts = yaml.safe_load(path.read_text())["model"]["selector"]["args"]["selectors"]
    (spec,) = [p for p in parts if p["name"] == "pio_fvlm"]
    pio = fvlm.create_selector("pio_fvlm", **spec["args"])
    session = meta_session("qwen2.5-vl-7b", pio, None)
    assert session.positions == "original"  # their Qwen code keeps the M-RoPE ids (PIO-FVLM declares compact)
    assert (pio.layers, pio.proxy_block, pio.proxy_head, pio.keep_ratio) == ([14], "current", "embed", [0.333])
    assert chain(session, 216) == [71]  # int(0.333 * 216) after the encoder's 16.7% of 1,296
    if "vscan" in fvlm.list_selectors():
        _, cfg, selector, _ = run_cmd.parse(["-c", str(path)])
        assert meta_session("qwen2.5-vl-7b", selector, cfg.model.positions).positions == "original"
