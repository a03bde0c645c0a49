"""Diversity and vision-side baselines: DivPrune and VisionZip."""
from __future__ import annotations

import torch

from fvlm import budget
from fvlm.errors import UnsupportedModelError
from fvlm.selectors.algorithms import cls_dominant_and_contextual, max_min_diversity
from fvlm.selectors.arguments import check_int, fail
from fvlm.selectors.base import Need, Selection, SingleStageSelector, Stage, TokenSelector


class DivPrune(SingleStageSelector):
    """DivPrune (CVPR'25, arXiv 2503.02175): greedy max-min diversity on cosine distance.

    Runs on the LLM input embeddings by default (any stage works). The first pick is the token whose
    nearest neighbour is farthest; each next pick maximises its minimum distance to the picks.
    A running minimum makes it O(kN) with the same picks as the official O(k^2 N) loop; distances
    in float32 (the authors: the model dtype, whose fp16 ties change a few picks). Default keep
    0.098 of the visual tokens (the paper's ratio, 56 of 576 by [`count`][fvlm.types.Stage.count]).
    Positions: compact, like the authors' LLaVA (the kept tokens are followed directly by the text).
    """

    positions = "compact"

    def __init__(self, keep: int | float = 0.098, layer: int | str = "input"):
        super().__init__(keep, layer)

    def select(self, ctx):
        return max_min_diversity(ctx.visual_hidden, ctx.visual_valid, ctx.budget)


class VisionZip(TokenSelector):
    """VisionZip (CVPR'25, arXiv 2412.04467): dominant CLS-attention tokens + merged contextual tokens.

    At the vision stage (text-agnostic), per image, from the vision layer that feeds the projector:
    ``dominant`` counts the CLS token as the authors do, so the top ``dominant - 1`` patches by
    CLS attention (summed over heads) plus the CLS token itself (54 = 53 patches + CLS);
    ``contextual`` targets at a uniform stride over the remaining patches absorb every other one
    by key similarity (target + mean of its members, merged before the projector).

    The LLM sees, per image and exactly as in the authors' code, ``[projected CLS, dominant patches
    (spatial order), contextual tokens (target order)]`` in place of the image's 576 tokens, with
    compact positions (``positions = "compact"``, LLaVA rebuilds them). HF LLaVA drops the CLS token
    before the projector, so fvlm projects the CLS feature itself; the kept slots are carried by the
    dominant and target patches plus one unused patch for the CLS token (so ``positions="original"``
    gives each token its carrier's id). Each image keeps ``dominant + contextual`` tokens
    ([`keep_count`][fvlm.selectors.diversity.VisionZip.keep_count]). Supports LLaVA-1.5-style backbones (CLS token, one tile per image);
    LLaVA-NeXT and Qwen raise a clear error.
    """

    needs = frozenset({Need.VISION_ATTENTION, Need.GRID})
    positions = "compact"
    example_kwargs = {"dominant": 5, "contextual": 3}

    def __init__(self, dominant: int = 54, contextual: int = 10):
        self.dominant = check_int(self, dominant, "dominant", minimum=1)  # counts the CLS token
        self.contextual = check_int(self, contextual, "contextual", minimum=0)

    @staticmethod
    def split(total: int) -> dict:
        """``dominant`` and ``contextual`` for ``total`` tokens per image at the authors' ratio 54 : 10
        (64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30)."""
        dominant = max(1, int(round(total * 54 / 64)))
        return {"dominant": dominant, "contextual": total - dominant}

    @classmethod
    def for_average(cls, average, info, original, **params):
        """VisionZip prunes before the LLM, so its layer average is its count: [`split`][fvlm.selectors.diversity.VisionZip.split] of it."""
        budget.check_average(average, original)
        return {**params, **cls.split(int(round(average)))}

    @classmethod
    def budget_parameter(cls):
        return "dominant + contextual"

    def stages(self, info):
        if info.family != "llava":
            raise UnsupportedModelError(
                f"visionzip needs a CLS-token vision tower with one tile per image (LLaVA-1.5); "
                f"{info.family} is not supported"
            )
        return [Stage("vision", self.dominant + self.contextual)]

    def keep_count(self, stage, current, original, images):
        return images * (self.dominant + self.contextual)

    def select(self, ctx):
        probe = ctx.vision
        if probe.cls_features is None:
            raise UnsupportedModelError("visionzip: the backbone adapter does not expose the vision CLS feature")
        rows, embeds = [], []
        for b, grids in enumerate(ctx.grids):
            index, parts = [], []
            for i, grid in enumerate(grids):
                span = slice(grid.offset, grid.offset + grid.length)
                dom, tgt, merged = cls_dominant_and_contextual(
                    probe.cls_attention[b:b + 1, span], probe.keys[b:b + 1, span], probe.features[b:b + 1, span],
                    ctx.visual_valid[b:b + 1, span], self.dominant - 1, self.contextual)
                dom, tgt = dom[0][dom[0] >= 0], tgt[0][tgt[0] >= 0]
                used = set(dom.tolist()) | set(tgt.tolist())
                cls_slot = next(j for j in range(grid.length) if j not in used)
                index += [grid.offset + j for j in [cls_slot, *dom.tolist(), *tgt.tolist()]]
                parts += [ctx.project(probe.cls_features[b, i:i + 1]).to(ctx.hidden.dtype),
                          ctx.visual_hidden[b, grid.offset + dom],
                          ctx.project(merged[0, : len(tgt)]).to(ctx.hidden.dtype)]
            rows.append(torch.tensor(index, dtype=torch.long))
            embeds.append(torch.cat(parts) if parts else ctx.hidden.new_zeros(0, ctx.hidden.shape[-1]))
        index = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1).to(ctx.hidden.device)
        return Selection(index, torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True))
