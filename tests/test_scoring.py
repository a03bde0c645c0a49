"""Scoring functions on constructed predictions (no model): accuracy, yes/no, multiple choice, fidelity."""
import json

import pytest
import torch

from fvlm.metrics import scoring as S


def test_normalize_answer():
    assert S.normalize_answer("  The Two dogs!  ") == "2 dogs"
    assert S.normalize_answer("1,000") == "1000"
    assert S.normalize_answer("3.5 m.") == "3.5 m"
    assert S.normalize_answer("an apple\n") == "apple"


def test_exact_match_and_vqa_accuracy():
    assert S.exact_match("A red car.", ["red car"]) == 1.0
    assert S.exact_match("blue", ["red car", "red"]) == 0.0
    ten = ["red"] * 2 + ["dark red"] * 8
    # leave-one-out average of min(1, matches/3): 2 matches -> 8 subsets with 2/3 and 2 subsets with 1/3
    assert S.vqa_accuracy("red", ten) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert S.vqa_accuracy("dark red", ten) == 1.0
    assert S.vqa_accuracy("green", ten) == 0.0
    assert S.vqa_accuracy("red", ["red"]) == 1.0  # fewer than 3 references: exact match


def test_yes_no_parsing_and_pope_metrics():
    assert S.parse_yes_no("Yes, there is.") == "yes"
    assert S.parse_yes_no("No.") == "no"
    assert S.parse_yes_no("There is not a dog") == "no"
    assert S.parse_yes_no("a cat") is None
    preds = ["yes", "Yes.", "no", "no", "maybe"]
    labels = ["yes", "no", "no", "yes", "yes"]
    m = S.pope_metrics(preds, labels)
    # tp=1 (0), fp=1 (1), tn=1 (2), fn=2 (3, 4 unparsed)
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert m["yes_ratio"] == pytest.approx(2 / 5) and m["unparsed"] == 1


@pytest.mark.parametrize("text,expected", [
    ("B", 1), ("(C)", 2), ("B. two", 1), ("The answer is A.", 0), ("two", 1), ("I think two of them", 1),
    ("E", None), ("no idea", None),
])
def test_parse_choice(text, expected):
    assert S.parse_choice(text, ["one", "two", "three"]) == expected


def test_multiple_choice_gold_forms():
    choices = ["one", "two", "three"]
    for gold in ("B", "b", 1, "two"):
        assert S.multiple_choice_accuracy("B", [gold], choices) == 1.0
    assert S.multiple_choice_accuracy("A", ["B"], choices) == 0.0


def test_resolve_metric_auto():
    assert S.resolve_metric("auto", ["yes"]) == "yes_no"
    assert S.resolve_metric("auto", ["B"], ["x", "y"]) == "multiple_choice"
    assert S.resolve_metric("auto", ["cat"] * 10) == "vqa"
    assert S.resolve_metric("auto", ["cat"]) == "exact_match"
    assert S.resolve_metric("auto", []) is None
    assert S.score_sample("whatever", [], None) == (None, None)
    with pytest.raises(ValueError, match="unknown metric"):
        S.resolve_metric("bleu", ["x"])


def test_first_token_fidelity():
    ref = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    kl, top1 = S.first_token_fidelity(ref, ref.clone())
    assert kl == pytest.approx([0.0, 0.0], abs=1e-6) and top1 == [True, True]
    other = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 5.0]])
    kl, top1 = S.first_token_fidelity(ref, other)
    p = torch.softmax(ref[0], -1)
    expected = float((p * (torch.log_softmax(ref[0], -1) - torch.log_softmax(other[0], -1))).sum())
    assert kl[0] == pytest.approx(expected, rel=1e-5) and kl[1] == pytest.approx(0.0, abs=1e-6)
    assert top1 == [False, True]


def test_summarize_records():
    records = [
        {"id": "1", "answer": "yes", "answers": ["yes"], "reference_answer": "yes", "first_token_kl": 0.1,
         "first_token_top1": True, "efficiency": {"visual_tokens": 16, "llm_input_visual": 8, "layer_average": 8.0,
                                                  "visual_per_layer": [8, 8], "kv_bytes": 100, "new_tokens": 4,
                                                  "prefill_ms": 10.0, "decode_ms": 6.0, "batch_decode_steps": 3,
                                                  "batch_size": 1}},
        {"id": "2", "answer": "no", "answers": ["yes"], "reference_answer": "yes", "first_token_kl": 0.3,
         "first_token_top1": False, "efficiency": {"visual_tokens": 32, "llm_input_visual": 16, "layer_average": 12.0,
                                                   "visual_per_layer": [16, 8], "kv_bytes": 300, "new_tokens": 4,
                                                   "prefill_ms": 20.0, "decode_ms": 6.0, "batch_decode_steps": 3,
                                                   "batch_size": 1}},
        {"id": "3", "answer": "B", "answers": ["B"], "choices": ["x", "y"], "extra": {"category": "spatial"}},
        {"id": "4", "answer": "free text", "extra": {"category": "spatial"}},  # no references: fidelity only
        {"id": "5", "error": "FileNotFoundError: x.png"},
    ]
    s = S.summarize(records, reference=[{"id": "1", "answer": "Yes."}, {"id": "2", "answer": "no"}])
    assert s["samples"] == 5 and s["errors"] == 1 and s["scored"] == 3
    assert s["scores"]["yes_no"]["accuracy"] == 0.5 and s["scores"]["multiple_choice"]["accuracy"] == 1.0
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["categories"] == {"spatial": {"accuracy": 1.0, "count": 1}}  # per extra.category, scored samples only
    assert s["fidelity"]["answer_agreement"] == 0.5 and s["fidelity"]["first_token_kl"] == pytest.approx(0.2)
    assert s["fidelity"]["first_token_top1"] == 0.5 and s["fidelity"]["reference_run_agreement"] == 1.0
    eff = s["efficiency"]
    assert eff["layer_average"] == 10.0 and eff["visual_per_layer"] == [12.0, 8.0] and eff["kv_bytes"] == 200
    assert eff["decode_ms_per_token"] == pytest.approx(12.0 / 6)
    assert s["error_samples"] == [{"id": "5", "error": "FileNotFoundError: x.png"}]
    assert "prefill_speedup" not in eff  # no unpruned timings: no speedup


def test_speedup_against_the_unpruned_model_from_its_timings():
    """Prefill speedup = unpruned prefill time / pruned prefill time over the same samples; decode
    speedup compares the time per decode step, since the two runs may generate different lengths."""
    eff = [{"prefill_ms": 10.0, "decode_ms": 6.0, "batch_decode_steps": 3, "batch_size": 1,
            "unpruned_prefill_ms": 30.0, "unpruned_decode_ms": 12.0, "batch_unpruned_decode_steps": 4},
           {"prefill_ms": 20.0, "decode_ms": 4.0, "batch_decode_steps": 2, "batch_size": 1,
            "unpruned_prefill_ms": 50.0, "unpruned_decode_ms": 8.0, "batch_unpruned_decode_steps": 2}]
    out = S.summarize_efficiency([{"efficiency": e} for e in eff])
    assert out["prefill_speedup"] == pytest.approx(80.0 / 30.0) and out["unpruned_prefill_ms"] == 40.0
    assert out["decode_ms_per_token"] == pytest.approx(10.0 / 5)
    assert out["unpruned_decode_ms_per_token"] == pytest.approx(20.0 / 6)
    assert out["decode_speedup"] == pytest.approx((20.0 / 6) / (10.0 / 5))


def test_read_jsonl_ignores_truncated_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": 1}) + "\n" + json.dumps({"id": 2}) + "\n" + '{"id": 3, "ans')
    assert [r["id"] for r in S.read_jsonl(path)] == [1, 2]
