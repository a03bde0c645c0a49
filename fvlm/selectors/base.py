"""The selector interface: what a token-reduction method declares and returns."""
from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Sequence, Union

import torch

if TYPE_CHECKING:
    from fvlm.adapters.base import ModelInfo
    from fvlm.context import SelectionContext


class Need(str, enum.Enum):
    """Inputs a selector may read beyond the visual hidden states (always available)."""

    ATTENTION = "attention"  # attention rows of the pruning layer, recomputed from its q/k
    KEYS = "keys"  # post-rotary key states of the pruning layer
    GRADIENT = "gradient"  # gradient of an objective w.r.t. the hidden states (local autograd)
    VISION_ATTENTION = "vision_attention"  # CLS-row attention inside the vision tower
    TEXT = "text"  # hidden states of the text tokens of the prompt
    GRID = "grid"  # the 2-D patch grid of every image
    LAYERS = "layers"  # direct use of decoder layers / final norm / LM head (proxy models)


Where = Union[str, int]  # "vision", "input", or l >= 1: after l decoder layers


ROUNDING = ("round", "floor")
POSITION_POLICIES = ("original", "compact")


@dataclass(frozen=True)
class Stage:
    """One pruning point: where it fires and how many visual tokens survive it.

    ``where`` is ``"vision"`` (on the vision tower's output, applied as the LLM input is formed),
    ``"input"`` (on the LLM input embeddings) or an int ``l >= 1`` (on the output of the first ``l``
    decoder layers; layer ``l`` and later see the reduced sequence). ``keep`` is an absolute count
    (int) or a fraction in (0, 1] of each sample's *original* visual-token count (float), turned into
    a count by ``rounding`` (see :meth:`count`).
    """

    where: Where
    keep: Union[int, float]
    rounding: str = "round"

    def __post_init__(self):
        if self.where not in ("vision", "input") and not (isinstance(self.where, int) and self.where >= 1):
            raise ValueError(f"Stage.where must be 'vision', 'input' or an int >= 1, got {self.where!r}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise TypeError(f"Stage.keep must be an int count or a float fraction, got {self.keep!r}")
        if isinstance(self.keep, int) and self.keep < 0:
            raise ValueError(f"Stage.keep must be >= 0, got {self.keep}")
        if isinstance(self.keep, float) and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"a fractional Stage.keep must be in (0, 1], got {self.keep}")
        if self.rounding not in ROUNDING:
            raise ValueError(f"Stage.rounding must be one of {ROUNDING}, got {self.rounding!r}")

    def count(self, original) -> torch.Tensor:
        """Visual tokens kept per sample (``[B]`` long) for ``original`` visual tokens (int or ``[B]``).

        An int ``keep`` is the count. A fraction ``f`` gives ``round(f * n)`` (half to even, like
        Python's ``round``; ``rounding="round"``) or ``int(f * n)`` (truncation, ``rounding="floor"``,
        e.g. FastV's lmms-eval drop-in), at least 1; a sample without visual tokens keeps 0.
        """
        original = torch.as_tensor(original, dtype=torch.long)
        if isinstance(self.keep, int):
            return torch.full_like(original, self.keep)
        scaled = original.double() * self.keep
        kept = (scaled.round() if self.rounding == "round" else scaled.floor()).long().clamp(min=1)
        return torch.where(original > 0, kept, 0)

    @property
    def order(self) -> float:
        """Sort key: vision < input < layer 1 < layer 2 ..."""
        return {"vision": -1.0, "input": 0.0}.get(self.where, self.where)  # type: ignore[arg-type]


@dataclass
class Selection:
    """What a selector returns for one stage.

    ``indices``: LongTensor ``[B, K]`` of indices into each sample's current visual tokens, in the
    order the kept tokens should appear in the sequence (usually ascending), padded with ``-1``
    where a sample keeps fewer than ``K``. ``embeddings`` (optional, ``[B, K, D]``) replaces the
    hidden state of each kept token (merging methods); its position stays that of the index.
    """

    indices: torch.Tensor
    embeddings: torch.Tensor | None = None


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
