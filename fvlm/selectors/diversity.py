"""Diversity and vision-side baselines: DivPrune and VisionZip."""
from __future__ import annotations

import torch

from fvlm.errors import UnsupportedModelError
from fvlm.selectors.algorithms import cls_dominant_and_contextual, max_min_diversity
from fvlm.selectors.arguments import check_int, check_keep, check_where, fail
from fvlm.selectors.base import Need, Selection, Stage, TokenSelector


class DivPrune(TokenSelector):
    """DivPrune (CVPR'25, arXiv 2503.02175): greedy max-min diversity on cosine distance.

    Runs on the LLM input embeddings by default (any stage works). The first pick is the token whose
    nearest neighbour is farthest; each next pick maximises its minimum distance to the picks.
    A running minimum makes it O(kN) with the same picks as the official O(k^2 N) loop.
    Default keep 0.098 of the visual tokens (the paper's ratio, about 56 of 576).
    """

    def __init__(self, keep: int | float = 0.098, layer: int | str = "input"):
        self.keep = check_keep(self, keep)
        self.layer = check_where(self, layer)

    def stages(self, info):
        return [Stage(self.layer, self.keep)]

    def select(self, ctx):
        return max_min_diversity(ctx.visual_hidden, ctx.visual_valid, ctx.budget)


class VisionZip(TokenSelector):
    """VisionZip (CVPR'25, arXiv 2412.04467): dominant CLS-attention tokens + merged contextual tokens.

    At the vision stage (text-agnostic): CLS->patch attention of the vision layer that feeds the
    projector, summed over heads, picks ``dominant`` tokens; ``contextual`` targets at a uniform
    stride over the rest absorb every other remaining token by key similarity (target + mean of its
    members, merged before the projector and then projected). Supports LLaVA-1.5-style backbones
    (CLS token, one tile per image); LLaVA-NeXT and Qwen raise a clear error.

    Differences from the official code: HF LLaVA has no placeholder for the CLS token, so fvlm keeps
    ``dominant`` patches where the authors keep ``dominant - 1`` patches plus CLS; kept tokens stay in
    spatial order (with their original positions) instead of dominant-then-contextual; with several
    images in one prompt the budget is shared across them (the authors handle one image).
    """

    needs = frozenset({Need.VISION_ATTENTION})
    example_kwargs = {"dominant": 5, "contextual": 3}

    def __init__(self, dominant: int = 54, contextual: int = 10):
        self.dominant = check_int(self, dominant, "dominant", minimum=0)
        self.contextual = check_int(self, contextual, "contextual", minimum=0)
        if dominant + contextual < 1:
            raise fail(self, "dominant + contextual", "at least 1 (the tokens VisionZip keeps)", dominant + contextual)

    def stages(self, info):
        if info.family != "llava":
            raise UnsupportedModelError(
                f"visionzip needs a CLS-token vision tower with one tile per image (LLaVA-1.5); "
                f"{info.family} is not supported"
            )
        return [Stage("vision", self.dominant + self.contextual)]

    def select(self, ctx):
        probe = ctx.vision
        dom, tgt, merged = cls_dominant_and_contextual(
            probe.cls_attention, probe.keys, probe.features, ctx.visual_valid, self.dominant, self.contextual
        )
        index = torch.cat([dom, tgt], dim=1)
        embeds = torch.cat([ctx.visual_hidden.gather(1, dom.clamp(min=0)[..., None].expand(-1, -1, ctx.hidden.shape[-1])),
                            ctx.project(merged).to(ctx.hidden.dtype)], dim=1)
        order = torch.where(index >= 0, index, index.shape[1] + ctx.visual_index.shape[1]).argsort(dim=1)
        index = index.gather(1, order)
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        return Selection(index, embeds)
