"""Lightning module, data, callbacks and ``fvlm run`` on the built-in tiny backbones (CPU).

End to end: tiny recipes write predictions, scores and efficiency figures; DDP with 2 gloo
processes merges to exactly the single-process result; a killed or failing run resumes without
losing or duplicating ids; missing / corrupt images are reported and the run goes on.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import fvlm
from fvlm import testing
from fvlm.commands import run as run_cmd
from fvlm.lightning import BackboneSpec, EfficiencyMonitor, FVLMModule, GenerationSpec, PredictionWriter, VQADataModule
from fvlm.lightning.callbacks import merge_predictions
from fvlm.metrics.scoring import read_jsonl
from fvlm.selectors.basic import RandomSelector
from fvlm import tiny_backbones
from fvlm.adapters.llava import CLIP_IMAGE, CLIP_PATCH, LLAVA_NEXT_PINPOINTS, anyres_count
from fvlm.tiny_backbones import tiny_processor

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
SIZES = [(32, 32), (48, 64), (64, 40), (40, 64), (64, 64), (24, 56)]  # (height, width)
QUIET = ["--trainer.enable_progress_bar", "false"]


def make_data(folder: Path, n: int, missing=(), corrupt=(), multi=()) -> Path:
    """``n`` VQA records over PNG images of several sizes; some ids with a missing / corrupt image."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(SIZES):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    kinds = [
        {"answers": ["yes"]},
        {"answers": ["red"] * 3 + ["blue"] * 7},
        {"choices": ["cat", "dog", "bird"], "answer": "B"},
        {"answers": ["two"]},
    ]
    with open(folder / "data.jsonl", "w") as fh:
        for i in range(n):
            rid = f"s{i:02d}"
            image = "nowhere.png" if i in missing else "corrupt.png" if i in corrupt else f"img{i % len(SIZES)}.png"
            rec = {"id": rid, "question": f"Question {i}?", **kinds[i % len(kinds)]}
            rec["images" if i in multi else "image"] = [image, f"img{(i + 1) % len(SIZES)}.png"] if i in multi else image
            fh.write(json.dumps(rec) + "\n")
    return folder / "data.jsonl"


def fvlm_run(*argv) -> int:
    return run_cmd.main([str(a) for a in argv])


def lines(path: Path) -> list[dict]:
    return read_jsonl(path)


def needs(*names):
    missing = sorted(set(names) - set(fvlm.list_selectors()))
    if missing:
        pytest.skip(f"selector(s) {missing} not registered")


def _recipe_selectors(path: Path) -> list[str]:
    """Registry names a recipe uses (its selector fragment, parts of a composition included)."""
    sel = yaml.safe_load(path.read_text())["model"].get("selector")
    if isinstance(sel, str):
        sel = yaml.safe_load((path.parent / sel).read_text())
    names, todo = [], [sel] if sel else []
    while todo:
        item = todo.pop()
        names.append(item["name"])
        todo += [s for s in (item.get("args") or {}).get("selectors", []) if isinstance(s, dict)]
    return names


# -- tiny processors ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", tiny_backbones.families())
def test_tiny_processor_matches_the_tiny_model(family, model_cache):
    """Placeholder counts written by the processor equal the vision tower's token counts."""
    from PIL import Image

    model, processor = model_cache(family), tiny_processor(family)
    images = [Image.new("RGB", (w, h), (i * 40, 90, 200)) for i, (h, w) in enumerate(SIZES[:3])]
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
            [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}]}]]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert inputs["attention_mask"][:, 0].tolist() == [0, 1]  # left padding
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)
    counts = testing.visual_token_counts(model, inputs)
    if family == "llava":
        assert counts == [16, 32]
    elif family.startswith("qwen"):
        assert counts == [int(g.prod()) // 4 for g in inputs["image_grid_thw"][:1]] + [
            int(inputs["image_grid_thw"][1:].prod(dim=1).sum()) // 4]
    else:  # LLaVA-NeXT / OneVision (any-res, the only image of its prompt): base tile + unpadded grid + newlines
        side = CLIP_IMAGE // CLIP_PATCH
        rows, cols, _ = anyres_count(*SIZES[0], LLAVA_NEXT_PINPOINTS, side, CLIP_IMAGE)
        assert counts[0] == side * side + rows * cols + rows


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_tiny_tokenizer_layout(family):
    from fvlm.tiny_backbones import tiny_tokenizer

    tok = tiny_tokenizer(family)
    assert sorted(tok.get_vocab().values()) == list(range(testing.VOCAB_SIZE))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (testing.PAD_ID, testing.BOS_ID, testing.EOS_ID)
    image = "<image>" if family == "llava" else "<|image_pad|>"
    ids = tok(f"hi {image}{image} there")["input_ids"]
    assert ids.count(testing.IMAGE_ID) == 2 and all(i >= testing.FIRST_TEXT_ID for i in ids if i != testing.IMAGE_ID)
    assert tok.decode([i for i in ids if i != testing.IMAGE_ID]) == "hi  there"


# -- end to end -----------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", sorted(TINY.glob("*.yaml")), ids=lambda p: p.stem)
def test_tiny_recipe_runs_end_to_end(recipe, tmp_path, capsys):
    needs(*_recipe_selectors(recipe))
    out = tmp_path / "run"
    assert fvlm_run("-c", recipe, "--output", out) == 0
    console = capsys.readouterr().out
    assert "fvlm run" in console and "layer average" in console  # the rich summary table
    assert "answers (first samples)" in console and "color-1" in console  # the first answers
    data_ids = [json.loads(line)["id"] for line in (TINY / "data/vqa.jsonl").read_text().splitlines()]
    records = lines(out / "predictions.jsonl")
    assert [r["id"] for r in records] == data_ids  # one line per id, data-set order
    assert not any(r.get("error") for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == len(data_ids) and summary["missing"] == 0 and summary["scored"] == 5
    assert set(summary["scores"]) == {"vqa", "yes_no", "multiple_choice"}
    eff = summary["efficiency"]
    for key in ("prefill_ms", "decode_ms_per_token", "kv_bytes", "layer_average", "visual_per_layer"):
        assert eff[key] is not None and eff[key] != 0, key
    for r in records:
        e = r["efficiency"]
        assert len(e["visual_per_layer"]) == testing.NUM_LAYERS and e["new_tokens"] == 4
        assert e["prefill_ms"] > 0 and e["kv_bytes"] > 0
        if _recipe_selectors(recipe):
            assert e["layer_average"] < e["visual_tokens"]  # pruned
        else:
            assert e["layer_average"] == e["visual_tokens"] == e["llm_input_visual"]
    if recipe.stem == "llava-random":  # fidelity to the unpruned model
        assert all("reference_answer" in r and r["first_token_kl"] >= 0 for r in records)
        assert summary["fidelity"]["count"] == len(data_ids)
        assert all(r["efficiency"]["unpruned_prefill_ms"] > 0 for r in records)  # the unpruned pass, timed apart
        assert eff["prefill_speedup"] == pytest.approx(
            sum(r["efficiency"]["unpruned_prefill_ms"] for r in records) / sum(r["efficiency"]["prefill_ms"] for r in records))
        assert "speedup vs unpruned: prefill" in console and f"{eff['prefill_speedup']:.2f}x" in console
    else:
        assert "prefill_speedup" not in eff and "speedup vs unpruned" not in console
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["backbone"]["path"].startswith("tiny:")


def test_answers_equal_plain_generate(tmp_path, model_cache):
    """Plumbing oracle: the module's answers are the processor + generate + decode of a plain call;
    KeepAll under the session gives the same answers."""
    data = make_data(tmp_path / "d", 4)
    answers = {}
    for selector in (None, fvlm.create_selector("keep_all")):
        module = FVLMModule(BackboneSpec("tiny:llava"), selector, GenerationSpec(max_new_tokens=3))
        module.configure_model()
        dm = VQADataModule(str(data), batch_size=2)
        dm.processor = module.processor
        answers[selector is None] = [r["answer"] for batch in dm.predict_dataloader() for r in module.answer(batch)]
    assert answers[True] == answers[False]
    model, processor = model_cache("llava"), tiny_processor("llava")
    dm = VQADataModule(str(data), batch_size=1)
    dm.processor = processor
    expected = []
    for batch in dm.predict_dataloader():
        out = model.generate(**batch["inputs"], max_new_tokens=3)
        expected.append(processor.tokenizer.decode(out[0, batch["inputs"]["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert answers[True] == expected


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_local_checkpoint_folder_loads_like_the_tiny_backbone(family, tmp_path):
    """A checkpoint folder goes through AutoModelForImageTextToText / AutoProcessor.from_pretrained
    (for Qwen, as a real checkpoint names it; without torchvision its video processor is left out)."""
    from fvlm.tiny_backbones import tiny_backbone

    model, processor = tiny_backbone(family)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    config = json.loads((ckpt / "processor_config.json").read_text())
    config["processor_class"] = config["processor_class"].removeprefix("_ImageOnly")
    (ckpt / "processor_config.json").write_text(json.dumps(config))
    data = make_data(tmp_path / "d", 3)
    base = ["-c", TINY / "llava-reference.yaml", "--data.path", data, *QUIET]
    assert fvlm_run(*base, "--model.backbone.path", f"tiny:{family}", "--output", tmp_path / "tiny") == 0
    assert fvlm_run(*base, "--model.backbone.path", ckpt, "--output", tmp_path / "folder") == 0
    tiny, folder = lines(tmp_path / "tiny/predictions.jsonl"), lines(tmp_path / "folder/predictions.jsonl")
    assert [r["answer"] for r in tiny] == [r["answer"] for r in folder]
    assert [r["efficiency"]["visual_tokens"] for r in tiny] == [r["efficiency"]["visual_tokens"] for r in folder]


def test_missing_and_corrupt_images_are_reported(tmp_path):
    data = make_data(tmp_path / "d", 6, missing={1}, corrupt={4}, multi={2})
    out = tmp_path / "run"
    assert fvlm_run("-c", TINY / "llava-reference.yaml", "--data.path", data, "--data.batch_size", 2,
                    "--output", out, *QUIET) == 3  # finished, but two samples have no answer
    records = {r["id"]: r for r in lines(out / "predictions.jsonl")}
    assert sorted(records) == [f"s{i:02d}" for i in range(6)]
    assert "FileNotFoundError" in records["s01"]["error"] and "nowhere.png" in records["s01"]["error"]
    assert "corrupt.png" in records["s04"]["error"] or "Image" in records["s04"]["error"]
    assert "answer" not in records["s01"]
    ok = [r for i, r in records.items() if i not in ("s01", "s04")]
    assert all(isinstance(r["answer"], str) and not r.get("error") for r in ok)
    assert records["s02"]["efficiency"]["visual_tokens"] == 32  # two images
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == 2 and {e["id"] for e in summary["error_samples"]} == {"s01", "s04"}
    # a re-run retries the error lines (the images are still bad): one line per id, still exit 3
    assert fvlm_run("-c", TINY / "llava-reference.yaml", "--data.path", data, "--output", out, *QUIET) == 3
    again = {r["id"]: r for r in lines(out / "predictions.jsonl")}
    assert sorted(again) == sorted(records) and "nowhere.png" in again["s01"]["error"]


class FailingSelector(RandomSelector):
    """Random selection that raises on the ``fail_at``-th call (a crash half way through a run)."""

    calls = 0

    def __init__(self, fail_at: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.fail_at = fail_at

    def select(self, ctx):
        type(self).calls += 1
        if type(self).calls == self.fail_at:
            raise RuntimeError("injected failure")
        return super().select(ctx)


def _trainer(out: Path, **kwargs):
    from lightning.pytorch import Trainer

    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[EfficiencyMonitor(), PredictionWriter(str(out))], **kwargs)


def test_raise_half_way_then_resume(tmp_path):
    data = make_data(tmp_path / "d", 8)
    out = tmp_path / "run"
    FailingSelector.calls = 0
    module = FVLMModule(BackboneSpec("tiny:llava"), FailingSelector(fail_at=4, keep=0.5), GenerationSpec(max_new_tokens=3))
    with pytest.raises(RuntimeError, match="injected failure"):
        _trainer(out).predict(module, datamodule=VQADataModule(str(data), batch_size=2), return_predictions=False)
    first = lines(out / "predictions.jsonl")
    assert [r["id"] for r in first] == ["s00", "s01", "s02", "s03", "s04", "s05"]  # 3 batches done
    # the re-run skips the finished ids and completes the file
    module = FVLMModule(BackboneSpec("tiny:llava"), FailingSelector(keep=0.5), GenerationSpec(max_new_tokens=3))
    writer = PredictionWriter(str(out))
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[writer])
    trainer.predict(module, datamodule=VQADataModule(str(data), batch_size=2), return_predictions=False)
    assert writer.written == 2 and len(writer.skipped) == 6
    records = lines(out / "predictions.jsonl")
    assert [r["id"] for r in records] == [f"s{i:02d}" for i in range(8)]
    assert records[:6] == first  # finished lines untouched


def test_on_error_record_goes_on(tmp_path):
    data = make_data(tmp_path / "d", 4)
    out = tmp_path / "run"
    FailingSelector.calls = 0
    module = FVLMModule(BackboneSpec("tiny:llava"), FailingSelector(fail_at=2, keep=0.5),
                        GenerationSpec(max_new_tokens=2), on_error="record")
    _trainer(out).predict(module, datamodule=VQADataModule(str(data), batch_size=1), return_predictions=False)
    records = lines(out / "predictions.jsonl")
    assert [r["id"] for r in records] == ["s00", "s01", "s02", "s03"]
    assert [bool(r.get("error")) for r in records] == [False, True, False, False]
    assert "injected failure" in records[1]["error"]


class BatchOnlyFailure(RandomSelector):
    """Random selection that raises on a batch of several samples, and on sample ``bad`` alone
    (recognised by its prompt length: it is the only one with two images)."""

    def __init__(self, bad_length: int, **kwargs):
        super().__init__(**kwargs)
        self.bad_length = bad_length

    def select(self, ctx):
        if ctx.hidden.shape[0] > 1:
            raise RuntimeError("injected batch failure")
        if ctx.hidden.shape[1] == self.bad_length:
            raise RuntimeError("injected sample failure")
        return super().select(ctx)


def test_on_error_record_retries_a_failing_batch_one_sample_at_a_time(tmp_path):
    """A batch that fails is answered sample by sample: only the sample that fails alone is lost,
    the others get the same answers as an unbatched run, with the batch's error noted."""
    data = make_data(tmp_path / "d", 4, multi=(2,))
    dm = VQADataModule(str(data), batch_size=1)
    dm.processor = tiny_processor("llava")
    dm.setup()
    lengths = [dm.single_batch(r)["inputs"]["input_ids"].shape[1] for r in dm.records]
    assert lengths.count(lengths[2]) == 1  # the two-image sample is recognisable by its length
    module = FVLMModule(BackboneSpec("tiny:llava"), BatchOnlyFailure(lengths[2], keep=0.5, seed=0),
                        GenerationSpec(max_new_tokens=2), on_error="record")
    _trainer(tmp_path / "run").predict(module, datamodule=VQADataModule(str(data), batch_size=4), return_predictions=False)
    records = lines(tmp_path / "run" / "predictions.jsonl")
    assert [r["id"] for r in records] == ["s00", "s01", "s02", "s03"]
    assert [bool(r.get("error")) for r in records] == [False, False, True, False]
    assert "injected sample failure" in records[2]["error"] and "batch_error" not in records[2]
    assert all("injected batch failure" in records[i]["batch_error"] for i in (0, 1, 3))
    # the same answers as a run that never batched
    module = FVLMModule(BackboneSpec("tiny:llava"), BatchOnlyFailure(lengths[2], keep=0.5, seed=0),
                        GenerationSpec(max_new_tokens=2), on_error="record")
    _trainer(tmp_path / "single").predict(module, datamodule=VQADataModule(str(data), batch_size=1),
                                          return_predictions=False)
    single = lines(tmp_path / "single" / "predictions.jsonl")
    assert [r.get("answer") for r in records] == [r.get("answer") for r in single]
    assert [r.get("error") for r in single] == [None, None, records[2]["error"], None]


def test_gradient_selector_under_inference_mode_is_a_clear_error(tmp_path):
    needs("pio_fvlm")
    data = make_data(tmp_path / "d", 2)
    module = FVLMModule(BackboneSpec("tiny:llava"), {"name": "pio_fvlm", "args": {"layers": [1], "keep_fraction": [0.5]}},
                        GenerationSpec(max_new_tokens=2))
    assert module.needs_gradients
    with pytest.raises(fvlm.FVLMError, match="inference_mode"):
        _trainer(tmp_path / "run", inference_mode=True).predict(module, datamodule=VQADataModule(str(data)),
                                                                return_predictions=False)


def test_merge_predictions_dedupes_and_orders(tmp_path):
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    (out / "predictions.jsonl").write_text(json.dumps({"id": "c", "answer": "3"}) + "\n")
    (out / "shards/rank-0.jsonl").write_text(
        json.dumps({"id": "a", "error": "boom"}) + "\n" + json.dumps({"id": "b", "answer": "2"}) + "\n")
    (out / "shards/rank-1.jsonl").write_text(
        json.dumps({"id": "a", "answer": "1"}) + "\n" + json.dumps({"id": "b", "answer": "2"}) + "\n" + '{"id": "d", "ans')
    merge_predictions(out, order=["a", "b", "c", "d"])
    assert lines(out / "predictions.jsonl") == [{"id": "a", "answer": "1"}, {"id": "b", "answer": "2"},
                                                {"id": "c", "answer": "3"}]
    assert not list((out / "shards").glob("*.jsonl"))


def test_changed_configuration_is_not_mixed_into_old_predictions(tmp_path, capsys):
    data = make_data(tmp_path / "d", 2)
    out = tmp_path / "run"
    base = ["-c", TINY / "llava-reference.yaml", "--data.path", data, "--output", out, *QUIET]
    assert fvlm_run(*base) == 0
    assert fvlm_run(*base, "--model.generation.max_new_tokens", 2) == 2
    assert "model.generation.max_new_tokens" in capsys.readouterr().err
    assert fvlm_run(*base, "--model.generation.max_new_tokens", 2, "--overwrite", "true") == 0
    assert all(r["efficiency"]["new_tokens"] == 2 for r in lines(out / "predictions.jsonl"))


# -- subprocesses: a killed run, DDP -----------------------------------------------------------
def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", COLUMNS="120")
    env.pop("LOCAL_RANK", None)
    return env


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    n = 12
    data = make_data(tmp_path / "d", n)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fvlm.cli", "run", "-c", str(TINY / "llava-reference.yaml"), "--data.path", str(data),
           "--data.batch_size", "1", "--model.generation.max_new_tokens", "6", "--output", str(out), *QUIET]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pred = out / "predictions.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if pred.is_file() and pred.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done = lines(pred)
    assert 2 <= len(done) < n
    with open(pred, "a") as fh:  # and a line torn by the kill
        fh.write('{"id": "s11", "answer": "tor')
    assert fvlm_run(*cmd[4:]) == 0
    records = lines(pred)
    assert [r["id"] for r in records] == [f"s{i:02d}" for i in range(n)]
    assert records[: len(done)] == done and not any(r.get("error") for r in records)


def test_ddp_two_processes_equal_single_process(tmp_path):
    data = make_data(tmp_path / "d", 7, missing={3})  # uneven split over 2 ranks; one failed sample
    common = ["run", "-c", str(TINY / "llava-random.yaml"), "--data.path", str(data), "--data.batch_size", "1",
              "--model.fidelity", "false", "--mode", "test", *QUIET]
    ddp = subprocess.run([sys.executable, "-m", "fvlm.cli", *common, "--output", str(tmp_path / "ddp"),
                          "--trainer", str(ROOT / "recipes/fragments/trainer/ddp-cpu.yaml")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 3, ddp.stderr[-3000:]  # finished; the sample with a missing image has no answer
    assert "GLOBAL_RANK: 1" in ddp.stdout + ddp.stderr  # really two processes
    assert fvlm_run(*common[1:], "--output", tmp_path / "single") == 3
    merged = lines(tmp_path / "ddp/predictions.jsonl")
    single = lines(tmp_path / "single/predictions.jsonl")
    ids = [f"s{i:02d}" for i in range(7)]
    assert [r["id"] for r in merged] == ids == [r["id"] for r in single]  # exactly one line per id
    assert {r["id"]: r.get("answer") for r in merged} == {r["id"]: r.get("answer") for r in single}
    assert {r["id"]: r.get("error") for r in merged} == {r["id"]: r.get("error") for r in single}
    assert not list((tmp_path / "ddp/shards").glob("*.jsonl"))
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert summary["samples"] == 7 and summary["errors"] == 1 and summary["missing"] == 0


def test_backbone_spec_refuses_an_unsupported_checkpoint_before_loading(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64).save_pretrained(tmp_path / "llama")  # no weights: loading them would fail
    with pytest.raises(fvlm.UnsupportedModelError, match="no backbone adapter for LlamaConfig"):
        BackboneSpec(str(tmp_path / "llama")).load()
    with pytest.raises(fvlm.FVLMError, match="no such checkpoint folder: ./nowhere"):
        BackboneSpec("./nowhere").check()


@pytest.mark.parametrize("override,expected", [
    (["--data.batch_size", "0"], "data.batch_size must be an int >= 1, got 0"),
    (["--data.path", "nowhere.jsonl"], "data file 'nowhere.jsonl' does not exist"),
    (["--data.path", "EMPTY"], "holds no records: nothing to run"),
    (["--data.path", "NOID"], "record 1: every record needs an 'id'"),
])
def test_data_problems_are_recipe_errors_before_the_model_loads(tmp_path, capsys, monkeypatch, override, expected):
    empty, noid = tmp_path / "empty.jsonl", tmp_path / "noid.jsonl"
    empty.write_text("\n")
    noid.write_text(json.dumps({"question": "Why?"}) + "\n")
    override = [{"EMPTY": str(empty), "NOID": str(noid)}.get(a, a) for a in override]
    loads = []
    monkeypatch.setattr(BackboneSpec, "load", lambda self: loads.append(self))
    assert fvlm_run("-c", TINY / "llava-reference.yaml", *override, "--output", tmp_path / "out") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err and not loads and not (tmp_path / "out").exists()
