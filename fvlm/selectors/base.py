"""The selector interface: what a token-reduction method declares and returns."""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch

from fvlm.types import (  # noqa: F401  (the selector API's types)
    POSITION_POLICIES,
    ROUNDING,
    ModelInfo,
    Need,
    Selection,
    Stage,
    Where,
)

if TYPE_CHECKING:
    from fvlm.auxiliary import AuxiliarySpec
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
    #: Position ids of the kept tokens in the method's authors' code: ``"original"`` (kept tokens keep
    #: their ids, with gaps; the default for a selector that does not say) or ``"compact"`` (renumbered
    #: contiguously in sequence order). A session uses it unless given ``positions=`` explicitly;
    #: ``"compact"`` resolves to ``"original"`` on M-RoPE backbones (Qwen), where fvlm keeps ids. An
    #: instance may set its own when the policy depends on an option (SparseVLM's ``version``).
    positions: str = "original"

    @abc.abstractmethod
    def stages(self, info: "ModelInfo") -> Sequence[Stage]:
        """The stage schedule for a model (``info`` gives layer count, family, ...)."""

    @abc.abstractmethod
    def select(self, ctx: "SelectionContext") -> Selection | torch.Tensor:
        """Choose the visual tokens to keep at ``ctx.stage`` (``ctx.budget[b]`` per sample)."""

    def keep_count(self, stage: Stage, current: torch.Tensor, original: torch.Tensor,
                   images: torch.Tensor) -> torch.Tensor:
        """``[B]`` visual tokens each sample keeps at ``stage`` (the session's ``ctx.budget``).

        ``current``: visual tokens entering the stage, ``original``: before any stage, ``images``:
        images in the prompt (all ``[B]`` long). Default :meth:`Stage.count` of ``original``; override
        when the authors' count depends on more (SparseVLM's recycled clusters, VisionZip per image).
        """
        return stage.count(original)

    def stage_budget(self, ctx: "SelectionContext") -> torch.Tensor:
        """``[B]`` visual tokens each sample keeps at ``ctx.stage`` when the model runs: by default
        :meth:`keep_count`; override when the count depends on the visual layout (``ctx.layout``:
        CDPruner and VScan count per view of the vision tower, LLaVA-NeXT crops and newlines)."""
        return self.keep_count(ctx.stage, ctx.num_visual, ctx.original_visual, ctx.images)

    def vision_layers(self, info: "ModelInfo") -> frozenset[int]:
        """Vision-tower layers (0-based) whose attention :meth:`SelectionContext.vision_attention`
        reads; the session records their inputs while the tower runs."""
        return frozenset()

    def auxiliary_models(self) -> Sequence["AuxiliarySpec"]:
        """Models this selector loads next to the backbone (see :mod:`fvlm.auxiliary`): loaded once
        per backbone when a session starts, on the backbone's device; read with
        :meth:`SelectionContext.auxiliary`."""
        return ()

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
