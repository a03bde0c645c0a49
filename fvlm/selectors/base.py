"""The selector interface: what a token-reduction method declares and returns."""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch

from fvlm.types import ModelInfo, Need, Selection, Stage, Where  # noqa: F401  (the selector API's types)

if TYPE_CHECKING:
    from fvlm.context import SelectionContext


class TokenSelector(abc.ABC):
    """Base class of every token-reduction method.

    Subclasses configure themselves through a typed ``__init__`` (that signature is the recipe
    schema), declare ``needs``, return their schedule from ``stages`` and choose tokens in ``select``.
    """

    needs: ClassVar[frozenset[Need]] = frozenset()
    #: Keyword arguments that fit fvlm's tiny test backbones (4 layers, 8-88 visual tokens per image);
    #: the contract tests and docs create the selector with them.
    example_kwargs: ClassVar[dict] = {}

    @abc.abstractmethod
    def stages(self, info: "ModelInfo") -> Sequence[Stage]:
        """The stage schedule for a model (``info`` gives layer count, family, ...)."""

    @abc.abstractmethod
    def select(self, ctx: "SelectionContext") -> Selection | torch.Tensor:
        """Choose the visual tokens to keep at ``ctx.stage`` (``ctx.budget[b]`` per sample)."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class ScoreSelector(TokenSelector):
    """A selector that only scores tokens; the top-``budget`` per sample are kept in original order."""

    @abc.abstractmethod
    def score(self, ctx: "SelectionContext") -> torch.Tensor:
        """Scores ``[B, N]`` for the visual tokens (higher is kept first)."""

    def select(self, ctx: "SelectionContext") -> torch.Tensor:
        from fvlm.selectors.algorithms import topk_indices

        return topk_indices(self.score(ctx), ctx.visual_valid, ctx.budget)
