"""PIO-FVLM: saliency vs. a hand-written proxy loss and finite differences, NMS picks vs. a Python loop,
batch/padding invariance, end-to-end generation on every family, schedule derivation."""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import reference_nms_picks

import fvlm
from fvlm.adapters.base import ModelInfo
from fvlm.selectors.pio_fvlm import AUTHORS_SCHEDULES, PIOFVLM
from fvlm.selectors.schedules import layer_average
from fvlm.adapters.tiny import family_of, spec_for
from fvlm.testing import FAMILIES, image_token_id, tiny_batch, tiny_inputs, tiny_model

IMPLS = ("eager", "sdpa")


class Recorder(PIOFVLM):
    """PIOFVLM that records, per stage, what it saw and what it picked."""

    def __init__(self, *args, record_gradient=False, **kwargs):
        super().__init__(*args, **kwargs)
        self._record_gradient = record_gradient
        self.records = []

    def saliency(self, ctx):
        self._saliency = super().saliency(ctx)
        return self._saliency

    def select(self, ctx):
        picks = super().select(ctx)
        rec = dict(saliency=self._saliency.detach().clone(), picks=picks.clone(), hidden=ctx.hidden.detach().clone(),
                   visual_hidden=ctx.visual_hidden.detach().clone(), visual_valid=ctx.visual_valid.clone(),
                   visual_index=ctx.visual_index.clone(), budget=ctx.budget.clone())
        if self._record_gradient:
            rec["gradient"] = self.gradient(ctx).detach().clone()
        self.records.append(rec)
        return picks


def _prefill(model, selector, inputs):
    with fvlm.prune(model, selector) as session, torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return session


# ------------------------------------------------------------------ saliency vs. independent reference
def _hand_loss(model, layer_index, x, k_last=4, labels=None, head="lm_head"):
    """The spec's proxy loss written from scratch on an unpadded batch-1 LLaVA sequence (``head``:
    the LM head, or the input-embedding matrix as the authors' Qwen code uses it)."""
    lm = model.model.language_model
    length = x.shape[1]
    pos = torch.arange(length)[None]
    cos_sin = lm.rotary_emb(x, pos)
    mask = torch.full((length, length), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)[None, None]
    y = lm.layers[layer_index](x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    y = y[0] if isinstance(y, tuple) else y
    normed = lm.norm(y)
    logits = model.lm_head(normed) if head == "lm_head" else normed @ lm.embed_tokens.weight.T
    logits = logits.to(torch.promote_types(x.dtype, torch.float32))
    rows = logits[0, length - 1 - k_last : length - 1]  # shifted: positions S-5..S-2 for K=4
    labels = rows.detach().argmax(-1) if labels is None else labels
    return F.cross_entropy(rows, labels), labels


def _layer_output(model, inputs, layer_index):
    seen = []
    handle = model.model.language_model.layers[layer_index].register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("proxy_block,proxy_head", [("next", "lm_head"), ("current", "lm_head"), ("current", "embed")])
def test_saliency_equals_hand_written_proxy_gradient(model_cache, attn, proxy_block, proxy_head):
    model = model_cache("llava", attn)
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight  # untied: heads differ
    inputs = tiny_inputs(model, images_per_prompt=(2,))
    stage = 2
    hidden = _layer_output(model, inputs, stage - 1)  # output of the first `stage` layers, unpruned
    rec = Recorder(layers=[stage], keep=[10], proxy_block=proxy_block, proxy_head=proxy_head)
    _prefill(model, rec, inputs)
    torch.testing.assert_close(rec.records[0]["hidden"], hidden, atol=1e-5, rtol=1e-5)

    x = hidden.clone().requires_grad_(True)
    with torch.enable_grad():
        loss, _ = _hand_loss(model, stage if proxy_block == "next" else stage - 1, x, head=proxy_head)
        (grad,) = torch.autograd.grad(loss, x)
    visual = (inputs["input_ids"][0] == image_token_id(model)).nonzero().flatten()
    expected = grad[0, visual].norm(dim=-1)
    got = rec.records[0]["saliency"][0]
    assert got.shape == expected.shape and bool(expected.abs().max() > 0)
    torch.testing.assert_close(got, expected, atol=1e-6 * float(expected.max()), rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def _rms_norm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_gradient_matches_finite_differences_in_float64(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    # a truly float64 proxy: HF's RMSNorm rounds through float32 (and eager softmax does; use sdpa)
    monkeypatch.setattr(LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    model = tiny_model("llava", "sdpa", dtype=torch.float64)
    inputs = tiny_inputs(model, images_per_prompt=(1,))
    rec = Recorder(layers=[1], keep=[8], record_gradient=True)
    _prefill(model, rec, inputs)
    r = rec.records[0]
    x, grad = r["hidden"], r["gradient"]
    assert grad.dtype == torch.float64
    torch.testing.assert_close(r["saliency"][0], grad[0, r["visual_index"][0]].float().norm(dim=-1))
    _, labels = _hand_loss(model, 1, x)
    gen = torch.Generator().manual_seed(0)
    for tokens in ([0, 5], [3, 11, 15]):
        d = torch.zeros_like(x)
        pos = r["visual_index"][0, tokens]
        d[0, pos] = torch.randn(len(tokens), x.shape[-1], generator=gen, dtype=x.dtype)
        eps = 1e-6
        with torch.no_grad():
            up, _ = _hand_loss(model, 1, x + eps * d, labels=labels)
            down, _ = _hand_loss(model, 1, x - eps * d, labels=labels)
        fd = float(up - down) / (2 * eps)
        analytic = float((grad * d).sum())
        assert abs(analytic) > 1e-4
        assert fd == pytest.approx(analytic, rel=1e-6)


# ----------------------------------------------------------------- head rows: loss-only == all rows
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_head_on_loss_rows_equals_head_on_all_rows(model_cache, family):
    model = model_cache(family, "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    runs = {}
    for rows in ("loss", "all"):
        runs[rows] = Recorder(layers=[1, 2], keep=[9, 4], proxy="block", head_rows=rows)
        _prefill(model, runs[rows], inputs)
    for a, b in zip(runs["loss"].records, runs["all"].records, strict=True):
        torch.testing.assert_close(a["saliency"], b["saliency"], atol=1e-6 * float(b["saliency"].max()), rtol=1e-4)
        assert torch.equal(a["picks"], b["picks"])


# ------------------------------------------------------------------------- NMS + fill vs. Python loop
class GivenSaliency(PIOFVLM):
    def __init__(self, saliency, **kwargs):
        super().__init__(**kwargs)
        self._saliency = saliency

    def saliency(self, ctx):
        return self._saliency


@pytest.mark.parametrize("nms", [True, False])
def test_selection_equals_python_reference_on_random_inputs(nms):
    for seed in range(50):
        gen = torch.Generator().manual_seed(seed)
        batch, width, dim = 3, 30, 16
        n = torch.randint(1, width + 1, (batch,), generator=gen)
        n[0] = width
        valid = torch.arange(width)[None] < n[:, None]
        # clusters of near-duplicates along orthogonal axes: cosines are ~1 or ~0, never near tau
        axes = torch.randint(0, dim, (batch, width), generator=gen)
        feats = F.one_hot(axes, dim).float() * 3 + 0.1 * torch.randn(batch, width, dim, generator=gen)
        sal = torch.randint(0, 6, (batch, width), generator=gen).float()  # many ties
        sal = torch.where(valid, sal, 0.0)
        budget = (torch.rand(batch, generator=gen) * n).long().clamp(min=1)
        ctx = SimpleNamespace(visual_hidden=feats.where(valid[..., None], 0.0), visual_valid=valid, budget=budget)
        tau = 0.8 if seed % 2 else 0.5
        got = GivenSaliency(sal, layers=[1], keep=[1], tau=tau, nms=nms).select(ctx)
        for b in range(batch):
            expected = reference_nms_picks(sal[b, : int(n[b])], feats[b, : int(n[b])], int(budget[b]), tau, nms)
            row = got[b][got[b] >= 0].tolist()
            assert row == expected, (seed, b)


def test_real_run_picks_equal_python_reference(model_cache):
    model = model_cache("qwen2_vl", "eager")
    inputs = tiny_inputs(model, images_per_prompt=(2, 1), padding_side="left")
    rec = Recorder(layers=[1, 3], keep=[7, 3])
    _prefill(model, rec, inputs)
    for r in rec.records:
        for b in range(2):
            n = int(r["visual_valid"][b].sum())
            expected = reference_nms_picks(r["saliency"][b][:n], r["visual_hidden"][b][:n], int(r["budget"][b]), 0.8)
            assert r["picks"][b][r["picks"][b] >= 0].tolist() == expected


# -------------------------------------------------------------------- loss rows per sample (padding)
def test_loss_rows_are_the_k_valid_tokens_before_the_last():
    valid = torch.tensor([
        [0, 0, 1, 1, 1, 1, 1, 1],  # left padding
        [1, 1, 1, 1, 1, 1, 0, 0],  # right padding
        [1, 0, 1, 1, 0, 1, 1, 1],  # holes (filler slots)
        [0, 0, 0, 0, 0, 0, 1, 1],  # shorter than K + 1
    ], dtype=torch.bool)
    rows, ok = PIOFVLM(layers=[1], keep=[1]).loss_rows(SimpleNamespace(token_valid=valid))
    got = [r[o].tolist() for r, o in zip(rows, ok)]
    assert got == [[3, 4, 5, 6], [1, 2, 3, 4], [2, 3, 5, 6], [6]]


# --------------------------------------------------------- batch with padding == each sample alone
def _sample(model, inputs, prompts, b):
    """Sample ``b`` of a ``tiny_batch`` batch, unpadded, as its own batch of one (its images collated
    by the family's tiny spec)."""
    spec = spec_for(family_of(model))
    keep = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b : b + 1, keep]
    out = {"input_ids": ids, "attention_mask": torch.ones(1, int(keep.sum()), dtype=torch.long), **spec.extra_inputs(ids)}
    if prompts[b]:
        out.update(spec.collate([prompts[b]], model.dtype))
    return out


@pytest.mark.parametrize("family,attn,images", [
    *[(f, "sdpa", (1, 2)) for f in FAMILIES],
    ("llava", "eager", (1, 2)),
    ("qwen2_vl", "eager", (2, 1)),  # the padded sample has one image, the other two
])
def test_batched_saliency_equals_each_sample_alone(model_cache, family, attn, images):
    model = model_cache(family, attn)
    inputs, prompts = tiny_batch(model, images_per_prompt=images, padding_side="left")
    assert not bool(inputs["attention_mask"].all())  # someone is padded
    batched = Recorder(layers=[1, 2], keep_fraction=[0.5, 0.25])
    _prefill(model, batched, inputs)
    for b in range(len(images)):
        alone = Recorder(layers=[1, 2], keep_fraction=[0.5, 0.25])
        _prefill(model, alone, _sample(model, inputs, prompts, b))
        for rb, ra in zip(batched.records, alone.records, strict=True):
            n = int(ra["visual_valid"][0].sum())
            assert int(rb["visual_valid"][b].sum()) == n
            expected = ra["saliency"][0, :n]
            torch.testing.assert_close(rb["saliency"][b, :n], expected, atol=1e-5 * float(expected.max()), rtol=1e-4)
            k = int(ra["budget"][0])
            assert rb["picks"][b, :k].tolist() == ra["picks"][0, :k].tolist()


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", IMPLS)
def test_generate_end_to_end(model_cache, family, attn):
    model = model_cache(family, attn)
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    keep = [7, 3]
    with fvlm.prune(model, "pio_fvlm", layers=[1, 2], keep=keep) as session:
        with pytest.raises(fvlm.GradientUnavailableError, match="inference_mode"):
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    trace = session.trace
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert [s.where for s in trace.stages] == [1, 2]
    expected = [layer_average(list(zip([1, 2], keep)), 4, n) for n in trace.original_visual]
    assert trace.layer_average == pytest.approx(expected)
    assert [row[-1] for row in trace.visual_per_layer] == [3, 3]
    assert all(p.grad is None for p in model.parameters())


def test_default_schedule_needs_a_deep_enough_model(model_cache):
    with pytest.raises(fvlm.FVLMError, match="after layer 15 is out of range"):
        fvlm.prune(model_cache("llava", "sdpa"), "pio_fvlm")


def test_average_schedule_runs_as_fractions_of_the_original_count(model_cache):
    model = model_cache("llava", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    sel = PIOFVLM(layers=[1, 2], average=8, n_visual=16)
    with fvlm.prune(model, sel) as session, torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    info = session.info
    counts = sel.counts(info)
    assert layer_average(list(zip([1, 2], counts)), 4, 16) == pytest.approx(8, abs=1 / 4)
    assert session.trace.stages[0].budget == [counts[0], sel.counts(info, 32)[0]]
    assert session.trace.layer_average[0] == pytest.approx(layer_average(list(zip([1, 2], counts)), 4, 16))


# ------------------------------------------------------------------------------ schedule derivation
def _info(num_layers=32):
    return ModelInfo(family="llava", num_layers=num_layers, hidden_size=4096, num_heads=32, num_kv_heads=32,
                     head_dim=128, intermediate_size=11008, vocab_size=32000)


def test_default_is_the_authors_average_128_schedule():
    sel = PIOFVLM()
    assert sel.counts(_info()) == [218, 128, 54]
    assert sel.counts(_info()) == PIOFVLM(average=128).counts(_info())
    assert layer_average(list(zip([1, 10, 15], [218, 128, 54])), 32, 576) == 128.0
    stages = sel.stages(_info())
    assert [s.where for s in stages] == [1, 10, 15]
    assert [round(576 * s.keep) for s in stages] == [218, 128, 54]
    assert fvlm.create_selector("pio_fvlm").counts(_info()) == [218, 128, 54]


@pytest.mark.parametrize("target", [64, 100, 128, 192])
def test_average_derives_counts_with_that_layer_average(target):
    counts = PIOFVLM(average=target).counts(_info())
    assert counts == sorted(counts, reverse=True) and min(counts) >= 1
    assert layer_average(list(zip([1, 10, 15], counts)), 32, 576) == target  # exactly


def test_average_64_derives_the_authors_schedule():
    assert PIOFVLM(average=64).counts(_info()) == AUTHORS_SCHEDULES["llava15_avg64"]["keep"] == [92, 54, 22]


@pytest.mark.parametrize("layers", [[1, 4, 7], [2, 3, 9], [1, 2]])
def test_counts_for_average_is_as_close_as_any_schedule(layers):
    """Against every non-increasing schedule of a small model (brute force): no schedule gets
    closer to the target layer average."""
    from fvlm.selectors.schedules import counts_for_average

    n, depth = 24, 12
    schedules = [c for c in itertools.product(range(n + 1), repeat=len(layers)) if list(c) == sorted(c, reverse=True)]
    averages = [layer_average(list(zip(layers, c)), depth, n) for c in schedules]
    for target in [x / 4 for x in range(4 * 3, 4 * n)]:
        try:
            got = counts_for_average(layers, target, depth, n, shape=[218, 128, 54][: len(layers)])
        except ValueError:
            assert min(averages) > target + 1e-9 or max(averages) < target - 1e-9  # really out of reach
            continue
        best = min(abs(a - target) for a in averages)
        assert abs(layer_average(list(zip(layers, got)), depth, n) - target) == pytest.approx(best, abs=1e-9)


def test_keep_and_keep_fraction_schedules():
    stages = PIOFVLM(keep=[92, 54, 22]).stages(_info())
    assert [(s.where, s.keep) for s in stages] == [(1, 92), (10, 54), (15, 22)]
    sel = PIOFVLM(layers=[2, 8], keep_fraction=[0.5, 0.25])
    assert [(s.where, s.keep) for s in sel.stages(_info())] == [(2, 0.5), (8, 0.25)]
    assert sel.counts(_info(), 576) == [288, 144]
    assert PIOFVLM(layers=[2], keep_fraction=[1]).stages(_info())[0].keep == 1.0  # an int 1 still means all
    # keep_ratio: of the count entering each stage, truncated (the authors' Qwen rule)
    sel = PIOFVLM(layers=[2, 8], keep_ratio=[0.5, 0.333])
    assert [(s.where, s.keep, s.rounding) for s in sel.stages(_info())] == [(2, 0.5, "floor"), (8, 0.333, "floor")]
    assert sel.counts(_info(), 576) == [288, 95]  # int(0.333 * 288) = 95
    stage = sel.stages(_info())[1]
    assert sel.keep_count(stage, torch.tensor([216, 1, 0]), torch.tensor([1296] * 3), torch.tensor([1] * 3)).tolist() == [71, 1, 0]


@pytest.mark.parametrize("kwargs,error,match", [  # every constructor check raises SelectorArgumentError
    (dict(keep=[200, 100, 50], average=64), ValueError, "only one of"),
    (dict(keep=[200, 100, 50], keep_fraction=[0.5, 0.2, 0.1]), ValueError, "only one of"),
    (dict(keep=[200, 100]), fvlm.SelectorArgumentError, "2 entries for 3 stages"),
    (dict(keep=[100, 200, 50]), fvlm.SelectorArgumentError, "must not increase"),
    (dict(keep=[100, 50, 0]), fvlm.SelectorArgumentError, ">= 1"),
    (dict(keep_fraction=[0.5, 0.6, 0.1]), fvlm.SelectorArgumentError, "must not increase"),
    (dict(keep_fraction=[1.5, 0.6, 0.1]), fvlm.SelectorArgumentError, r"\(0, 1\]"),
    (dict(layers=[1, 10, 10]), ValueError, "strictly increasing"),
    (dict(layers=[0, 10, 15]), ValueError, ">= 1"),
    (dict(layers=[]), ValueError, "at least one"),
    (dict(average=600), fvlm.SelectorArgumentError, "exceeds the assumed input"),
    (dict(average=-1), fvlm.SelectorArgumentError, "> 0"),
    (dict(k_last=0), ValueError, "k_last"),
    (dict(tau=1.5), ValueError, "tau"),
    (dict(proxy_block="previous"), ValueError, "proxy_block"),
    (dict(head_rows="some"), ValueError, "head_rows"),
    (dict(proxy_head="lm"), ValueError, "proxy_head"),
    (dict(keep_ratio=[0.5, 0.5]), fvlm.SelectorArgumentError, "2 entries for 3 stages"),
    (dict(keep_ratio=[0.5, 1.5, 0.5]), fvlm.SelectorArgumentError, r"\(0, 1\]"),
    (dict(keep=[200, 100, 50], keep_ratio=[0.5, 0.5, 0.5]), ValueError, "only one of"),
    (dict(keep="218"), TypeError, "must be a list"),
    (dict(average=True), TypeError, "finite number"),
])
def test_bad_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match) as exc:
        PIOFVLM(**kwargs)
    assert isinstance(exc.value, fvlm.SelectorArgumentError)


def test_unreachable_average_raises_at_schedule_time():
    with pytest.raises(fvlm.BudgetError, match="cannot reach a layer average of 10"):
        PIOFVLM(average=10).stages(_info())  # layer 1 alone already averages 576 / 32 = 18
    with pytest.raises(fvlm.FVLMError, match="out of range"):
        PIOFVLM().stages(_info(num_layers=12))
