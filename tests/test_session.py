"""Tests of the pruning session (tiny random models, CPU). The oracles every family passes (keep-all,
sliced inputs, cached == recomputed decoding) are in test_family_matrix.py."""
from __future__ import annotations

import pytest
import torch

import fvlm
from fvlm.testing import tiny_inputs
from helpers import EveryOther, FixedSelector, GradientNorm, greedy_without_cache, hook_count

IMPLS = ("eager", "sdpa")


def _generate(model, inputs, steps=5, **kw):
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, **kw)


SCHEDULES = {
    "layer2": [(2, 5)],
    "multi": [("input", 10), (1, 6), (2, 3)],
}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_trace_matches_real_cache_and_schedule(model_cache, family):
    model = model_cache(family, "eager")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    with fvlm.prune(model, EveryOther(SCHEDULES["multi"])) as session:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    trace = session.trace
    cache = out.past_key_values
    assert trace.kv_length == [cache.layers[i].keys.shape[-2] for i in range(len(cache.layers))]
    assert trace.visual_per_layer == [[10, 6, 3, 3], [10, 6, 3, 3]]
    assert trace.layer_average == [5.5, 5.5]
    assert [s.where for s in trace.stages] == ["input", 1, 2]


def test_prompt_without_image_is_left_alone(model_cache):
    model = model_cache("llava", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(0, 1), padding_side="left")
    reference = _generate(model, inputs)
    with fvlm.prune(model, "random", keep=4, seed=1) as session:
        pruned = _generate(model, inputs)
    assert torch.equal(pruned[0], reference[0])
    assert session.trace.original_visual == [0, 16]
    assert session.trace.llm_input_visual == [0, 4]


def test_hooks_removed_on_exit_and_on_exception(model_cache):
    model = model_cache("llava", "sdpa")
    before = hook_count(model)
    with fvlm.prune(model, "random", keep=4, layer=2):
        assert hook_count(model) > before
    assert hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with fvlm.prune(model, "random", keep=4, layer=2):
            raise RuntimeError("boom")
    assert hook_count(model) == before
    inputs = tiny_inputs(model, images_per_prompt=(1, 1))
    with pytest.raises(fvlm.BudgetError):
        with fvlm.prune(model, "random", keep=999):
            _generate(model, inputs)
    assert hook_count(model) == before


class CountingRandom(fvlm.TokenSelector):
    """Fresh random picks at every call, counting how often the session asks for them."""

    def __init__(self):
        self.calls = 0

    def stages(self, info):
        return [fvlm.Stage(2, 4)]

    def select(self, ctx):
        self.calls += 1
        return torch.stack([torch.randperm(int(n))[:4].sort().values for n in ctx.num_visual]).to(ctx.hidden.device)


def test_only_a_cache_free_continuation_reuses_the_prompt_selection(model_cache):
    """generate(use_cache=False) selects once; a new call, even one that extends the last prompt, selects again."""
    model = model_cache("llava", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    selector = CountingRandom()
    with fvlm.prune(model, selector) as session, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
        assert selector.calls == 1 and session.trace.decode_steps == 3
        longer = dict(inputs, input_ids=out, attention_mask=torch.ones_like(out))
        longer["attention_mask"][:, : inputs["input_ids"].shape[1]] = inputs["attention_mask"]
        model.generate(**longer, max_new_tokens=2, do_sample=False, use_cache=False)  # a new call: new images
        assert selector.calls == 2
        model.generate(**longer, max_new_tokens=2, do_sample=False)  # with a cache: a new prefill
        assert selector.calls == 3


def test_nested_sessions_on_one_model_are_refused_at_enter(model_cache):
    model = model_cache("llava", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    with fvlm.prune(model, "random", keep=4, seed=1) as outer:
        hooks = hook_count(model)
        inner = fvlm.prune(model, "uniform", keep=2)
        with pytest.raises(fvlm.FVLMError, match="already pruning .*RandomSelector.*use compose"):
            inner.__enter__()
        assert hook_count(model) == hooks  # the refused session attached nothing
        alone = _generate(model, inputs)
    assert outer.trace.llm_input_visual == [4, 4]
    with fvlm.prune(model, "random", keep=4, seed=1):  # free again after the outer session ended
        assert torch.equal(_generate(model, inputs), alone)
    other = model_cache("qwen2_vl", "sdpa")
    with fvlm.prune(model, "random", keep=4), fvlm.prune(other, "random", keep=4):  # two models: fine
        pass


@pytest.mark.parametrize("where", ["input", 2])
def test_compact_positions_match_renumbered_reference(model_cache, where):
    """Compact policy: kept tokens get contiguous positions; decode continues from the new end."""
    model = model_cache("llava", "eager")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    with fvlm.prune(model, EveryOther([(where, 6)]), positions="compact") as session, torch.no_grad():
        cached = _generate(model, inputs, steps=5)
        reference = greedy_without_cache(model, inputs, steps=5)
    assert torch.equal(cached, reference)
    with fvlm.prune(model, EveryOther([(where, 6)])), torch.no_grad():
        original = _generate(model, inputs, steps=5)
    assert session.trace.layer_average != [16.0, 32.0]
    assert not torch.equal(original, cached) or where == 2  # positions matter at the input


def test_compact_input_positions_are_contiguous(model_cache):
    model = model_cache("llava", "eager")
    inputs = tiny_inputs(model, images_per_prompt=(1,), padding_side="left")
    seen = {}
    handle = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.update(k), with_kwargs=True
    )
    try:
        with fvlm.prune(model, EveryOther([("input", 6)]), positions="compact"), torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    n = seen["position_ids"].shape[-1]
    assert seen["position_ids"].flatten().tolist() == list(range(n))


def test_compact_positions_rejected_for_mrope(model_cache):
    with pytest.raises(fvlm.FVLMError, match="M-RoPE"):
        fvlm.prune(model_cache("qwen2_vl", "sdpa"), "random", keep=4, positions="compact")


def test_position_policy_is_the_selectors_unless_given(model_cache):
    llava, qwen = model_cache("llava", "sdpa"), model_cache("qwen2_vl", "sdpa")
    assert fvlm.prune(llava, "fastv").positions == "original"  # FastV's authors keep original ids
    assert fvlm.prune(llava, "divprune", keep=4).positions == "compact"  # DivPrune's renumber
    assert fvlm.prune(llava, "divprune", keep=4, positions="original").positions == "original"
    assert fvlm.prune(llava, "fastv", positions="compact").positions == "compact"
    assert fvlm.prune(qwen, "divprune", keep=4).positions == "original"  # compact is not defined for M-RoPE
    inputs = tiny_inputs(llava, images_per_prompt=(1, 1))
    with fvlm.prune(llava, "divprune", keep=4) as session, torch.no_grad():
        llava(**inputs)
    assert session.trace.positions == "compact"
    with pytest.raises(ValueError, match="positions"):
        fvlm.prune(llava, "fastv", positions="relative")


class Reordered(EveryOther):
    """Keeps every other visual token but puts them in reverse order (selections may reorder)."""

    def select(self, ctx):
        picks = super().select(ctx)
        return torch.where(picks >= 0, picks, -1).flip(1).sort(dim=1, descending=True).values


@pytest.mark.parametrize("family,positions", [("llava", "compact"), ("llava", "original"), ("qwen2_vl", "original")])
def test_reordered_selection_is_causal_in_sequence_order(model_cache, family, positions):
    """Masks follow the sequence order of a reordered selection: a padded batch answers like each
    prompt alone, and cached decoding equals recomputing (compact ids are not defined for M-RoPE)."""
    model = model_cache(family, "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 1), padding_side="left")
    selector = Reordered([(2, 6)])
    with fvlm.prune(model, selector, positions=positions), torch.no_grad():
        batch = model(**inputs).logits[:, -1]
        cached = _generate(model, inputs, steps=4)
        reference = greedy_without_cache(model, inputs, steps=4)
        for b in range(2):
            keep = inputs["attention_mask"][b].bool()
            single = {k: v[b:b + 1, keep] if v.dim() == 2 and v.shape[1] == keep.shape[0] else v
                      for k, v in inputs.items()}
            if family == "llava":
                single["pixel_values"] = inputs["pixel_values"][b:b + 1]
            else:  # qwen: one image per sample, patches in batch order
                split = inputs["image_grid_thw"].prod(dim=1).tolist()
                single["pixel_values"] = inputs["pixel_values"].split(split)[b]
                single["image_grid_thw"] = inputs["image_grid_thw"][b:b + 1]
            torch.testing.assert_close(model(**single).logits[0, -1], batch[b], atol=1e-4, rtol=1e-4)
    assert torch.equal(cached, reference)


def test_bad_inputs_raise_clear_errors(model_cache):
    model = model_cache("llava", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 1))
    with pytest.raises(fvlm.BudgetError, match="exceeds the 16 visual tokens"):
        with fvlm.prune(model, "random", keep=17):
            _generate(model, inputs)
    with pytest.raises(fvlm.UnknownSelectorError, match="rnadom"):
        fvlm.prune(model, "rnadom")
    with pytest.raises(fvlm.FVLMError, match="out of range"):
        fvlm.prune(model, "random", keep=4, layer=4)
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(fvlm.UnsupportedModelError, match="LlamaForCausalLM"):
        fvlm.prune(text_only, "random")
    with pytest.raises(TypeError, match="registered selector name"):
        fvlm.prune(model, FixedSelector([[0]]), keep=3)


def test_gradient_selector_under_inference_mode_is_rejected(model_cache):
    model = model_cache("llava", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 1))
    with fvlm.prune(model, GradientNorm()):
        with pytest.raises(fvlm.GradientUnavailableError, match="inference_mode"):
            with torch.inference_mode():
                _generate(model, inputs)
        with torch.no_grad():
            out = _generate(model, inputs)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    assert all(p.grad is None for p in model.parameters())


def test_selection_contract_is_enforced(model_cache):
    model = model_cache("llava", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 1))
    with fvlm.prune(model, FixedSelector([[0, 0], [1, 2]])):
        with pytest.raises(fvlm.SelectionError, match="sample 0"):
            _generate(model, inputs)
    with fvlm.prune(model, FixedSelector([[0, 16], [1, 2]])):
        with pytest.raises(fvlm.SelectionError, match="unique indices in \\[0, 16\\)"):
            _generate(model, inputs)


def test_undeclared_probe_is_an_error(model_cache):
    class Sneaky(GradientNorm):
        needs = frozenset()

    model = model_cache("llava", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 1))
    with fvlm.prune(model, Sneaky()), pytest.raises(fvlm.FVLMError, match="does not declare Need.GRADIENT"):
        _generate(model, inputs)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("attn", IMPLS)
def test_unequal_budgets_without_padding(model_cache, family, attn):
    """Equal-length prompts (no padding, so no mask) whose samples keep different counts:
    the filler slots must be masked in prefill and in every decode step."""
    model = model_cache(family, attn)
    extra = 2 if family == "qwen2_vl" else 0  # Qwen wraps each image in vision start/end tokens
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), text_lengths=[26 + extra, 10])
    assert bool(inputs["attention_mask"].all())
    selector = EveryOther([(1, 0.5), (2, 0.25)])
    with fvlm.prune(model, selector) as session, torch.no_grad():
        cached = _generate(model, inputs, steps=5)
        reference = greedy_without_cache(model, inputs, steps=5)
    assert torch.equal(cached, reference)
    assert [row[1:] for row in session.trace.visual_per_layer] == [[8, 4, 4], [16, 8, 8]]
    for b in range(2):  # each sample alone (no fillers) generates the same tokens
        single = {k: v[b : b + 1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in inputs.items()}
        single.update(_image_slice(model, inputs, b))
        with fvlm.prune(model, selector), torch.no_grad():
            alone = _generate(model, single, steps=5)
        assert torch.equal(alone[0], cached[b])


def _image_slice(model, inputs, b):
    """Pixel inputs of sample ``b`` alone (sample 0 has 1 image, sample 1 has 2)."""
    images = [0] if b == 0 else [1, 2]
    if "image_grid_thw" in inputs:
        thw = inputs["image_grid_thw"]
        rows = thw.prod(-1)
        start = [0, *rows.cumsum(0).tolist()]
        pix = torch.cat([inputs["pixel_values"][start[i] : start[i + 1]] for i in images])
        return {"pixel_values": pix, "image_grid_thw": thw[images]}
    return {"pixel_values": inputs["pixel_values"][images]}
