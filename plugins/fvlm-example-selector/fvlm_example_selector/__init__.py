"""An example out-of-tree fvlm selector, registered through the ``fvlm.selectors`` entry point."""
from __future__ import annotations

import torch

from fvlm.selectors.arguments import check_keep, check_where
from fvlm.selectors.base import ScoreSelector, Stage

__all__ = ["NormSelector"]


class NormSelector(ScoreSelector):
    """Keep the visual tokens whose hidden states have the largest L2 norm.

    ``keep`` is a count (int) or a fraction of the visual tokens (float); ``layer`` is where it
    prunes: ``"vision"``, ``"input"`` or the number of decoder layers run before pruning.
    """

    def __init__(self, keep: int | float = 0.25, layer: int | str = "input"):
        self.keep = check_keep(self, keep)  # a bad value fails here, when a recipe is parsed
        self.layer = check_where(self, layer)

    def stages(self, info):
        return [Stage(self.layer, self.keep)]

    def score(self, ctx) -> torch.Tensor:
        return ctx.visual_hidden.float().norm(dim=-1)  # [B, N, D] -> [B, N]
