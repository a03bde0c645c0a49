"""Contract tests generated from the registry: every registered selector (plugins included)."""
from __future__ import annotations

import pytest
import torch

import fvlm
from fvlm.errors import UnsupportedModelError
from fvlm.registry import get_selector_class
from fvlm.testing import tiny_inputs

NAMES = fvlm.list_selectors()
FAMILIES = ("llava", "qwen2_vl")


def _run(model, name, inputs):
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
    instructions = [f"question {b}: what is in the picture?" for b in range(inputs["input_ids"].shape[0])]
    with fvlm.prune(model, selector, instructions=instructions), torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return selector, calls


def test_plugin_and_builtins_are_registered():
    assert {"keep_all", "random", "uniform", "example_norm"} <= set(NAMES)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_selector_contract(model_cache, name, family):
    model = model_cache(family, "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    try:
        selector, calls = _run(model, name, inputs)
    except UnsupportedModelError as err:
        pytest.skip(f"{name} does not support {family}: {err}")
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
