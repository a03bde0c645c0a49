"""The refusals of what transformers 5.17 gets wrong in generate (fvlm.adapters.versions). On the
oldest CI leg the contract and session tests meet them through generate; here the check is run on
the keyword arguments 5.17's generate passes, with the installed release set to 5.17."""
from __future__ import annotations

import pytest
import torch

import fvlm
from fvlm.adapters import versions
from fvlm.errors import UnsupportedModelError
from fvlm.testing import tiny_inputs


def test_release_reads_major_and_minor():
    assert versions.release("5.17.0") == (5, 17) and versions.release("5.24.0.dev0") == (5, 24)
    assert versions.release("6.0rc1") == (6, 0)


def _first_call(inputs, copies=1, **extra):
    """The top-level keyword arguments of 5.17's generate at its first step (inputs repeated for beams)."""
    kwargs = {k: v.repeat_interleave(copies, dim=0) for k, v in inputs.items()}
    return dict(kwargs, logits_to_keep=1, **extra)


@pytest.fixture
def old(monkeypatch):
    monkeypatch.setattr(versions, "TRANSFORMERS", (5, 17))


def test_beam_copies_of_per_image_inputs_are_refused(model_cache, old):
    model = model_cache("llava", "sdpa")
    two = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")  # 3 images for 2 prompts
    with pytest.raises(UnsupportedModelError, match=r"transformers .* wrong images .*6 per-image .*4 rows.*>= 5\.19"):
        versions.check_generate_call(model, _first_call(two, copies=2), use_cache=True)
    versions.check_generate_call(model, _first_call(two), use_cache=True)  # no copies
    one = tiny_inputs(model, images_per_prompt=(1, 1), padding_side="left")  # one image per row: right
    versions.check_generate_call(model, _first_call(one, copies=2), use_cache=True)
    # families that expand their own vision inputs for generate (Qwen in 5.17) are not refused: on
    # the oldest CI leg the contract tests and `fvlm run` with beams on Qwen2-VL show it


def test_cache_free_generate_is_refused_before_anything_runs(model_cache, old):
    model = model_cache("llava", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    with pytest.raises(UnsupportedModelError, match=r"generate\(use_cache=False\).*>= 5\.19"):
        versions.check_generate_call(model, _first_call(inputs), use_cache=False)
    versions.check_generate_call(model, dict(inputs), use_cache=False)  # a direct forward call
    calls = []
    hook = model.model.language_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with fvlm.prune(model, "random", keep=4, seed=0), torch.no_grad():
            with pytest.raises(UnsupportedModelError, match=">= 5.19"):
                model.generate(**inputs, max_new_tokens=2, do_sample=False, use_cache=False)
            model(**inputs, use_cache=False)  # direct cache-free forward calls stay supported
    finally:
        hook.remove()
    assert len(calls) == 1  # the refused call did not reach the language model


def test_fixed_releases_refuse_nothing(model_cache, monkeypatch):
    monkeypatch.setattr(versions, "TRANSFORMERS", versions.FIXED_IN)
    model = model_cache("llava", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    versions.check_generate_call(model, _first_call(inputs, copies=2), use_cache=False)
