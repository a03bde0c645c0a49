"""What transformers 5.17 (the oldest release fvlm supports) gets wrong in ``generate``, refused when
``generate`` first calls the model, before anything runs. 5.18 is excluded in ``pyproject.toml``: its
``generate`` gives beam copies of multi-image prompts the wrong images in every family.

* 5.17's generic ``generate`` expansion repeats per-image vision inputs (one entry per image, tile or
  patch, not per prompt) for beams and returned sequences the way it repeats per-prompt ones, so the
  copies of a prompt see other images than the prompt has; the unpruned model is wrong too. Families
  that expand their own inputs (Qwen) are right.
* 5.17's ``generate`` passes the images again at every cache-free step instead of the encoding of
  its first step, so a step of ``generate(use_cache=False)`` cannot be told from a new call whose
  prompt extends the last one (the session reuses a prompt's selection only in its own steps).
"""
from __future__ import annotations

import re

import torch
import transformers
from torch import nn
from transformers.generation.utils import GenerationMixin

from fvlm.errors import UnsupportedModelError


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``"5.17.0"`` or ``"5.24.0.dev0"``."""
    major, minor = (int(re.match(r"\d+", part).group()) for part in version.split(".")[:2])
    return major, minor


TRANSFORMERS = release(transformers.__version__)
FIXED_IN = (5, 18)  # generate expands per-image inputs per prompt copy and encodes images once per call
UPGRADE = "upgrade transformers to >= 5.19 (pip install -U 'transformers>=5.19,<6')"


def check_generate_call(model: nn.Module, kwargs: dict, use_cache: bool) -> None:
    """Refuse a first forward call of ``generate`` on the top-level ``model`` (keyword arguments
    ``kwargs``) that the installed transformers runs wrong or ambiguously; a no-op on fixed releases."""
    if TRANSFORMERS >= FIXED_IN:
        return
    ids, pixels = kwargs.get("input_ids"), kwargs.get("pixel_values")
    generic = getattr(type(model), "_expand_inputs_for_generation", None) is GenerationMixin._expand_inputs_for_generation
    if generic and ids is not None and torch.is_tensor(pixels) and ids.shape[0] > 1 and pixels.shape[0] != ids.shape[0]:
        valid = kwargs.get("attention_mask")
        rows = ids if valid is None else torch.where(valid.bool(), ids, -1)
        if bool((rows[1:] == rows[:-1]).all(dim=1).any()):  # copies of a prompt: beams / returns
            raise UnsupportedModelError(
                f"transformers {transformers.__version__} gives the copies of a prompt that generate makes "
                f"for beams or several returned sequences the wrong images ({pixels.shape[0]} per-image "
                f"vision inputs for {ids.shape[0]} rows), the unpruned model too: {UPGRADE}, or use "
                f"num_beams=1 and num_return_sequences=1")
    # generate passes logits_to_keep (every supported family takes it); direct forward calls rarely do
    if not use_cache and "logits_to_keep" in kwargs:
        raise UnsupportedModelError(
            f"with transformers {transformers.__version__}, fvlm cannot tell a step of generate(use_cache=False) "
            f"from a new call whose prompt extends the last one: {UPGRADE}, or generate with the cache "
            f"(use_cache=True, the default)")
