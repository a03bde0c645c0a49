"""The built-in model: synthetic data, checkpoint, training script, accuracy benchmark, visualisation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from fvlm.builtin import CHECKPOINT, synthetic
from helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def builtin_model():
    from fvlm import builtin

    return builtin.load()  # the shipped checkpoint: its absence is a failure, not a skip


# -- data ----------------------------------------------------------------------------------------
def test_dataset_is_deterministic_and_splits_differ():
    a, b = synthetic.sample("test", 7), synthetic.sample("test", 7)
    assert a["question"] == b["question"] and a["answer"] == b["answer"]
    assert a["image"].tobytes() == b["image"].tobytes()
    assert a["image"].size == (336, 336)
    other = synthetic.sample("train", 7)
    assert (other["image"].tobytes(), other["question"]) != (a["image"].tobytes(), a["question"])
    assert synthetic.dataset("val", 3, start=5)[0]["id"] == synthetic.sample("val", 5)["id"]


def test_dataset_balance_and_answers():
    records = synthetic.dataset("test", 100)
    assert Counter(r["kind"] for r in records) == {k: 20 for k in synthetic.KINDS}
    yes_no = Counter(r["answer"] for r in records if r["kind"] == "exists")
    assert yes_no == {"yes": 10, "no": 10}
    for r in records:
        objects = r["objects"]
        assert synthetic.MIN_OBJECTS <= len(objects) <= synthetic.MAX_OBJECTS
        assert len({o.cell for o in objects}) == len(objects)
        if r["kind"] == "colour":
            assert r["answer"] in synthetic.COLOURS
        elif r["kind"] == "shape":
            assert r["answer"] in synthetic.SHAPES
        elif r["kind"] == "count":
            assert r["answer"] == str(len(r["target"]))
        elif r["kind"] == "exists":
            assert (r["answer"] == "yes") == bool(r["target"])
        else:
            assert r["answer"] in synthetic.LETTERS and len(r["choices"]) == 3
            assert r["choices"][synthetic.LETTERS.index(r["answer"])] == r["target"][0].region
    # the object a region question is about is drawn where the question says
    r = next(r for r in records if r["kind"] == "colour")
    obj = r["target"][0]
    x0, y0, x1, y1 = obj.box
    assert r["image"].getpixel(((x0 + x1) // 2, (y0 + 3 * y1) // 4)) == synthetic.COLOURS[obj.colour]


def test_tokenizer_covers_the_task_and_processor_layout():
    from fvlm.builtin import model as M
    from fvlm.builtin.train import encode_conversation

    processor = M.build_processor()
    tok = processor.tokenizer
    records = synthetic.dataset("val", 10)
    for r in records:
        ids = tok(r["question"] + " " + r["answer"], add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
    inputs = processor(images=[r["image"] for r in records[:2]], text=[M.prompt(r["question"]) for r in records[:2]],
                       return_tensors="pt", padding=True)
    image_id = tok.convert_tokens_to_ids(M.IMAGE)
    assert (inputs["input_ids"] == image_id).sum(dim=1).tolist() == [576, 576]
    assert tuple(inputs["pixel_values"].shape) == (2, 3, 336, 336)
    # the chat template renders the same prompt the training data and the benchmark use
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": records[0]["question"]}]}],
        add_generation_prompt=True)
    assert chat == M.prompt(records[0]["question"])
    # training's first turn is exactly the inference prompt
    single = processor(images=[records[0]["image"]], text=[M.prompt(records[0]["question"])], return_tensors="pt")
    ids, labels = encode_conversation(tok, [(records[0]["question"], records[0]["answer"])])
    assert ids[: single["input_ids"].shape[1]] == single["input_ids"][0].tolist()
    assert tok.decode([i for i, l in zip(ids, labels) if l != -100], skip_special_tokens=True) == records[0]["answer"]


def test_builtin_data_path_writes_the_split_once(tmp_path, monkeypatch):
    from fvlm.builtin import data
    from fvlm.lightning.data import VQADataModule

    monkeypatch.setenv("FVLM_CACHE", str(tmp_path))
    module = VQADataModule("builtin:val:2", limit=6)
    module.setup()
    records = module.records
    assert [r["id"] for r in records] == [f"val-2-{i}" for i in range(6)]
    for r in records:
        expected = synthetic.sample("val", int(r["id"].rsplit("-", 1)[1]), seed=2)
        assert (r["question"], r["answers"], r["extra"]["category"]) == (expected["question"], [expected["answer"]], expected["kind"])
        assert r["metric"] == ("yes_no" if expected["kind"] == "exists" else "exact_match")
        with Image.open(r["image_paths"][0]) as image:
            assert image.convert("RGB").tobytes() == expected["image"].tobytes()
    jsonl = data.materialize("val", 6, seed=2)
    stamp = jsonl.stat().st_mtime_ns
    assert data.materialize("val", 6, seed=2).stat().st_mtime_ns == stamp  # reused, not rewritten
    assert data.parse("recipes/tiny/data/vqa.jsonl") is None
    for bad in ("builtin:nope", "builtin:test:x"):
        with pytest.raises(ValueError, match="unknown built-in data set"):
            data.parse(bad)


# -- checkpoint ----------------------------------------------------------------------------------
def test_checkpoint_is_small_and_loads_offline(builtin_model):
    model, processor = builtin_model
    size = sum(f.stat().st_size for f in CHECKPOINT.iterdir())
    assert size < 10 * 2**20
    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.image_seq_length) == (336, 14, 576)
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert processor.tokenizer.padding_side == "left"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_checkpoint_answers_held_out_questions(builtin_model):
    from fvlm.builtin import answer

    model, processor = builtin_model
    records = synthetic.dataset("test", 300, start=1000)  # held out, and not the benchmark's records
    answers = answer(model, processor, [r["image"] for r in records], [r["question"] for r in records])
    accuracy = sum(a == r["answer"] for a, r in zip(answers, records)) / len(records)
    assert accuracy >= 0.9, [(r["question"], r["answer"], a) for a, r in zip(answers, records) if a != r["answer"]]


def test_batched_left_padded_answers_match_single(builtin_model):
    from fvlm.builtin import answer

    model, processor = builtin_model
    records = [synthetic.sample("test", i) for i in (0, 4, 2)]  # prompts of different lengths
    images, questions = [r["image"] for r in records], [r["question"] for r in records]
    batched = answer(model, processor, images, questions, batch_size=3)
    assert batched == [answer(model, processor, [im], [q])[0] for im, q in zip(images, questions)]


def test_builtin_recipe_answers_like_the_model_and_reports_efficiency(builtin_model, tmp_path, monkeypatch, capsys):
    """The README's main command: the recipe's answers are the model's own greedy answers (plumbing
    oracle), and the pruned run reports accuracy, agreement and the token budget."""
    from fvlm.builtin import answer
    from fvlm.commands import run as run_cmd

    monkeypatch.setenv("FVLM_CACHE", str(tmp_path / "cache"))
    common = ["--data.limit", "10", "--trainer.enable_progress_bar", "false"]
    assert run_cmd.main(["-c", str(ROOT / "recipes/builtin/reference.yaml"), "--output", str(tmp_path / "ref"), *common]) == 0
    assert run_cmd.main(["-c", str(ROOT / "recipes/builtin/pio_fvlm-64.yaml"), "--output", str(tmp_path / "pio"), *common]) == 0
    console = capsys.readouterr().out
    assert "answers (first samples)" in console and "test-0-0" in console and "unpruned" in console

    model, processor = builtin_model
    records = synthetic.dataset("test", 10)
    expected = answer(model, processor, [r["image"] for r in records], [r["question"] for r in records])
    reference = [json.loads(line) for line in (tmp_path / "ref/predictions.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in reference] == expected
    summary = json.loads((tmp_path / "pio/summary.json").read_text())
    assert summary["selector"] == "pio_fvlm" and summary["errors"] == 0 and summary["accuracy"] is not None
    assert summary["fidelity"]["count"] == 10
    assert {c: v["count"] for c, v in summary["categories"].items()} == {k: 2 for k in synthetic.KINDS}
    assert "category colour" in console  # per-kind accuracy in the printed table
    layers = model.config.text_config.num_hidden_layers
    assert summary["efficiency"]["layer_average"] == (576 + 64 * (layers - 1)) / layers


# -- training script -----------------------------------------------------------------------------
def test_training_script_smoke(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from fvlm.builtin import load, train

    results = train.train(train.parse_args(["--out", str(tmp_path / "ckpt"), "--smoke"]))
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "training.json"} <= {
        p.name for p in (tmp_path / "ckpt").iterdir()}
    assert [e["stage"] for e in results["log"]] == ["vision", "vision", "vlm/2", "vlm/1", "vlm/1"]
    model, processor = load(tmp_path / "ckpt")
    assert isinstance(model, LlavaForConditionalGeneration)
    assert model.config.image_seq_length == 576
    # a continuation starts from the checkpoint, runs stage 2 only and leaves the vision tower as it was
    more = train.train(train.parse_args(["--out", str(tmp_path / "more"), "--smoke", "--init", str(tmp_path / "ckpt"),
                                         "--first-scene", "100"]))
    assert [e["stage"] for e in more["log"]] == ["vlm/2", "vlm/1", "vlm/1"]
    continued, _ = load(tmp_path / "more")
    tower, before = continued.model.vision_tower.state_dict(), model.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], before[k]) for k in before)
    assert not torch.equal(continued.lm_head.weight, model.lm_head.weight)


def test_lm_forward_is_the_model_forward_and_pools_the_visual_span():
    from fvlm.builtin import model as M
    from fvlm.builtin import train

    processor = M.build_processor()
    model = M.build_model(M.build_config(processor.tokenizer, **M.SMOKE_SIZES)).eval()
    batch = train.make_batch(processor, [0, 1], seed=0, questions=2, listings=False)
    assert batch["image_index"].tolist() == [0, 0, 1, 1]
    packed = train.make_batch(processor, [0, 1], seed=0, questions=2, packed=True)
    assert packed["image_index"].tolist() == [0, 1]  # one conversation per image, every answer labelled
    answers = (packed["labels"] == processor.tokenizer.eos_token_id).sum(dim=1)
    assert answers.tolist() == [2 + len(synthetic.LISTINGS)] * 2
    with torch.no_grad():
        pixels = batch["pixel_values"][batch["image_index"]]
        full = model(input_ids=batch["input_ids"], pixel_values=pixels).logits
        same, labels = train.lm_forward(model, batch, factor=1)
        short, short_labels = train.lm_forward(model, batch, factor=4)
    torch.testing.assert_close(same, full)
    assert torch.equal(labels, batch["labels"])
    assert short.shape[1] == full.shape[1] - 576 + 36
    assert torch.equal(short_labels[short_labels != -100], batch["labels"][batch["labels"] != -100])


# -- benchmark -----------------------------------------------------------------------------------
def test_accuracy_benchmark_tiny(tmp_path):
    import fvlm

    out, raw = tmp_path / "acc.md", tmp_path / "acc.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--n", "8", "--budgets", "64",
           "--out", str(out), "--json", str(raw), "--threads", "1"]
    try:
        import matplotlib  # noqa: F401

        cmd += ["--plot", str(tmp_path / "acc.png")]
    except ImportError:
        pass
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    results = json.loads(raw.read_text())
    assert "## Accuracy (%)" in text and "| (unpruned) |" in text
    assert "[start:accuracy-table]" in text and "[end:accuracy-table]" in text  # included by docs/benchmarks.md
    for name in fvlm.list_selectors():
        if name != "compose":
            assert f"| {name} " in text
    keep_all = results["rows"]["keep_all"]["all"]
    assert keep_all["fidelity"] == 1.0  # a session that prunes nothing changes nothing
    random64 = results["rows"]["random"]["64"]
    assert random64["layer_average"] == 64.0 and 0.0 <= random64["accuracy"] <= 1.0
    for label in ("cdpruner", "vscan_encoder", "vscan", "pio_fvlm_ve", "pool"):  # vision-side rows run too
        assert "error" not in results["rows"][label]["64"], results["rows"][label]
    assert results["rows"]["vscan"]["64"]["layer_average"] == (2 * 64 + 2 * 21) / 4  # 64 in, a third after layer 2
    if "--plot" in cmd:
        assert (tmp_path / "acc.png").stat().st_size > 1000


def _bench(script: str, *argv: str) -> dict:
    """Run a benchmark script in a subprocess; its ``--json`` results."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "out.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / script), *argv, "--json", str(raw), "--threads", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(raw.read_text())


def test_accuracy_slice_reproduces_the_committed_figures():
    """Quality regression: the committed slice of the accuracy benchmark (first 64 test records, 64
    tokens, every row and control) is rerun by its own command; every installed row's accuracy and
    agreement stay within one record of it, its first-token KL within 0.02, its layer average exact;
    keep-all equals the unpruned model; and the slice agrees with the committed n=500 table within
    sampling error (so neither file is regenerated without the other)."""
    from fvlm.builtin import budgets

    committed = json.loads((ROOT / "docs/benchmarks/accuracy_slice.json").read_text())
    table = json.loads((ROOT / "docs/benchmarks/accuracy.json").read_text())
    meta = committed["meta"]
    installed = budgets.default_labels()
    labels = [label for label in committed["rows"] if label in installed]
    assert {"keep_all", "random", "pio_fvlm", "fastv", "visionzip", "divprune", "cdpruner"} <= set(labels)
    rerun = _bench("accuracy.py", "--n", str(meta["n"]), "--budgets", *map(str, meta["budgets"]),
                   "--split", meta["split"], "--seed", str(meta["seed"]), "--batch-size", str(meta["batch_size"]),
                   "--positions", meta["positions"], "--selectors", *labels)
    n, budget = meta["n"], str(meta["budgets"][0])
    assert rerun["rows"]["keep_all"]["all"]["fidelity"] == 1.0
    assert rerun["rows"]["keep_all"]["all"]["accuracy"] == rerun["unpruned"]["accuracy"]
    assert abs(rerun["unpruned"]["accuracy"] - committed["unpruned"]["accuracy"]) <= 1 / n
    for label, row in rerun["rows"].items():
        for key, cell in row.items():
            if not isinstance(cell, dict):
                continue
            old = committed["rows"][label][key]
            where = (label, key, cell, old)
            assert abs(cell["accuracy"] - old["accuracy"]) <= 1 / n + 1e-9, where
            assert abs(cell["fidelity"] - old["fidelity"]) <= 1 / n + 1e-9, where
            assert cell["kl"] == pytest.approx(old["kl"], abs=0.02), where
            assert cell["layer_average"] == old["layer_average"], where
            full = table["rows"].get(label, {}).get(key if key == "all" else budget)
            if full and "accuracy" in full:  # the slice is a sample of the table's records
                p = full["accuracy"]
                assert abs(old["accuracy"] - p) <= 4 * (p * (1 - p) / n) ** 0.5 + 1 / n, (label, old, full)


def test_layer_average_convention_meets_the_budget_with_controls_at_the_same_stages():
    """``--convention layer-average``: every in-LLM row (single- and multi-stage) and its random,
    uniform and oracle controls average the budget over the decoder layers; the oracle's pre-LLM row
    keeps exactly the budget."""
    results = _bench("accuracy.py", "--n", "2", "--budgets", "192", "--selectors", "random", "fastv",
                     "pio_fvlm_3stage", "sparsevlm", "--convention", "layer-average",
                     "--controls", "random", "uniform", "oracle")
    rows = results["rows"]
    assert results["meta"]["convention"] == "layer-average"
    for label in ("random", "fastv", "pio_fvlm_3stage", "sparsevlm", "oracle (input)", "random (after layer 1)",
                  "uniform (after layers 1, 2, 3)", "oracle (after layers 1, 2, 3, as sparsevlm)"):
        assert abs(rows[label]["192"]["layer_average"] - 192) <= 1, (label, rows[label]["192"])
    assert rows["oracle (after layers 1, 2, 3)"]["control_for"] == ["pio_fvlm_3stage"]
    assert rows["oracle (input)"]["192"]["layer_average"] == 192


def test_depth_probe_keeping_every_token_changes_nothing():
    """The probe's pruning at every point, random or oracle, with all 576 tokens kept reproduces the
    unpruned answers and first-token distribution."""
    results = _bench("depth_probe.py", "--n", "4", "--keep", "576")
    assert results["meta"]["points"] == ["input", "1", "2", "3"]
    assert len(results["points"]) == 8
    for name, cell in results["points"].items():
        assert cell["fidelity"] == 1.0 and cell["kl"] < 1e-6, name
        assert cell["accuracy"] == results["unpruned"]["accuracy"], name


def test_answer_readout_reads_the_position_that_predicts_the_answer(builtin_model):
    """The readout's states are the last prompt position's: after the last layer the LM head turns them
    into the unpruned model's first-token logits (batched with padding = one by one); before the first
    layer they are the same token for every record, so their readouts are the most common class."""
    from fvlm.answering import Prompt, build_inputs

    readout = benchmark_module("answer_readout")

    model, processor = builtin_model
    records = synthetic.dataset("test", 5)
    states = readout.last_position_states(model, processor, records, batch_size=3)
    assert states.shape == (5, model.config.text_config.num_hidden_layers + 1, model.config.text_config.hidden_size)
    with torch.no_grad():
        for i, r in enumerate(records):
            logits = model(**build_inputs(processor, [Prompt([r["image"]], r["question"])])).logits[0, -1]
            torch.testing.assert_close(model.lm_head(states[i, -1]), logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(states[:, 0], states[:1, 0].expand(5, -1))

    results = _bench("answer_readout.py", "--train", "6", "--test", "4")
    assert [row["layer"] for row in results["layers"]] == [0, 1, 2, 3, 4]
    for name in ("answer", "cells"):
        assert results["layers"][0][name] == results["majority"][name], name


def test_question_first_probe_keeps_the_model_and_the_layouts_it_claims(builtin_model, tmp_path):
    """benchmarks/question_first.py: its image-first sequence is the training / inference format; its
    question-first sequence has the question before the image span; its unpruned probe is the real
    model's first-token prediction, and keeping all 576 tokens after any layer changes nothing (on
    the shipped model, and after a question-first fine-tuning step)."""
    from fvlm.answering import Prompt, build_inputs
    from fvlm.builtin import train

    qf = benchmark_module("question_first")
    model, processor = builtin_model
    tok = processor.tokenizer
    records = synthetic.dataset("val", 4)
    r = records[0]
    assert qf.encode(tok, r["question"], r["answer"], "image-first") == train.encode_conversation(
        tok, [(r["question"], r["answer"])])
    ids, labels = qf.encode(tok, r["question"], r["answer"], "question-first")
    image = [i for i, t in enumerate(ids) if t == model.config.image_token_index]
    assert len(image) == 576 and image == list(range(image[0], image[0] + 576))
    assert tok.decode(ids[: image[0]]).split()[-len(r["question"].split()):] == r["question"].split()
    assert tok.decode(ids[image[-1] + 1:]).split()[:2] == ["ASSISTANT", ":"]

    hits = qf.probe(model, processor, records, [576], "image-first")
    with torch.no_grad():
        for b, rec in enumerate(records):
            first = tok(rec["answer"], add_special_tokens=False)["input_ids"][0]
            logits = model(**build_inputs(processor, [Prompt([rec["image"]], rec["question"])])).logits[0, -1]
            assert hits["all"][b] == (int(logits.argmax()) == first)
    assert all(h == hits["all"] for h in hits.values()), hits

    out = tmp_path / "qf.json"
    assert qf.main(["--steps", "1", "--images", "1", "--questions", "2", "--probe-every", "0", "--probe-n", "3",
                    "--keep", "576", "--threads", "1", "--json", str(out)]) == 0
    probes = json.loads(out.read_text())["probes"]
    assert sorted(probes) == ["1"]
    assert all(row == probes["1"]["all"] for row in probes["1"].values())


def test_benchmark_reports_a_failing_selector(tmp_path):
    out = tmp_path / "acc.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--n", "2", "--budgets", "16",
           "--selectors", "uniform", "no_such_selector", "--out", str(out), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "| no_such_selector | failed |" in text and "## Failures" in text


# -- visualisation -------------------------------------------------------------------------------
def test_visualize_writes_png(tmp_path, capsys):
    from PIL import Image

    from fvlm.cli import main

    path = tmp_path / "keep.png"
    code = main(["visualize", "--sample", "3", "--selectors", "pio_fvlm", "fastv", "visionzip", "divprune",
                 "--keep", "32", "--out", str(path)])
    assert code == 0
    image = Image.open(path)
    assert image.width >= 5 * 336 and image.height > 336  # unpruned + 4 panels
    out = capsys.readouterr().out
    assert "pio_fvlm: answer" in out and "32 patches kept" in out


def test_visualize_draws_the_vision_side_selectors(tmp_path, capsys):
    from fvlm.cli import main

    assert main(["visualize", "--sample", "3", "--selectors", "cdpruner", "vscan", "pool", "--keep", "64",
                 "--out", str(tmp_path / "keep.png")]) == 0
    out = capsys.readouterr().out
    assert "cdpruner: answer" in out and "64 patches kept" in out  # cdpruner: 64 of 576 before the LLM
    assert "vscan: answer" in out and "21 patches kept" in out  # 64 from the encoder, 21 after layer 2
    assert "pool: answer" in out and "64 patches kept" in out  # 3 x 3 blocks: 8 x 8 anchors


def test_stage_recorder_maps_multi_stage_selections(builtin_model):
    import fvlm
    from fvlm.builtin import budgets, prompt_inputs
    from fvlm.commands.visualize import StageRecorder

    model, processor = builtin_model
    record = synthetic.sample("test", 1)
    inputs = prompt_inputs(processor, [record["image"]], [record["question"]])
    kwargs = budgets.SETTINGS["pio_fvlm_3stage"].make_kwargs(64, model.config.text_config.num_hidden_layers)
    selector = fvlm.create_selector("pio_fvlm", **kwargs)
    recorder = StageRecorder()
    with fvlm.prune(model, selector, listeners=[recorder]), torch.no_grad():
        model.generate(**inputs, max_new_tokens=1)
    assert len(recorder.stages) == 3
    kept = recorder.kept(576)
    assert len(kept) == kwargs["keep"][-1] == len(set(kept))
    # stage 2's picks are a subset of stage 1's, expressed in original patch indices
    first = recorder.stages[0][1].tolist()
    assert set(kept) <= set(first)
