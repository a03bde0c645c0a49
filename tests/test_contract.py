"""Contract tests generated from the registry: every registered selector (plugins included)."""
from __future__ import annotations

import contextlib

import pytest
import torch

import fvlm
from fvlm import testing
from fvlm.errors import UnsupportedModelError
from fvlm.registry import get_selector_class
from fvlm.testing import tiny_inputs

NAMES = fvlm.list_selectors()
FAMILIES = ("llava", "qwen2_vl")


def _questions(inputs) -> list[str]:
    """One instruction per prompt (instruction-conditioned selectors read them; the others ignore them)."""
    return [f"question {b}: what is in the picture?" for b in range(inputs["input_ids"].shape[0])]


def _run(model, name, inputs, **generate):
    """Generate under the selector; record every stage's context snapshot and selection."""
    cls = get_selector_class(name)
    selector = fvlm.create_selector(name, **cls.example_kwargs)
    calls = []
    original = selector.select

    def recording(ctx):
        before = (ctx.hidden.clone(), ctx.is_visual.clone(), ctx.token_valid.clone())
        out = original(ctx)
        after = (ctx.hidden, ctx.is_visual, ctx.token_valid)
        indices = out if isinstance(out, torch.Tensor) else out.indices
        calls.append(dict(indices=indices.clone(), budget=ctx.budget.clone(), num_visual=ctx.num_visual.clone(),
                          used=set(ctx.used), unmutated=all(torch.equal(a, b) for a, b in zip(before, after))))
        return out

    selector.select = recording
    with fvlm.prune(model, selector, instructions=_questions(inputs)) as session, torch.no_grad():
        out = model.generate(**inputs, **{"max_new_tokens": 3, "do_sample": False, **generate})
    selector.output, selector.trace = out, session.trace
    return selector, calls


def _run_or_skip(model, name, family, inputs, **generate):
    """:func:`_run`, skipping the test where the selector does not support the family."""
    try:
        return _run(model, name, inputs, **generate)
    except UnsupportedModelError as err:
        pytest.skip(f"{name} does not support {family}: {err}")


def test_plugin_and_builtins_are_registered():
    assert {"keep_all", "random", "uniform", "example_norm"} <= set(NAMES)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_selector_contract(model_cache, name, family):
    model = model_cache(family, "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    selector, calls = _run_or_skip(model, name, family, inputs)
    assert calls, f"{name} never selected anything"
    used = set()
    for call in calls:
        idx, budget, n = call["indices"], call["budget"], call["num_visual"]
        for b in range(idx.shape[0]):
            row = idx[b][idx[b] >= 0].tolist()
            assert len(row) == int(budget[b]), f"{name}: sample {b} keeps {len(row)} != budget {int(budget[b])}"
            assert len(set(row)) == len(row), f"{name}: duplicate indices {row}"
            assert all(0 <= i < int(n[b]) for i in row), f"{name}: index out of range {row}"
        assert call["unmutated"], f"{name} mutated its inputs"
        used |= call["used"]
    assert used == set(selector.needs), f"{name} declares {set(selector.needs)} but used {used}"
    _, again = _run(model, name, inputs)
    assert all(torch.equal(a["indices"], b["indices"]) for a, b in zip(calls, again)), f"{name} is not deterministic"


# -- expanded batches: beams and several returns repeat every prompt after the images are encoded --
EXPANDED = {
    "beams": dict(do_sample=False, num_beams=2, num_return_sequences=2),
    "sampling": dict(do_sample=True, num_return_sequences=2, top_k=0),
}


@pytest.mark.parametrize("how", sorted(EXPANDED))
@pytest.mark.parametrize("family", testing.FAMILIES)
def test_keep_all_on_expanded_batches_equals_unpruned(model_cache, family, how):
    model = model_cache(family, "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    outputs = []
    for session in (contextlib.nullcontext(), fvlm.prune(model, "keep_all")):
        torch.manual_seed(0)
        with session, torch.no_grad():
            outputs.append(model.generate(**inputs, max_new_tokens=3, **EXPANDED[how]))
    assert outputs[0].shape[0] == 4 and torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("family", testing.FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_selector_picks_the_same_tokens_for_every_beam(model_cache, name, family):
    """Each of a prompt's beam rows gets the picks of the prompt run alone (unexpanded)."""
    model = model_cache(family, "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    _, plain = _run_or_skip(model, name, family, inputs)
    _, beams = _run_or_skip(model, name, family, inputs, **EXPANDED["beams"])
    assert len(beams) == len(plain) > 0
    for one, expanded in zip(plain, beams):
        assert torch.equal(expanded["indices"], one["indices"].repeat_interleave(2, dim=0)), name


# -- text-only prompts: passed through unpruned, alone or next to prompts with images --------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_selector_passes_text_only_prompts_through(model_cache, name, family):
    model = model_cache(family, "sdpa")
    kwargs = get_selector_class(name).example_kwargs
    for images in ((0,), (0, 0), (0, 1), (1, 0, 2)):
        inputs = tiny_inputs(model, images_per_prompt=images, padding_side="left")
        with torch.no_grad():
            reference = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        try:
            with fvlm.prune(model, name, instructions=_questions(inputs), **kwargs) as session, torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        except UnsupportedModelError as err:
            pytest.skip(f"{name} does not support {family}: {err}")
        for b, n in enumerate(images):
            if n == 0:
                assert torch.equal(out[b], reference[b]), f"{name}: text-only row {b} of {images} changed"
                assert set(session.trace.visual_per_layer[b]) == {0}


# -- arguments: a bad budget fails when the selector is built (in a recipe: when it is parsed) -------
BAD_KEEPS = (-5, 16.5, 0.0, 0, float("nan"), "abc", True)


@pytest.mark.parametrize("name", [n for n in NAMES if "keep" in fvlm.selector_info(n).parameters])
def test_selector_refuses_a_bad_keep_when_built(name):
    for keep in BAD_KEEPS:
        with pytest.raises(fvlm.SelectorArgumentError, match="`keep`") as exc:
            fvlm.create_selector(name, keep=keep)
        assert "\n" not in str(exc.value), f"{name}: the message is not one line"


# -- generate(use_cache=False): the prompt's selection holds for every step, as with the cache -----
@pytest.mark.parametrize("family", testing.FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_uncached_generation_keeps_the_prefill_selection(model_cache, name, family):
    model = model_cache(family, "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    first, cached = _run_or_skip(model, name, family, inputs, max_new_tokens=5, use_cache=True)
    second, uncached = _run_or_skip(model, name, family, inputs, max_new_tokens=5, use_cache=False)
    assert len(uncached) == len(cached)  # selected once, in the first forward, not at every step
    assert all(torch.equal(a["indices"], b["indices"]) for a, b in zip(cached, uncached))
    assert torch.equal(first.output, second.output), f"{name}: uncached answers differ from cached ones"
    for field in ("original_visual", "llm_input_visual", "visual_per_layer", "prefill_length", "decode_steps"):
        assert getattr(first.trace, field) == getattr(second.trace, field), field  # the trace tells one story
    assert second.trace.decode_steps == 4
