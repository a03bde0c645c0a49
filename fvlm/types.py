"""The data types every layer of fvlm shares (imports nothing else from fvlm, not even torch).

Selectors, the session, adapters, metrics and profiling all speak in these records: what a selector
needs (:class:`Need`), where and how much it prunes (:class:`Stage`), what it returns
(:class:`Selection`), the architecture facts of a backbone (:class:`ModelInfo`), where the visual
tokens sit (:class:`ImageGrid`, :class:`TokenLayout`) and what the vision tower showed
(:class:`VisionObservation`, :class:`VisionProbe`).
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:  # annotations only: importing this module needs no torch
    import torch


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

    def count(self, original) -> "torch.Tensor":
        """Visual tokens kept per sample (``[B]`` long) for ``original`` visual tokens (int or ``[B]``).

        An int ``keep`` is the count. A fraction ``f`` gives ``round(f * n)`` (half to even, like
        Python's ``round``; ``rounding="round"``) or ``int(f * n)`` (truncation, ``rounding="floor"``,
        e.g. FastV's lmms-eval drop-in), at least 1; a sample without visual tokens keeps 0.
        """
        import torch

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


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Architecture facts of a backbone's language model: what selectors build schedules from and
    what the analytic FLOPs / KV formulas count (``gated_mlp``: SwiGLU's three MLP matrices)."""

    family: str = ""
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    gated_mlp: bool = True
    vision_has_cls: bool = False
    mrope: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any, **facts: Any) -> "ModelInfo":
        """The record of a transformers config (a VLM's or a plain LM's), plus ``facts`` (family, ...)."""
        tc = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = tc.num_attention_heads
        return cls(
            num_layers=tc.num_hidden_layers,
            hidden_size=tc.hidden_size,
            intermediate_size=tc.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            vocab_size=tc.vocab_size,
            **facts,
        )

    def replace(self, **changes: Any) -> "ModelInfo":
        return type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ImageGrid:
    """Where one image's tokens sit among a sample's visual tokens, and their 2-D layout.

    ``offset``/``length`` index the sample's visual tokens; ``rows`` x ``cols`` is the patch grid of
    the first ``rows * cols`` of them in raster order (LLaVA-NeXT's and LLaVA-OneVision's extra tiles
    and newline tokens follow as the rest). Families that delimit an image's tiles (InternVL,
    Idefics3 / SmolVLM) report one entry per tile.
    """

    offset: int
    length: int
    rows: int
    cols: int


@dataclass(frozen=True)
class TokenLayout:
    """Where a prompt batch's visual tokens are: ``visual`` ``[B, S]`` bool, and per sample the
    :class:`ImageGrid` of each of its images (``None`` when not asked for)."""

    visual: torch.Tensor
    grids: list[list[ImageGrid]] | None = None


@dataclass
class VisionObservation:
    """What an adapter's hooks recorded while the vision tower ran for the current prompt batch.

    ``image_grid_thw`` / ``image_sizes``: the grids / image sizes the tower encoded (Qwen families /
    Mistral 3; ``generate`` encodes images before the prefill call); ``layer_input`` / ``projector_input``: the input of the vision layer whose output
    feeds the projector, and the projector's input (CLIP towers, for vision probes).
    """

    image_grid_thw: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    layer_input: torch.Tensor | None = None
    projector_input: torch.Tensor | None = None

    def clear(self) -> None:
        for f in fields(self):
            setattr(self, f.name, None)


@dataclass(frozen=True)
class VisionProbe:
    """Per image (``[I, ...]``, in batch order): pre-projector features of the visual tokens, the
    CLS token's attention to them (summed over heads) and their keys (averaged over heads), all
    from the vision layer whose output feeds the projector; ``cls_features`` ``[I, Dv]`` is that
    layer's output at the CLS token (which the projector never sees in HF LLaVA)."""

    features: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor
    cls_features: torch.Tensor | None = None
