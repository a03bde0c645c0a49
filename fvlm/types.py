"""The data types every layer of fvlm shares (imports nothing else from fvlm, not even torch).

Selectors, the session, adapters, metrics and profiling all speak in these records: what a selector
needs ([`Need`][fvlm.types.Need]), where and how much it prunes ([`Stage`][fvlm.types.Stage]), what it returns
([`Selection`][fvlm.types.Selection]), the architecture facts of a backbone ([`ModelInfo`][fvlm.types.ModelInfo]), where the visual
tokens sit ([`ImageGrid`][fvlm.types.ImageGrid], [`TokenLayout`][fvlm.types.TokenLayout]) and what the vision tower showed
([`VisionObservation`][fvlm.types.VisionObservation], [`VisionProbe`][fvlm.types.VisionProbe]).
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
    VISION_FEATURES = "vision_features"  # per-view vision-tower features before / after the projector
    TEXT = "text"  # hidden states of the text tokens of the prompt
    GRID = "grid"  # the 2-D patch grid of every image
    LAYERS = "layers"  # direct use of decoder layers / final norm / LM head (proxy models)
    INSTRUCTION = "instruction"  # the instruction text of every sample (``fvlm.prune(..., instructions=)``)


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
    a count by ``rounding`` (see [`count`][fvlm.types.Stage.count]). A selector whose count follows another rule (per image,
    per crop, of the current count) gives it in ``TokenSelector.keep_count`` (from counts) or
    ``TokenSelector.stage_budget`` (from the visual layout). ``exact=False``: the selector may keep
    fewer than the budget (at least one token), e.g. LLaVA-NeXT crops whose picks the unpadding
    removes; the session's trace records the real count.
    """

    where: Where
    keep: Union[int, float]
    rounding: str = "round"
    exact: bool = True

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
        if not isinstance(self.exact, bool):
            raise TypeError(f"Stage.exact must be a bool, got {self.exact!r}")

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

    @staticmethod
    def from_rows(rows: "list[list[tuple[int, torch.Tensor]]]", like: "torch.Tensor") -> "Selection":
        """A merging selection from per-sample ``(index, embedding)`` pairs (sorted by index here),
        padded with ``-1``; embeddings take ``like``'s dtype and device."""
        import torch

        width = max((len(r) for r in rows), default=0)
        index = torch.full((len(rows), width), -1, dtype=torch.long, device=like.device)
        embeds = like.new_zeros(len(rows), width, like.shape[-1])
        for b, row in enumerate(rows):
            row = sorted(row, key=lambda entry: entry[0])
            if row:
                index[b, : len(row)] = torch.tensor([p for p, _ in row], device=like.device)
                embeds[b, : len(row)] = torch.stack([e.to(like.dtype) for _, e in row])
        return Selection(index, embeds)


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
    vision_layers: int = 0  # depth of the vision tower (0: unknown)
    vision_feature_layer: int | None = None  # 0-based vision layer whose output becomes the visual tokens
    vision_full_attention: tuple[int, ...] = ()  # vision layers with full (not windowed) attention
    view_tokens: int = 0  # patch tokens per vision-tower view when fixed (CLIP towers: 576 at 336 px); 0: varies
    vision_hidden: int = 0  # width of the vision tower
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
    [`ImageGrid`][fvlm.types.ImageGrid] of each of its images (``None`` when not asked for)."""

    visual: torch.Tensor
    grids: list[list[ImageGrid]] | None = None


class _Table:
    """``rows`` / ``cols`` of a record whose ``index`` is a 2-D table of token positions."""

    index: torch.Tensor

    @property
    def rows(self) -> int:
        return self.index.shape[0]

    @property
    def cols(self) -> int:
        return self.index.shape[1]


@dataclass(frozen=True)
class TokenGrid(_Table):
    """A 2-D grid of one sample's visual tokens as the language model sees them.

    ``index[r, c]`` is the position among the sample's visual tokens of grid cell ``(r, c)``;
    ``newline[r]`` (LLaVA-NeXT's high-resolution grid) that of the newline token closing row ``r``.
    """

    index: torch.Tensor
    newline: torch.Tensor | None = None


@dataclass(frozen=True)
class View(_Table):
    """One view the vision tower encodes (LLaVA: an image; LLaVA-NeXT: one crop; Qwen: one image frame).

    ``source`` is its row among the tower's views of the whole batch (the order of the
    ``vision_attention`` / view-feature lists); ``index[r, c]`` the position among the sample's
    visual tokens of its patch ``(r, c)``, ``-1`` where the patch does not reach the language model
    (LLaVA-NeXT tiles cut by the unpadding).
    """

    source: int
    image: int
    index: torch.Tensor


@dataclass(frozen=True)
class VisualLayout:
    """How one sample's visual tokens are laid out: the grids the LLM sees and the tower's views."""

    grids: list[TokenGrid]
    views: list[View]
    num_visual: int

    @property
    def unviewed(self) -> "torch.Tensor":
        """Positions among the sample's visual tokens that belong to no view (LLaVA-NeXT newlines)."""
        import torch

        seen = torch.zeros(self.num_visual, dtype=torch.bool)
        for view in self.views:
            cells = view.index.flatten()
            seen[cells[cells >= 0]] = True
        return (~seen).nonzero().flatten()


@dataclass
class VisionObservation:
    """What an adapter's hooks recorded while the vision tower ran for the current prompt batch.

    ``image_grid_thw`` / ``image_sizes``: the grids / image sizes the tower encoded (Qwen families /
    Mistral 3; ``generate`` encodes images before the prefill call); ``layer_input`` / ``projector_input``: the input of the vision layer whose output
    feeds the projector, its output at the CLS token, and the projector's input / output (CLIP towers,
    for vision probes); ``vision_inputs``: the inputs of the vision layers selectors asked for.
    """

    image_grid_thw: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    layer_input: torch.Tensor | None = None
    layer_cls: torch.Tensor | None = None
    projector_input: torch.Tensor | None = None
    projector_output: torch.Tensor | None = None
    vision_inputs: dict | None = None  # vision layer -> its recorded input (selectors' vision_layers)

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
