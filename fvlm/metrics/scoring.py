"""Answer scoring and run summaries as pure functions over prediction records.

A *prediction record* is one line of a run's ``predictions.jsonl`` (see
[`fvlm.lightning.callbacks.PredictionWriter`][fvlm.lightning.callbacks.PredictionWriter]): at least ``id`` and ``answer`` (the
generated text), usually ``answers`` (references), optional ``choices``, ``metric``, ``error``,
fidelity fields (``reference_answer``, ``first_token_kl``, ``first_token_top1``) and an
``efficiency`` dict. Everything here works on plain Python values, so a finished run can be
re-scored without a model: ``summarize(read_jsonl("runs/x/predictions.jsonl"))``.

Metrics (``metric`` per record, or chosen by [`resolve_metric`][fvlm.metrics.scoring.resolve_metric] when ``"auto"``):

* ``exact_match``: the normalised prediction equals one of the normalised references.
* ``vqa``: VQA accuracy, ``min(1, matches / 3)`` averaged over the leave-one-out subsets of the
  references (the VQAv2 convention; with fewer than 3 references it falls back to exact match).
* ``yes_no``: the first yes/no word of the prediction against the reference (POPE); a summary
  adds precision, recall, F1 and the yes ratio, with "yes" as the positive class.
* ``multiple_choice``: the option letter (or option text) parsed from the prediction against the
  reference option (a letter, a 0-based index or the option text).

Fidelity to the unpruned model needs no references: answer agreement between a pruned and an
unpruned answer, and the KL divergence / top-1 agreement of the first generated token's
distribution ([`first_token_fidelity`][fvlm.metrics.scoring.first_token_fidelity]).
"""
from __future__ import annotations

import json
import math
import re
import string
from collections import defaultdict
from typing import Any, Iterable, Sequence

METRICS = ("vqa", "exact_match", "yes_no", "multiple_choice")

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")


# -- normalisation ---------------------------------------------------------------------------
def normalize_answer(text: Any) -> str:
    """Lower-case, drop punctuation and articles, spell small numbers as digits, squeeze spaces."""
    text = str(text).lower().replace("\n", " ").replace("\t", " ").strip()
    text = _DIGIT_COMMA.sub("", text)
    text = _DECIMAL.sub("\0", text)  # keep decimal points through the punctuation pass
    text = _PUNCT.sub(" ", text).replace("\0", ".")
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def _answers(answers: Any) -> list:
    if answers is None:
        return []
    if isinstance(answers, (str, int)):
        return [answers]
    return list(answers)


# -- per-sample metrics ----------------------------------------------------------------------
def exact_match(prediction: str, answers: Any) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _answers(answers)))


def vqa_accuracy(prediction: str, answers: Any) -> float:
    """VQA accuracy: ``min(1, matches/3)`` averaged over leave-one-out subsets of the references."""
    refs = [normalize_answer(a) for a in _answers(answers)]
    if len(refs) < 3:
        return exact_match(prediction, answers)
    pred = normalize_answer(prediction)
    matches = [r == pred for r in refs]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(refs)


def parse_yes_no(text: str) -> str | None:
    """``"yes"`` / ``"no"`` from a free-form answer (first such word; a leading negation is "no")."""
    words = normalize_answer(text).split()
    for w in words:
        if w in ("yes", "no"):
            return w
        if w in ("not", "none"):
            return "no"
    return None


def yes_no_accuracy(prediction: str, answers: Any) -> float:
    refs = [parse_yes_no(str(a)) for a in _answers(answers)]
    pred = parse_yes_no(prediction)
    return float(pred is not None and pred in refs)


def choice_letter(index: int) -> str:
    return string.ascii_uppercase[index]


_LEADING_LETTER = re.compile(r"^\s*[\(\[]?([A-Z])(?:[\)\].:,]|\s|$)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)?\s*[\(\[]?([A-Z])\b", re.IGNORECASE)


def parse_choice(text: str, choices: Sequence[str]) -> int | None:
    """The 0-based option a free-form answer picks: a leading letter ("B", "(B)", "B. cat"),
    "the answer is B", the exact option text, or the only option text it contains."""
    n = len(choices)
    norm = normalize_answer(text)
    texts = [normalize_answer(c) for c in choices]
    if norm and norm in texts:
        return texts.index(norm)
    for pattern in (_LEADING_LETTER, _ANSWER_IS):
        m = pattern.search(text) if pattern is _ANSWER_IS else pattern.match(text)
        if m:
            i = string.ascii_uppercase.index(m.group(1).upper())
            if i < n:
                return i
    contained = [i for i, t in enumerate(texts) if t and re.search(rf"\b{re.escape(t)}\b", norm)]
    return contained[0] if len(contained) == 1 else None


def gold_choice(answers: Any, choices: Sequence[str]) -> int | None:
    """The reference option: a letter ("C"), a 0-based int index, or the option text."""
    for a in _answers(answers):
        if isinstance(a, bool):
            continue
        if isinstance(a, int):
            return a if 0 <= a < len(choices) else None
        a = str(a).strip()
        if len(a) == 1 and a.upper() in string.ascii_uppercase[: len(choices)]:
            return string.ascii_uppercase.index(a.upper())
        texts = [normalize_answer(c) for c in choices]
        if normalize_answer(a) in texts:
            return texts.index(normalize_answer(a))
    return None


def multiple_choice_accuracy(prediction: str, answers: Any, choices: Sequence[str]) -> float:
    gold = gold_choice(answers, choices)
    return float(gold is not None and parse_choice(prediction, choices) == gold)


def resolve_metric(metric: str | None, answers: Any, choices: Sequence[str] | None = None) -> str | None:
    """The metric a sample is scored with (``None``: no references, fidelity only)."""
    refs = _answers(answers)
    if not refs:
        return None
    if metric and metric != "auto":
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected 'auto' or one of {METRICS}")
        return metric
    if choices:
        return "multiple_choice"
    if all(isinstance(a, str) and normalize_answer(a) in ("yes", "no") for a in refs):
        return "yes_no"
    return "vqa" if len(refs) >= 3 else "exact_match"


def score_sample(prediction: str, answers: Any, choices: Sequence[str] | None = None,
                 metric: str | None = "auto") -> tuple[str | None, float | None]:
    """``(metric, score in [0, 1])``; ``(None, None)`` when the sample has no references."""
    name = resolve_metric(metric, answers, choices)
    if name is None:
        return None, None
    if name == "multiple_choice":
        if not choices:
            raise ValueError("metric 'multiple_choice' needs choices")
        return name, multiple_choice_accuracy(prediction, answers, choices)
    fn = {"vqa": vqa_accuracy, "exact_match": exact_match, "yes_no": yes_no_accuracy}[name]
    return name, fn(prediction, answers)


# -- aggregate metrics -----------------------------------------------------------------------
def pope_metrics(predictions: Iterable[str], labels: Iterable[Any]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class "yes"), yes ratio and unparsed answers."""
    tp = fp = tn = fn = unparsed = yes = n = 0
    for pred_text, label in zip(predictions, labels):
        n += 1
        pred, gold = parse_yes_no(pred_text), parse_yes_no(str(label))
        unparsed += pred is None
        yes += pred == "yes"
        if gold == "yes":
            tp += pred == "yes"
            fn += pred != "yes"
        elif gold == "no":
            tn += pred == "no"
            fp += pred == "yes"
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": yes / n if n else 0.0, "unparsed": unparsed, "count": n}


def answers_agree(a: str | None, b: str | None) -> bool:
    """Two generated answers agree when their normalised texts are equal."""
    return a is not None and b is not None and normalize_answer(a) == normalize_answer(b)


def first_token_fidelity(reference_logits, logits) -> tuple[list[float], list[bool]]:
    """Per sample: ``KL(P_ref || P)`` of the first generated token and whether the argmaxes agree.

    Both arguments are ``[B, V]`` logits (torch tensors); computed in float32.
    """
    import torch

    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    cur = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref.exp() * (ref - cur)).sum(dim=-1).clamp(min=0.0)
    top1 = reference_logits.argmax(dim=-1) == logits.argmax(dim=-1)
    return kl.tolist(), top1.tolist()


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def summarize_efficiency(records: Iterable[dict]) -> dict[str, float | int | None]:
    """Means over the records' ``efficiency`` dicts (visual tokens, KV, latency per sample)."""
    eff = [r["efficiency"] for r in records if isinstance(r.get("efficiency"), dict)]
    if not eff:
        return {}
    out: dict[str, Any] = {"samples": len(eff)}
    for key in ("visual_tokens", "llm_input_visual", "layer_average", "kv_tokens", "kv_bytes",
                "prefill_ms", "decode_ms", "new_tokens"):
        out[key] = _mean([e.get(key) for e in eff])
    # decode steps per sample: its share of its batch's decode forwards (else generated tokens - 1)
    steps = sum(e["batch_decode_steps"] / e["batch_size"] if e.get("batch_size") else max((e.get("new_tokens") or 1) - 1, 0)
                for e in eff)
    decode = sum(e.get("decode_ms") or 0.0 for e in eff)
    out["decode_ms_per_token"] = decode / steps if steps else None
    both = [e for e in eff if e.get("unpruned_prefill_ms") is not None and e.get("prefill_ms")]
    if both:  # fidelity runs time the unpruned model on the same batches: speedup = its time / pruned time
        out["unpruned_prefill_ms"] = _mean([e["unpruned_prefill_ms"] for e in both])
        out["prefill_speedup"] = sum(e["unpruned_prefill_ms"] for e in both) / sum(e["prefill_ms"] for e in both)
        ref_steps = sum(e["batch_unpruned_decode_steps"] / e["batch_size"] for e in both)
        ref_per_token = sum(e["unpruned_decode_ms"] for e in both) / ref_steps if ref_steps else None
        out["unpruned_decode_ms_per_token"] = ref_per_token
        per_token = out["decode_ms_per_token"]
        out["decode_speedup"] = ref_per_token / per_token if ref_per_token and per_token else None
    layers = [e["visual_per_layer"] for e in eff if e.get("visual_per_layer")]
    if layers and len({len(row) for row in layers}) == 1:
        out["visual_per_layer"] = [sum(col) / len(col) for col in zip(*layers)]
    return out


def summarize(records: Iterable[dict], reference: Iterable[dict] | None = None) -> dict[str, Any]:
    """Scores, fidelity, efficiency and error counts of a run's prediction records.

    ``reference`` (records of an unpruned run of the same data) adds answer agreement by id.
    """
    records = list(records)
    ok = [r for r in records if not r.get("error")]
    errors = [r for r in records if r.get("error")]
    by_metric: dict[str, list[float]] = defaultdict(list)
    by_category: dict[str, list[float]] = defaultdict(list)
    yes_no_preds, yes_no_labels = [], []
    for r in ok:
        metric, score = r.get("metric"), r.get("score")
        if score is None and r.get("answers"):
            metric, score = score_sample(r.get("answer", ""), r.get("answers"), r.get("choices"), r.get("metric", "auto"))
        if metric is None or score is None:
            continue
        by_metric[metric].append(score)
        category = (r.get("extra") or {}).get("category")
        if category is not None:
            by_category[str(category)].append(score)
        if metric == "yes_no":
            yes_no_preds.append(r.get("answer", ""))
            yes_no_labels.append(_answers(r.get("answers"))[0])
    scores: dict[str, Any] = {m: {"accuracy": sum(v) / len(v), "count": len(v)} for m, v in sorted(by_metric.items())}
    if yes_no_preds:
        scores["yes_no"].update({k: v for k, v in pope_metrics(yes_no_preds, yes_no_labels).items()
                                 if k not in ("accuracy", "count")})
    scored = [s for v in by_metric.values() for s in v]
    fidelity: dict[str, Any] = {}
    with_ref = [r for r in ok if r.get("reference_answer") is not None]
    if with_ref:
        fidelity["answer_agreement"] = _mean([float(answers_agree(r["answer"], r["reference_answer"])) for r in with_ref])
        fidelity["first_token_kl"] = _mean([r.get("first_token_kl") for r in with_ref])
        fidelity["first_token_top1"] = _mean([float(r["first_token_top1"]) for r in with_ref
                                              if r.get("first_token_top1") is not None])
        fidelity["count"] = len(with_ref)
    if reference is not None:
        ref = {str(r["id"]): r for r in reference if not r.get("error")}
        pairs = [(r, ref[str(r["id"])]) for r in ok if str(r["id"]) in ref]
        fidelity["reference_run_agreement"] = _mean([float(answers_agree(a.get("answer"), b.get("answer"))) for a, b in pairs])
        fidelity["reference_run_count"] = len(pairs)
    return {
        "samples": len(records),
        "errors": len(errors),
        "scored": len(scored),
        "accuracy": sum(scored) / len(scored) if scored else None,
        "scores": scores,
        "categories": {c: {"accuracy": sum(v) / len(v), "count": len(v)} for c, v in sorted(by_category.items())},
        "fidelity": fidelity,
        "efficiency": summarize_efficiency(ok),
        "error_samples": [{"id": r["id"], "error": r["error"]} for r in errors][:50],
    }


def read_jsonl(path) -> list[dict]:
    """Records of a JSONL file; a truncated last line (an interrupted write) is ignored."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out
