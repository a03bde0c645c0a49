"""The selector interface: what a token-reduction method declares and returns."""
from __future__ import annotations

import abc
import functools
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch

from fvlm import budget
from fvlm.errors import SelectorArgumentError
from fvlm.selectors.algorithms import topk_indices
from fvlm.selectors.arguments import check_keep, check_where
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
    #: Parameters the selector renamed, old name -> new name: passing an old name raises a
    #: [`SelectorArgumentError`][fvlm.errors.SelectorArgumentError] that names the new one (never accepted silently).
    renamed_parameters: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("renamed_parameters") and "__init__" in cls.__dict__:
            cls.__init__ = _rejecting_renamed(cls.__init__, cls.renamed_parameters)

    @abc.abstractmethod
    def stages(self, info: "ModelInfo") -> Sequence[Stage]:
        """The stage schedule for a model (``info`` gives layer count, family, ...)."""

    @abc.abstractmethod
    def select(self, ctx: "SelectionContext") -> Selection | torch.Tensor:
        """Choose the visual tokens to keep at ``ctx.stage`` (``ctx.budget[b]`` per sample)."""

    @classmethod
    def for_average(cls, average: float, info: "ModelInfo", original: int, **params) -> dict:
        """Keyword arguments (``params`` plus the budget's) whose schedule averages ``average`` visual
        tokens over the decoder layers of ``info``, for ``original`` visual tokens per sample: the one
        mapping from a layer-average budget to this selector's arguments (``fvlm profile --budget``,
        the benchmarks). Default: [`fvlm.budget.arguments_for_average`][fvlm.budget.arguments_for_average] on the selector's budget
        parameter; override when the budget is split over several (VisionZip, VScan). Raises
        [`BudgetError`][fvlm.errors.BudgetError] when the average is out of reach."""
        return budget.arguments_for_average(cls, average, info, original, params)

    @classmethod
    def budget_parameter(cls) -> str | None:
        """What [`for_average`][fvlm.selectors.base.TokenSelector.for_average] sets: a parameter name, several joined by ``" + "``, or None when
        the selector takes no layer-average budget."""
        return budget.budget_parameter(cls)

    def keep_count(self, stage: Stage, current: torch.Tensor, original: torch.Tensor,
                   images: torch.Tensor) -> torch.Tensor:
        """``[B]`` visual tokens each sample keeps at ``stage`` (the session's ``ctx.budget``).

        ``current``: visual tokens entering the stage, ``original``: before any stage, ``images``:
        images in the prompt (all ``[B]`` long). Default [`Stage.count`][fvlm.types.Stage.count] of ``original``; override
        when the authors' count depends on more (SparseVLM's recycled clusters, VisionZip per image).
        """
        return stage.count(original)

    def stage_budget(self, ctx: "SelectionContext") -> torch.Tensor:
        """``[B]`` visual tokens each sample keeps at ``ctx.stage`` when the model runs: by default
        [`keep_count`][fvlm.selectors.base.TokenSelector.keep_count]; override when the count depends on the visual layout (``ctx.layout``:
        CDPruner and VScan count per view of the vision tower, LLaVA-NeXT crops and newlines)."""
        return self.keep_count(ctx.stage, ctx.num_visual, ctx.original_visual, ctx.images)

    def vision_layers(self, info: "ModelInfo") -> frozenset[int]:
        """Vision-tower layers (0-based) whose attention [`SelectionContext.vision_attention`][fvlm.context.SelectionContext.vision_attention]
        reads; the session records their inputs while the tower runs."""
        return frozenset()

    def auxiliary_models(self) -> Sequence["AuxiliarySpec"]:
        """Models this selector loads next to the backbone (see [`fvlm.auxiliary`][fvlm.auxiliary]): loaded once
        per backbone when a session starts, on the backbone's device; read with
        [`SelectionContext.auxiliary`][fvlm.context.SelectionContext.auxiliary]."""
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
        return topk_indices(self.score(ctx), ctx.visual_valid, ctx.budget)


class SingleStageSelector(TokenSelector):
    """A selector with one pruning point: ``keep`` visual tokens survive at ``layer``.

    ``keep`` is an int count or a float fraction ([`fvlm.budget.KEEP_RULE`][fvlm.budget.KEEP_RULE]), turned into a count
    by ``rounding``; ``layer`` is ``"vision"``, ``"input"`` or the number of decoder layers that run
    before pruning. A subclass gives its own defaults in a typed ``__init__`` (the recipe schema)
    that calls ``super().__init__(keep, layer)``, and keeps only its scoring or selection.
    """

    rounding: str = "round"

    def __init__(self, keep: int | float = 0.25, layer: int | str = "input"):
        self.keep = check_keep(self, keep)
        self.layer = check_where(self, layer)

    def stages(self, info):
        return [Stage(self.layer, self.keep, self.rounding)]


def _rejecting_renamed(init, renamed: dict[str, str]):
    """``init`` refusing the old names in ``renamed`` with a message naming the new ones."""

    @functools.wraps(init)  # keeps the signature: it is the recipe schema
    def checked(self, *args, **kwargs):
        for old in sorted(kwargs.keys() & renamed.keys()):
            error = SelectorArgumentError(
                f"{type(self).__name__}: `{old}` was renamed to `{renamed[old]}`; write "
                f"{renamed[old]}={kwargs[old]!r}")
            error.parameter = old
            raise error
        init(self, *args, **kwargs)

    return checked
