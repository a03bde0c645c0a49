"""fvlm as an lmms-eval model, end to end: the real ``lmms-eval`` command line with ``--model fvlm`` on the
built-in model and a local task (parquet read through ``datasets``), answers equal to ``fvlm run`` on the
same records, fvlm's efficiency fields in lmms-eval's per-sample log, a summary ``fvlm compare`` reads.

Runs where lmms-eval is installed (``pip install 'fvlm[lmms]'``, CI's lmms leg); skipped elsewhere.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'fvlm[lmms]')")

from fvlm.commands import run as run_cmd  # noqa: E402
from fvlm.metrics.scoring import read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 6
TASK = """task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.{doc_to_text}
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
  until: ["</s>"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_prompted_text(doc):
    return doc["question"] + "\\nAnswer briefly."


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''
CDPRUNER = {"keep": 64, "text_model": "tiny:clip", "relevance_source": "clip_text"}
# (lmms-eval model_args beyond batch_size / output, selector, its arguments, task, the fvlm run with the
# same settings: recipe and extra arguments). The prompted task appends an answer-format line to every
# question; the CDPruner run reads its instruction, the bare question, from the document's field, as
# fvlm run gives the question without its answer prompt.
RUNS = [
    ("pretrained=builtin,selector=keep_all", "keep_all", None, "fvlm_local", "reference.yaml", []),
    # 16 random tokens change 3 of the 6 unpruned answers: equal answers mean equal picks
    ('pretrained=builtin,selector=random,selector_args={"keep": 16, "seed": 0},positions=original', "random",
     {"keep": 16, "seed": 0}, "fvlm_local", "random-64.yaml", ["--model.selector", '{name: random, args: {keep: 16, seed: 0}}']),
    (f"recipe={ROOT / 'recipes/builtin/pio_fvlm-64.yaml'}", "pio_fvlm", {"layers": [1], "keep": [64]},
     "fvlm_local", "pio_fvlm-64.yaml", []),
    (f"pretrained=builtin,selector=cdpruner,selector_args={json.dumps(CDPRUNER)},positions=original,"
     "instruction_field=question",
     "cdpruner", CDPRUNER, "fvlm_prompted", "cdpruner-64.yaml",
     ["--model.selector", json.dumps({"name": "cdpruner", "args": CDPRUNER}),
      "--data.short_answer_prompt", "Answer briefly."]),
]


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """N held-out records of the built-in task as fvlm JSONL (PNG files) and as a parquet file with the
    images inside, plus an lmms-eval task reading the parquet file."""
    import datasets

    from fvlm.builtin.data import materialize

    root = tmp_path_factory.mktemp("lmms")
    jsonl = materialize("test", n=N, root=root / "data")
    records = read_jsonl(jsonl)
    table = datasets.Dataset.from_dict({
        "id": [r["id"] for r in records], "question": [r["question"] for r in records],
        "answer": [r["answer"] for r in records], "image": [str(jsonl.parent / r["image"]) for r in records],
    }).cast_column("image", datasets.Image())
    table.to_parquet(str(root / "test.parquet"))
    (root / "task").mkdir()
    for name, doc_to_text in (("fvlm_local", "doc_to_text"), ("fvlm_prompted", "doc_to_prompted_text")):
        (root / "task" / f"{name}.yaml").write_text(TASK.format(name=name, doc_to_text=doc_to_text,
                                                                  parquet=root / "test.parquet"))
    (root / "task" / "utils.py").write_text(UTILS)
    return root, jsonl, records


def lmms(root: Path, model_args: str, out: Path, task: str = "fvlm_local") -> tuple[list[dict], dict]:
    """Run the lmms-eval command line; (per-sample log lines by doc_id, fvlm summary)."""
    model_args += f",batch_size=4,output={out / 'fvlm'}"
    cli = Path(sys.executable).with_name("lmms-eval")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(root / "hf"))
    cmd = [str(cli), "--model", "fvlm", "--model_args", model_args, "--tasks", task,
           "--include_path", str(root / "task"), "--output_path", str(out / "fvlm"), "--log_samples",
           "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=root)
    logs = sorted((out / "fvlm").rglob(f"*_samples_{task}.jsonl"))
    # lmms-eval 0.7.3 exits 0 even when the evaluation failed: the sample log is the proof
    assert proc.returncode == 0 and logs, (proc.stdout[-2000:], proc.stderr[-4000:])
    samples = sorted(read_jsonl(logs[0]), key=lambda s: s["doc_id"])
    return samples, json.loads((out / "fvlm" / "summary.json").read_text())


def fvlm_run(jsonl: Path, recipe: str, out: Path, extra: list[str]) -> list[dict]:
    code = run_cmd.main(["-c", str(ROOT / "recipes" / "builtin" / recipe), "--data.path", str(jsonl),
                         "--data.limit", str(N), "--output", str(out), "--trainer.enable_progress_bar", "false",
                         *extra])
    assert code == 0
    return read_jsonl(out / "predictions.jsonl")


@pytest.mark.parametrize("model_args,selector,selector_args,task,recipe,extra", RUNS, ids=[r[1] for r in RUNS])
def test_lmms_eval_answers_equal_fvlm_run(local_task, tmp_path, model_args, selector, selector_args, task, recipe,
                                          extra):
    root, jsonl, records = local_task
    samples, summary = lmms(root, model_args, tmp_path, task)
    expected = fvlm_run(jsonl, recipe, tmp_path / "run", extra)
    assert [s["doc"]["id"] if "doc" in s else records[s["doc_id"]]["id"] for s in samples] == [r["id"] for r in records]
    assert [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
            for s in samples] == [r["answer"] for r in expected]
    if selector == "random":  # the pruning shows in the answers (the unpruned model answers all 6 right)
        assert [r["answer"] for r in expected] != [r["answer"] for r in records]
    for sample, pred in zip(samples, expected):
        counts = sample["token_counts"][0]
        eff = counts["fvlm"]
        assert counts["input_tokens"] == eff["prompt_tokens"] == pred["efficiency"]["prompt_tokens"]
        assert eff["selector"] == selector
        for key in ("visual_tokens", "llm_input_visual", "layer_average", "visual_per_layer", "kv_bytes"):
            assert eff[key] == pred["efficiency"][key], key
        assert eff["prefill_ms"] > 0 and eff["batch_size"] >= 1
    assert summary["selector"] == selector and summary["samples"] == N and summary["source"] == "lmms-eval"
    assert summary["layer_average"] == pytest.approx(sum(p["efficiency"]["layer_average"] for p in expected) / N)
    if selector_args:
        assert all(summary["selector_args"][k] == v for k, v in selector_args.items())
    else:
        assert summary["layer_average"] == 576.0  # keep-all keeps every token in every layer
    from fvlm.commands.compare import rows  # fvlm compare reads both routes' summaries side by side

    via_lmms, via_run = rows([tmp_path / "fvlm", tmp_path / "run"])
    assert via_lmms["samples"] == via_run["samples"] == N and via_lmms["accuracy"] is None
    # lmms-eval's own score of the run (its results file sits in the same folder): exact match of the answers
    right = sum(r["answer"] == rec["answer"] for r, rec in zip(expected, records)) / N
    assert via_lmms["scores"] == {f"{task}/exact_match": pytest.approx(right)} and via_run["scores"] == {}
    assert via_run["accuracy"] is not None and via_lmms["selector"] == selector
    if selector != "keep_all":  # the unpruned fvlm run has no position policy
        assert via_lmms["positions"] == via_run["positions"] == "original"
    for key in ("layer_average", "llm_input_visual", "kv_mib"):
        assert via_lmms[key] == pytest.approx(via_run[key]), key


def test_bad_selector_argument_fails_before_the_model_loads(local_task, tmp_path):
    from fvlm.errors import SelectorArgumentError
    from fvlm.integrations.lmms_eval import FVLM

    with pytest.raises(SelectorArgumentError, match="keep"):
        FVLM.create_from_arg_string('pretrained=./nowhere,selector=fastv,selector_args={"keep": -5}')


def test_a_missing_auxiliary_model_fails_before_the_evaluation():
    from fvlm.errors import AuxiliaryModelError
    from fvlm.integrations.lmms_eval import FVLM

    with pytest.raises(AuxiliaryModelError, match="/nonexistent/clip"):
        FVLM.create_from_arg_string('pretrained=builtin,selector=cdpruner,'
                                    'selector_args={"keep": 8, "text_model": "/nonexistent/clip"}')


def test_a_recipe_gives_the_backbone_selector_and_positions():
    from fvlm.integrations.lmms_eval import _from_recipe

    backbone, selector, name, positions = _from_recipe(str(ROOT / "recipes/llava-1.5-7b/pio_fvlm-64.yaml"), "tiny:llava")
    assert backbone.path == "tiny:llava" and backbone.dtype == "float16"  # pretrained= replaces the EDIT line
    assert name == "pio_fvlm" and selector.layers == [1, 10, 15] and positions is None
    backbone, selector, name, _ = _from_recipe(str(ROOT / "recipes/llava-1.5-7b/vanilla.yaml"), None)
    assert backbone.path == "llava-hf/llava-1.5-7b-hf" and selector is None and name == "none"


def test_task_generation_kwargs_become_generate_arguments():
    from fvlm.integrations.lmms_eval import cut_at_stops, generation_kwargs

    kwargs, stops = generation_kwargs({"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1,
                                       "do_sample": False, "until": "\n\n", "image_aspect_ratio": "original"})
    assert kwargs == {"max_new_tokens": 16, "do_sample": False, "num_beams": 1} and stops == ["\n\n"]
    kwargs, stops = generation_kwargs({"temperature": 0.2, "top_p": 0.9, "until": ["A", "B"]})
    assert kwargs == {"do_sample": True, "temperature": 0.2, "top_p": 0.9} and stops == ["A", "B"]
    assert cut_at_stops("yes\n\nbecause", ["\n\n"]) == "yes" and cut_at_stops("no", ["\n\n"]) == "no"


class InstructionRecorder:
    def __init__(self):
        self.seen = []

    def on_stage(self, stage, ctx, selection):
        self.seen += list(ctx.instructions)


def test_instructions_are_the_task_text_or_the_named_document_field(local_task):
    """In process, with lmms-eval's own request records: CDPruner's instruction is the task's text as
    the model receives it, or with ``instruction_field`` that field of each document; a field the
    documents lack is named."""
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from fvlm.errors import UsageError
    from fvlm.integrations.lmms_eval import FVLM

    _, _, records = local_task
    docs = [{"question": r["question"], "image": r["image"]} for r in records[:2]]
    contexts = [d["question"] + "\nAnswer briefly." for d in docs]

    def doc_to_visual(doc):
        return [Image.new("RGB", (24, 24), (200, 30, 30))]

    def requests():
        return [Instance("generate_until", (ctx, {"max_new_tokens": 2}, doc_to_visual, i, "t", "test"), idx=0,
                         metadata={"task": "t", "doc_id": i, "repeats": 1})
                for i, ctx in enumerate(contexts)]

    args = f"pretrained=builtin,selector=cdpruner,selector_args={json.dumps(CDPRUNER)},batch_size=2"
    for extra, expected in (("", contexts), (",instruction_field=question", [d["question"] for d in docs])):
        model = FVLM.create_from_arg_string(args + extra)
        model.task_dict = {"t": {"test": docs}}
        recorder = InstructionRecorder()
        model.answerer.listeners.append(recorder)
        assert len(model.generate_until(requests())) == 2
        assert sorted(recorder.seen) == sorted(expected)
    model = FVLM.create_from_arg_string(args + ",instruction_field=query")
    model.task_dict = {"t": {"test": docs}}
    with pytest.raises(UsageError, match="instruction_field='query'.*'question'"):
        model.generate_until(requests())
