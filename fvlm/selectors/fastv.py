"""FastV: prune visual tokens by the attention they receive from the last prompt token.

Paper: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024, https://arxiv.org/abs/2403.06764

What it does (one stage, in prefill): layers ``0 .. k-1`` see every token; on the output of layer
``k-1`` (``Stage(k, keep)``: "after k decoder layers", so layer ``k`` is the first to see the
reduced sequence) each visual token is scored by the attention probability from the last prompt
token (query row) to it (key column) in layer ``k-1``, averaged over heads; the top ``keep`` visual
tokens stay (original order), every text token stays. No merging.

Needs: ``Need.ATTENTION`` -- one query row of layer ``k-1``, recomputed from that layer's own q/k
projections and rotary embedding, so the model may run SDPA or FlashAttention (no
``output_attentions``, no eager switch).

Defaults: ``k=2`` and ``keep=0.5`` (the paper's K=2, drop 50%). ``keep`` is a keep *count* (int)
or a fraction of each sample's original visual-token count (float in (0, 1]); ``keep=1.0`` is the
identity. A fraction becomes a count by ``rounding``: ``"round"`` (default, half to even) or
``"floor"``, the lmms-eval drop-in's ``int(N * ratio)``. The HF demo setting is
``FastV(k=3, keep=0.25)`` (it rounds the *drop* fraction, ``N - round(0.75 N)``, equal to
``round(0.25 N)`` unless ``0.75 N`` is a half-integer); the lmms-eval drop-in is
``FastV(k=3, keep=0.5, rounding="floor")``. For LLaVA's 576 tokens all of these give the same
counts. Positions: original ids with gaps (the authors' ``position_ids = keep_indexs``).

Deviations from the official code:

- One meaning for the ratio: a keep count or a keep fraction (the official files use a drop
  fraction, a keep fraction and a keep count in three different places).
- The KV cache is exact: layers ``< k`` cache every token, layers ``>= k`` cache the pruned
  sequence (the official KV-cache variant reuses layer K's pruned cache for all later layers; the
  lmms-eval drop-in runs layer K-1 twice and appends its KV twice).
- Batched with padding; visual tokens are located from the image token id, never at hard-coded
  offsets (35 / 576); multi-image prompts rank all of a sample's visual tokens together.
- Selection happens once per prefill; decode steps keep using the pruned cache.
"""
from __future__ import annotations

import torch

from fvlm.selectors.arguments import check_choice, check_int, check_keep
from fvlm.selectors.base import ROUNDING, Need, ScoreSelector, Stage


class FastV(ScoreSelector):
    """FastV (arXiv 2403.06764): keep the visual tokens the last prompt token attends to most.

    ``k``: prune after ``k`` decoder layers (layer ``k-1``'s attention scores, layer ``k`` and later
    see the reduced sequence); ``keep``: visual tokens kept (int count, or float fraction of the
    original count); ``rounding``: how a fraction becomes a count (``"round"`` or ``"floor"``).
    """

    needs = frozenset({Need.ATTENTION})
    example_kwargs = {"k": 2, "keep": 0.5}

    def __init__(self, k: int = 2, keep: int | float = 0.5, rounding: str = "round"):
        self.k = check_int(self, k, "k", minimum=1)  # prune after k decoder layers
        self.keep = check_keep(self, keep)
        self.rounding = check_choice(self, rounding, "rounding", ROUNDING)

    def stages(self, info):
        return [Stage(self.k, self.keep, self.rounding)]

    def score(self, ctx) -> torch.Tensor:
        # [B, H, 1, N]: last prompt token -> visual tokens, layer k-1 (the layer that just ran)
        return ctx.attention().mean(dim=1)[:, 0]
