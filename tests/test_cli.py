"""The ``fvlm`` command in a subprocess, as a user runs it: exit codes and one-line messages.

Exit codes (docs/reference/cli.md): 0 every requested sample answered, 1 an error stopped the
command, 2 bad command line / recipe / selector argument / data (nothing ran), 3 finished with
samples (or panels) left without an answer, 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fvlm.metrics.scoring import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
QUIET = ["--trainer.enable_progress_bar", "false"]


def env() -> dict:
    out = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", COLUMNS="200")
    out.pop("LOCAL_RANK", None)
    return out


def fvlm(*argv, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """``fvlm ARGV...`` through the console entry point (``fvlm.cli:main``) in a fresh process."""
    cmd = [sys.executable, "-c", "import sys; from fvlm.cli import main; sys.exit(main())", *map(str, argv)]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def one_line(text: str) -> str:
    return " ".join(text.split())


def write_data(folder: Path, n: int = 3, image: str = "img.png", make_image: bool = True) -> Path:
    """``n`` VQA records that all show ``image`` (written as a small PNG unless ``make_image`` is false)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if make_image:
        Image.new("RGB", (40, 32), (200, 30, 90)).save(folder / image)
    records = [{"id": f"q{i}", "image": image, "question": f"Question {i}?", "answers": ["yes"]} for i in range(n)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder / "data.jsonl"


# -- the supported families ---------------------------------------------------------------------
def test_list_adapters_shows_every_supported_family():
    from fvlm.registry import get_adapter_class, list_adapters

    proc = fvlm("list", "--adapters")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name in list_adapters():
        about = get_adapter_class(name).about
        row = next(line for line in lines if line.startswith(f"│ {name} "))
        assert about["classes"][name] in row and about["checkpoints"][name][:30] in row and "ok" in row, row
    assert len(list_adapters()) >= 10  # llava ... qwen3_vl, llava_onevision, internvl, mistral3, idefics3, smolvlm


# -- 1: beams and several returns on Qwen (and every family) -------------------------------------
def test_run_with_beams_and_several_returns_on_qwen(tmp_path):
    out = tmp_path / "run"
    proc = fvlm("run", "-c", TINY / "qwen2_vl-dart.yaml", "--model.generation.num_beams", 2,
                "--model.generation.extra", "{num_return_sequences: 2}", "--output", out, *QUIET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(out / "predictions.jsonl")
    ids = [json.loads(line)["id"] for line in (TINY / "data/vqa.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ids and not any(r.get("error") for r in records)
    assert all(len(r["returns"]) == 2 and r["answer"] == r["returns"][0] for r in records)
    assert json.loads((out / "summary.json").read_text())["samples"] == len(ids)


# -- 2: exit codes tell the truth; errors are retried -----------------------------------------------
def test_run_where_every_sample_failed_is_not_a_success_and_a_rerun_retries(tmp_path):
    data = write_data(tmp_path / "d", n=3, make_image=False)  # every image is missing
    out = tmp_path / "run"
    argv = ["run", "-c", TINY / "llava-reference.yaml", "--data.path", data, "--output", out, *QUIET]
    first = fvlm(*argv)
    assert first.returncode == 3, first.stderr[-2000:]
    assert "3 of 3 requested samples have no answer (3 errors, 0 missing)" in one_line(first.stderr)
    from PIL import Image

    Image.new("RGB", (40, 32), (200, 30, 90)).save(tmp_path / "d" / "img.png")  # the fix
    second = fvlm(*argv)  # error lines are retried by default
    assert second.returncode == 0, second.stderr[-2000:]
    records = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in records] == ["q0", "q1", "q2"] and not any(r.get("error") for r in records)
    assert all(isinstance(r["answer"], str) for r in records)


def test_run_that_keeps_error_lines_says_so(tmp_path):
    data = write_data(tmp_path / "d", n=2, make_image=False)
    out = tmp_path / "run"
    argv = ["run", "-c", TINY / "llava-reference.yaml", "--data.path", data, "--output", out, *QUIET]
    assert fvlm(*argv).returncode == 3
    kept = fvlm(*argv, "--retry_errors", "false")
    assert kept.returncode == 3
    assert "keeping the error lines of 2 samples from an earlier run as final (--retry_errors false)" in one_line(kept.stderr)


# -- 3: checkpoint folders resolve like data paths; a missing one is named before anything loads ----
def _tiny_checkpoint(folder: Path) -> Path:
    from fvlm.tiny_backbones import tiny_backbone

    model, processor = tiny_backbone("llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_relative_checkpoint_folder_resolves_next_to_the_recipe(tmp_path):
    recipes = tmp_path / "recipes"
    _tiny_checkpoint(recipes / "ckpt")
    data = write_data(recipes / "data", n=2)
    recipe = recipes / "local.yaml"
    recipe.write_text(f"model:\n  backbone:\n    path: ckpt\n    dtype: float32\ndata:\n  path: data/{data.name}\n"
                      "trainer:\n  accelerator: cpu\n  devices: 1\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ok = fvlm("run", "-c", recipe, "--output", tmp_path / "out", *QUIET, cwd=elsewhere)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "out" / "predictions.jsonl")) == 2
    missing = fvlm("run", "-c", recipe, "--model.backbone.path", "ckpt2", "--output", tmp_path / "out2", *QUIET,
                   cwd=elsewhere)
    assert missing.returncode == 2
    message = one_line(missing.stderr)
    assert f"no such checkpoint folder: ckpt2 (looked in {elsewhere / 'ckpt2'})" in message
    recipe.write_text(recipe.read_text().replace("path: ckpt\n", "path: ckpt3\n"))
    missing = fvlm("run", "-c", recipe, "--output", tmp_path / "out3", *QUIET, cwd=elsewhere)
    assert missing.returncode == 2
    assert f"no such checkpoint folder: ckpt3 (looked in {recipes / 'ckpt3'}, {elsewhere / 'ckpt3'})" in one_line(missing.stderr)
    assert "Repo id must be" not in missing.stderr and not (tmp_path / "out3").exists()  # nothing ran


# -- 5: an architecture fvlm cannot prune is refused from its config ------------------------------
def test_unsupported_architecture_is_named_before_loading(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64).save_pretrained(tmp_path / "llama")  # a config, no weights at all
    proc = fvlm("run", "-c", TINY / "llava-reference.yaml", "--model.backbone.path", tmp_path / "llama",
                "--output", tmp_path / "out", *QUIET)
    assert proc.returncode == 2
    message = one_line(proc.stderr)
    assert "no backbone adapter for LlamaConfig (model_type='llama')" in message and "llava" in message
    assert "Qwen2VLConfig" not in message and len(proc.stderr.strip().splitlines()) == 1
    # a family fvlm cannot prune: the reason is named, still before any weight is read
    from transformers import Gemma3Config

    Gemma3Config(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=16, vocab_size=64, sliding_window=8),
                 vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=32, patch_size=8)).save_pretrained(tmp_path / "gemma3")
    proc = fvlm("run", "-c", TINY / "llava-reference.yaml", "--model.backbone.path", tmp_path / "gemma3",
                "--output", tmp_path / "out", *QUIET)
    message = one_line(proc.stderr)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no backbone adapter for Gemma3Config (model_type='gemma3')" in message
    assert "could not be pruned anyway: sliding-window or chunked attention in decoder layers 0, 1" in message


# -- 7: selector arguments are checked when the recipe is parsed -----------------------------------
def test_bad_budget_in_a_recipe_exits_2_before_loading(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"model:\n  backbone: {ROOT / 'recipes/fragments/backbones/tiny-llava.yaml'}\n"
                      "  selector: {name: random, args: {keep: -5}}\n"
                      f"data: {ROOT / 'recipes/fragments/data/tiny-vqa.yaml'}\n")
    proc = fvlm("run", "-c", recipe, "--output", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fvlm run: recipe error: model.selector.args.keep (random): RandomSelector: `keep` must be an int count >= 1, "
        "or a float fraction in (0, 1] of each sample's visual tokens (1.0 keeps all); got -5"]
    assert not (tmp_path / "out").exists()


# -- 8: data problems are found before the model loads ---------------------------------------------
@pytest.mark.parametrize("case", ["malformed", "duplicate", "limit"])
def test_data_problems_exit_2_before_loading(tmp_path, case):
    data = write_data(tmp_path / "d", n=2)
    extra = []
    if case == "malformed":
        data.write_text(data.read_text() + '{"id": "q9", "question": \n')
        expected = f"data.path: {data}:3: not valid JSON"
    elif case == "duplicate":
        data.write_text(data.read_text() * 2)
        expected = f"data.path: {data} record 3: duplicate id 'q0'"
    else:
        extra = ["--data.limit", "-3"]
        expected = "data.limit must be an int >= 1 (or null: every record), got -3"
    proc = fvlm("run", "-c", TINY / "llava-reference.yaml", "--data.path", data, *extra, "--output", tmp_path / "out")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fvlm run: recipe error: ") and expected in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()  # refused before the output folder, let alone the model


# -- 9: SIGTERM (and Ctrl-C) stop at a batch boundary, keep what was written, exit non-zero ---------
@pytest.mark.parametrize("sig,code,name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_signal_stops_the_run_and_a_rerun_resumes(tmp_path, sig, code, name):
    n = 12
    data = write_data(tmp_path / "d", n=n)
    out = tmp_path / "run"
    argv = ["run", "-c", TINY / "llava-reference.yaml", "--data.path", data, "--data.batch_size", 1,
            "--model.generation.max_new_tokens", 8, "--output", out, *QUIET]
    cmd = [sys.executable, "-c", "import sys; from fvlm.cli import main; sys.exit(main())", *map(str, argv)]
    # A shell's background job (nohup, `&`) starts with SIGINT ignored and passes that on; a user at a
    # terminal has Python's default Ctrl-C handler, so the child starts with it.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pred = out / "predictions.jsonl"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if pred.is_file() and pred.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before the signal: {proc.stderr.read()[-2000:]}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)  # stops at the next batch boundary, not after all 12
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert f"stopped by {name}" in one_line(err) and "run the same command again to resume" in one_line(err)
    done = read_jsonl(pred)
    assert 2 <= len(done) < n and pred.read_text().endswith("\n")  # whole lines only
    again = fvlm(*argv)
    assert again.returncode == 0, again.stderr[-2000:]
    records = read_jsonl(pred)
    assert [r["id"] for r in records] == [f"q{i}" for i in range(n)] and records[: len(done)] == done


# -- 10: plugins that exit, visualize / profile / demo input -----------------------------------------
PLUGINS = {
    "fvlm_exit_plugin": "import sys\nsys.exit(3)\n",
    "fvlm_failing_plugin": (
        "from fvlm.selectors.basic import RandomSelector\n\n"
        "class Failing(RandomSelector):\n"
        "    def select(self, ctx):\n"
        "        raise RuntimeError('injected failure')\n"),
}


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Two installed (fake) plugin distributions: one calls sys.exit() at import, one fails when used."""
    site = tmp_path / "site"
    info = site / "fvlm_test_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fvlm-test-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[fvlm.selectors]\nexits = fvlm_exit_plugin:Nothing\n"
                                           "failing = fvlm_failing_plugin:Failing\n")
    for module, source in PLUGINS.items():
        (site / f"{module}.py").write_text(source)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))


def test_a_plugin_that_exits_at_import_breaks_nothing_else(plugins, tmp_path):
    listed = fvlm("list")
    assert listed.returncode == 0 and "SystemExit" in listed.stdout and "BROKEN" in listed.stdout
    assert fvlm("run", "-c", TINY / "llava-random.yaml", "--print_config").returncode == 0
    used = fvlm("run", "-c", TINY / "llava-reference.yaml", "--model.selector", "{name: exits}", "--print_config")
    assert used.returncode == 2 and "cannot load selector 'exits'" in one_line(used.stderr)


def test_visualize_refuses_unknown_selectors_and_reports_failed_panels(plugins, tmp_path):
    unknown = fvlm("visualize", "--sample", 0, "--selectors", "nosuch", "--out", tmp_path / "a.png")
    assert unknown.returncode == 2 and "unknown selector 'nosuch'" in one_line(unknown.stderr)
    assert not (tmp_path / "a.png").exists()
    failed = fvlm("visualize", "--sample", 0, "--selectors", "failing", "random", "--keep", 16,
                  "--out", tmp_path / "b.png")
    assert failed.returncode == 3, failed.stderr[-2000:]
    assert "1 of 2 selectors failed (failing)" in one_line(failed.stderr) and (tmp_path / "b.png").is_file()


def test_profile_refuses_a_budget_it_cannot_honour():
    proc = fvlm("profile", "--selector", "fastv", "--budget", 9999)
    assert proc.returncode == 2
    assert "budget of 9999 visual tokens is outside (0, 576]" in one_line(proc.stderr) and "@9999" not in proc.stdout


def test_demo_bad_selector_argument_is_one_line():
    proc = fvlm("demo", "--selector", "random", "--set", "keep=abc")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: RandomSelector: `keep` must be an int count >= 1, or a float fraction in (0, 1] of each sample's "
        "visual tokens (1.0 keeps all); got 'abc'"]


# -- 12: the summary covers exactly the requested samples; unknown predictions are not trusted ------
def test_summary_covers_the_requested_samples_only(tmp_path):
    data = write_data(tmp_path / "d", n=4)
    out = tmp_path / "run"
    argv = ["run", "-c", TINY / "llava-reference.yaml", "--data.path", data, "--output", out, *QUIET]
    assert fvlm(*argv, "--data.limit", 4).returncode == 0
    fewer = fvlm(*argv, "--data.limit", 2)
    assert fewer.returncode == 0, fewer.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 2 and summary["missing"] == 0
    assert "2 (0 errors, 0 missing)" in fewer.stdout
    assert "also holds 2 lines of samples this run did not request" in one_line(fewer.stderr)
    assert len(read_jsonl(out / "predictions.jsonl")) == 4  # nothing is deleted


def test_predictions_without_their_config_are_not_trusted(tmp_path):
    data = write_data(tmp_path / "d", n=2)
    out = tmp_path / "run"
    out.mkdir()
    (out / "predictions.jsonl").write_text(json.dumps({"id": "q0", "answer": "from somewhere else"}) + "\n")
    argv = ["run", "-c", TINY / "llava-reference.yaml", "--data.path", data, "--output", out, *QUIET]
    proc = fvlm(*argv)
    assert proc.returncode == 2
    assert f"{out} holds predictions but no config.yaml" in one_line(proc.stderr) and "--overwrite true" in proc.stderr
    assert read_jsonl(out / "predictions.jsonl") == [{"id": "q0", "answer": "from somewhere else"}]


# -- 13: a recipe is code: safe defaults, and remote code is never switched on silently --------------
def test_trust_remote_code_is_announced_when_a_recipe_switches_it_on():
    on = fvlm("run", "-c", TINY / "llava-reference.yaml", "--model.backbone.trust_remote_code", "true",
              "--print_config")
    assert on.returncode == 0 and "trust_remote_code: true" in on.stdout
    assert "the checkpoint's own Python code will run" in one_line(on.stderr)
    warning = (ROOT / "docs/reference/recipes.md").read_text()
    assert "A recipe is code: run only recipes you trust" in warning and "class_path" in warning
