"""Backbone adapters: the only code that knows where things live inside a transformers VLM and how
its forward passes are called (caches, masks per attention backend, decoder-layer signatures)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from fvlm.adapters import layer_math
from fvlm.adapters.layer_math import Projections, ValueMixing  # noqa: F401  (part of the adapter API)
from fvlm.errors import UnsupportedModelError
from fvlm.indexing import KeepMap, build_mask, gather_mask_columns, gather_square_mask
from fvlm.types import (  # noqa: F401  (part of the adapter API)
    ImageGrid,
    ModelInfo,
    TokenGrid,
    TokenLayout,
    View,
    VisionObservation,
    VisionProbe,
    VisualLayout,
)


@dataclass(frozen=True)
class LayerInjections:
    """Visual features a family adds to the hidden states after its first decoder layers (Qwen3-VL's
    DeepStack): ``rows[i]`` ``[N, D]`` is added after decoder layer ``i`` at the prompt positions whose
    ``source`` ``[B, S]`` entry is a row of it (``-1`` elsewhere)."""

    rows: list[torch.Tensor]
    source: torch.Tensor


class BackboneAdapter:
    """Base adapter for decoder-only VLMs whose language model is Llama / Qwen / Mistral shaped.

    A family subclass sets ``family`` and ``model_types`` and, where needed, overrides the few
    locator and layout methods; ``tiny`` maps each model type to the [`TinySpec`][fvlm.adapters.tiny.TinySpec]
    that builds its tiny random test model. Everything else (decoder-layer math, masks, caches) is shared.
    """

    family: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    vision_has_cls: ClassVar[bool] = False
    mrope: ClassVar[bool] = False
    tiny: ClassVar[dict[str, Any]] = {}
    #: For ``fvlm list --adapters`` and the docs: model family name, transformers class per model type,
    #: an example checkpoint per model type, and what vision-side selectors can use.
    about: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: nn.Module):
        self.model = model

    # -- discovery -------------------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return cls.matches_config(getattr(model, "config", None))

    @classmethod
    def matches_config(cls, config: Any) -> bool:
        """Whether this adapter handles models of ``config`` (read before the weights are loaded)."""
        return getattr(config, "model_type", None) in cls.model_types

    # -- locators --------------------------------------------------------------------------
    @property
    def top(self) -> nn.Module:
        """The multimodal trunk that splices image features into the text embeddings."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.top.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def rotary_emb(self) -> nn.Module:
        return self.language_model.rotary_emb

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        value = getattr(cfg, "image_token_id", None)
        return value if value is not None else cfg.image_token_index

    def info(self) -> ModelInfo:
        return ModelInfo.from_config(self.model.config, family=self.family, vision_has_cls=self.vision_has_cls,
                                     mrope=self.mrope, **self.vision_info()).replace(num_layers=len(self.layers))

    def vision_info(self) -> dict:
        """The vision-tower fields of [`ModelInfo`][fvlm.types.ModelInfo] (depth, feature layer, full-attention layers,
        tokens per view, width); empty where fvlm's vision-side selectors do not apply."""
        return {}

    def check_supported(self) -> None:
        """Raise [`UnsupportedModelError`][fvlm.errors.UnsupportedModelError] naming the family and the reason when
        fvlm cannot prune this model correctly (checked when a pruning session is created)."""
        problems = layer_math.architecture_problems(self.layers, self.text_config)
        if problems:
            raise UnsupportedModelError(unsupported_message(self.model, problems))

    # -- the vision tower ------------------------------------------------------------------
    def observe(self, store: VisionObservation, needs: frozenset) -> list:
        """Register hooks that record what selectors may need (image grids, vision-tower
        internals) into ``store`` while the model runs; return the hook handles."""
        return []

    def observe_layers(self, store: VisionObservation, layers: frozenset) -> list:
        """Register hooks that record the inputs of vision-tower ``layers`` into ``store.vision_inputs``
        (what [`vision_attention`][fvlm.adapters.base.BackboneAdapter.vision_attention] reads); return the handles."""
        raise UnsupportedModelError(f"{self.family}: vision-layer probes are not available")

    def vision_attention(self, store: VisionObservation, layer: int) -> list[torch.Tensor]:
        """Per view (in ``View.source`` order), per-head attention scores ``[heads, N]`` of vision
        layer ``layer`` for the view's ``N`` output tokens (raster order); see the family adapters."""
        raise UnsupportedModelError(f"{self.family}: vision-tower attention probes are not available")

    def view_features(self, store: VisionObservation, view: View, visual_hidden: torch.Tensor) -> torch.Tensor:
        """LLM-space features ``[rows * cols, D]`` of every patch of ``view`` (raster order).

        Default: the sample's visual hidden states ``visual_hidden`` (``[N, D]``) at the view's
        cells (every patch of the view reaches the language model)."""
        if bool((view.index < 0).any()):
            raise UnsupportedModelError(f"{self.family}: view features of patches missing from the LLM input")
        return visual_hidden[view.index.flatten().to(visual_hidden.device)]

    def view_vision_features(self, store: VisionObservation, view: View) -> torch.Tensor:
        """Vision-tower features ``[rows * cols, Dv]`` of ``view`` before the projector (raster order)."""
        raise UnsupportedModelError(f"{self.family}: pre-projector vision features are not available")

    @property
    def vision_post_norm(self) -> nn.Module:
        """The vision tower's final norm (CLIP's ``post_layernorm``)."""
        raise UnsupportedModelError(f"{self.family}: the vision tower has no final norm fvlm knows")

    def vision_probe(self, store: VisionObservation) -> VisionProbe:
        """Vision-tower internals of the last image batch, one row per image (see [`VisionProbe`][fvlm.types.VisionProbe])."""
        raise UnsupportedModelError(
            f"{self.family}: vision-tower probes (CLS attention, pre-projector features) are not available; "
            "they need a CLS-token vision tower with one tile per image (LLaVA-1.5)"
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Map vision-tower features to LLM input embeddings with the model's own projector."""
        raise UnsupportedModelError(f"{self.family}: no stand-alone multimodal projector")

    def image_features(self, **pixel_inputs) -> Any:
        """The model's own vision tower + projector on ``pixel_inputs`` (its ``get_image_features``)."""
        return self.top.get_image_features(**pixel_inputs)

    # -- layout ----------------------------------------------------------------------------
    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` bool: which prompt positions hold visual tokens."""
        return input_ids == self.image_token_id

    def layout(self, input_ids: torch.Tensor, top_kwargs: dict, observed: VisionObservation | None = None,
               *, grids: bool = True) -> TokenLayout:
        """Where the visual tokens of a prompt batch are (and, with ``grids``, each image's grid)."""
        found = self.image_grids(input_ids, top_kwargs, observed or VisionObservation()) if grids else None
        return TokenLayout(self.visual_mask(input_ids), found)

    def visual_layout(self, input_ids: torch.Tensor, top_kwargs: dict, embeds: torch.Tensor | None = None,
                      store: VisionObservation | None = None) -> list[VisualLayout]:
        """Per sample, its [`VisualLayout`][fvlm.types.VisualLayout]: one square grid and one view per image span of
        [`image_grids`][fvlm.adapters.base.BackboneAdapter.image_grids] (families with another layout override this). ``embeds`` are the LLM input
        embeddings, ``store`` what [`observe`][fvlm.adapters.base.BackboneAdapter.observe] recorded."""
        layouts, source = [], 0
        for sample in self.image_grids(input_ids, top_kwargs, store or VisionObservation()):
            grids, views = [], []
            for image, g in enumerate(sample):
                if g.rows * g.cols != g.length:
                    raise UnsupportedModelError(f"{self.family}: an image of {g.length} tokens is not a 2-D grid")
                index = torch.arange(g.offset, g.offset + g.length).view(g.rows, g.cols)
                grids.append(TokenGrid(index))
                views.append(View(source, image, index))
                source += 1
            layouts.append(VisualLayout(grids, views, sum(g.length for g in sample)))
        return layouts

    def image_grids(self, input_ids: torch.Tensor, top_kwargs: dict,
                    observed: VisionObservation) -> list[list[ImageGrid]]:
        """Per sample, the images among its visual tokens (contiguous spans, square grids)."""
        grids = []
        for row in self.visual_mask(input_ids).cpu():
            spans, offset = [], 0
            for length in run_lengths(row):
                side = int(round(length**0.5))
                rows, cols = (side, side) if side * side == length else (1, length)
                spans.append(ImageGrid(offset, length, rows, cols))
                offset += length
            grids.append(spans)
        return grids

    # -- forward-call mechanics ------------------------------------------------------------
    @staticmethod
    def cache_of(kwargs_or_output: Any) -> Any:
        """The KV cache of a forward call's keyword arguments or of a ``generate`` / forward output,
        under either transformers name (``past_key_values``; ``cache`` since 5.24). The one place fvlm
        reads it."""
        get = kwargs_or_output.get if isinstance(kwargs_or_output, dict) else (
            lambda name: getattr(kwargs_or_output, name, None))
        cache = get("past_key_values")
        return cache if cache is not None else get("cache")

    @classmethod
    def is_prefill(cls, kwargs: dict) -> bool:
        """Whether a forward call with these keyword arguments starts a new prompt (empty cache)."""
        cache = cls.cache_of(kwargs)
        return cache is None or cache.get_seq_length() == 0

    def take_injections(self, lm_kwargs: dict) -> LayerInjections | None:
        """Remove from the language model's keyword arguments what the family adds to the hidden
        states after decoder layers (indexed by the unpruned sequence) and return it, so the session
        can add it to the pruned sequence ([`inject`][fvlm.adapters.base.BackboneAdapter.inject]). ``None``: nothing of the kind."""
        return None

    @staticmethod
    def inject(hidden: torch.Tensor, rows: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``hidden`` with ``rows[source]`` added where ``source >= 0`` (the model's own update)."""
        where = source >= 0
        hidden = hidden.clone()
        hidden[where] = hidden[where] + rows.to(hidden.device, hidden.dtype)[source[where]]
        return hidden

    def run_layer(self, index: int, hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
        """Decoder layer ``index`` on ``hidden`` (causal, no cache: none is passed, whatever the
        version calls it) with the mask / rotary / position arguments of ``layer_kwargs``. Calls
        ``.forward``, not the module: a proxy pass must fire no hooks (the session's own, HF's output
        recorders)."""
        kwargs = {k: v for k, v in layer_kwargs.items() if k in ("attention_mask", "position_embeddings", "position_ids")}
        out = self.layers[index].forward(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def attention_backend(self, index: int) -> str:
        return getattr(self.layers[index].self_attn.config, "_attn_implementation", None) or "eager"

    def pruned_mask(self, index: int, mask: torch.Tensor | None, keep: KeepMap, *, prefill: bool, steps: int,
                    source_len: int, dtype: torch.dtype):
        """The attention mask decoder layer ``index`` needs after an in-LLM stage kept ``keep`` (over a
        sequence of ``source_len`` entering layer 0), in the format of the layer's attention backend:
        the model's mask with its columns (and prefill rows) gathered, or, where the model passed none
        but filler slots need masking, a new one (``steps`` decode columns follow in decode)."""
        if mask is None:
            if not bool(keep.filler.any()):
                return None
            impl = self.attention_backend(index)
            query = keep.index.shape[1] if prefill else 1
            extra = 0 if prefill else steps
            if impl.startswith("flash"):
                cols = (~keep.filler).long()
                return torch.cat([cols, cols.new_ones(cols.shape[0], extra)], dim=1)
            return build_mask(keep, query, extra, "float" if impl == "eager" else "bool", dtype)
        if isinstance(mask, dict):
            raise UnsupportedModelError(
                f"{self.family}: the attention mask arrives per layer type ({', '.join(mask)}); fvlm prunes "
                "models with one full-attention mask")
        if mask.dim() == 4 and prefill:
            return gather_square_mask(mask, keep)
        return gather_mask_columns(mask, keep, source_len)

    # -- decoder-layer math (fvlm.adapters.layer_math on this model's layers) --------------
    def _checked_layer(self, index: int, seq_len: int) -> nn.Module:
        attn = self.layers[index].self_attn
        window = getattr(attn, "sliding_window", None)
        if window is not None:
            raise UnsupportedModelError(
                f"{self.family}: decoder layer {index} uses sliding-window attention (window {window}); "
                "fvlm's per-row attention probes (attention rows, rows-only layer proxy) assume full causal "
                "attention over the prompt"
            )
        layer_math.check_prompt_length(self.layers[index], seq_len)
        return self.layers[index]

    def project_qkv(self, layer_index: int, hidden_in: torch.Tensor, position_embeddings,
                    rows: torch.Tensor | None = None, *, queries: bool = True, values: bool = False,
                    rotary: bool = True) -> Projections:
        """What layer ``layer_index``'s attention computes from ``hidden_in``: [`fvlm.adapters.layer_math.project_qkv`][fvlm.adapters.layer_math.project_qkv]."""
        return layer_math.project_qkv(self.layers[layer_index], hidden_in, position_embeddings, rows,
                                      queries=queries, values=values, rotary=rotary)

    def rotary_bias(self, layer_index: int, position_embeddings, rows: torch.Tensor) -> torch.Tensor:
        """The purely positional part of layer ``layer_index``'s attention logits at ``rows``
        ([`fvlm.adapters.layer_math.rotary_bias`][fvlm.adapters.layer_math.rotary_bias])."""
        return layer_math.rotary_bias(self.layers[layer_index], position_embeddings, rows)

    def key_states(self, layer_index: int, hidden_in: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Post-rotary keys ``[B, H_kv, S, head_dim]`` that layer ``layer_index`` computes."""
        return self.project_qkv(layer_index, hidden_in, position_embeddings, queries=False).keys

    def attention_rows(self, layer_index: int, hidden_in: torch.Tensor, position_embeddings,
                       key_valid: torch.Tensor, rows: torch.Tensor, *, rotary: bool = True) -> torch.Tensor:
        """Attention probabilities ``[B, H, Q, S]`` of query ``rows`` in layer ``layer_index``
        ([`fvlm.adapters.layer_math.attention_rows`][fvlm.adapters.layer_math.attention_rows]; ``rotary=False``: without the rotary embedding)."""
        layer = self._checked_layer(layer_index, hidden_in.shape[1])
        return layer_math.attention_rows(layer, hidden_in, position_embeddings, key_valid, rows, rotary=rotary)

    def rows_forward(self, layer_index: int, hidden: torch.Tensor, position_embeddings, key_valid: torch.Tensor,
                     rows: torch.Tensor, *, value_mixing: ValueMixing = None) -> torch.Tensor:
        """Output ``[B, Q, D]`` of decoder layer ``layer_index`` at ``rows`` only
        ([`fvlm.adapters.layer_math.rows_forward`][fvlm.adapters.layer_math.rows_forward]; the caller decides ``value_mixing``)."""
        layer = self._checked_layer(layer_index, hidden.shape[1])
        return layer_math.rows_forward(layer, hidden, position_embeddings, key_valid, rows, value_mixing=value_mixing)


def unsupported_message(model: nn.Module, problems: Sequence[str]) -> str:
    config = getattr(model, "config", None)
    return (f"fvlm cannot prune {type(model).__name__} (model_type={getattr(config, 'model_type', None)!r}): "
            + "; ".join(problems))


def images_per_row(image_tokens: Sequence[int], row_tokens: Sequence[int]) -> list[list[int]]:
    """Which images each row of the LLM batch shows, as indices into the vision tower's batch.

    ``image_tokens[i]``: visual tokens of image ``i`` (the prompts' images one after another, as the
    vision tower saw them); ``row_tokens[b]``: visual tokens in row ``b`` of the LLM batch. ``generate``
    encodes the images once and may then repeat every prompt ``e`` times in a row (beam search,
    ``num_return_sequences``); the ``e`` copies show the same images. ``e`` is the ratio of the two
    totals. Raises [`UnsupportedModelError`][fvlm.errors.UnsupportedModelError] when no such layout fits the counts.
    """
    rows, total = list(row_tokens), sum(image_tokens)
    if sum(rows) == 0:
        return [[] for _ in rows]
    copies, rest = divmod(sum(rows), total) if total else (0, 1)
    if rest or len(rows) % copies:
        raise UnsupportedModelError(
            f"cannot match the prompts' visual tokens per row {rows} to the {len(image_tokens)} images "
            f"of {list(image_tokens)} tokens the vision tower encoded")
    out, nxt = [], 0
    for start in range(0, len(rows), copies):
        group = rows[start:start + copies]
        picked, need = [], group[0]
        while need > 0 and nxt < len(image_tokens):
            picked.append(nxt)
            need -= image_tokens[nxt]
            nxt += 1
        if need != 0 or len(set(group)) != 1:
            n = len(image_tokens)
            repeated = any(n % e == 0 and all(len(set(image_tokens[i:i + e])) == 1 for i in range(0, n, e))
                           for e in range(2, n + 1))
            hint = ("; the tower encoded each image several times in a row (this transformers version expands "
                    "per-image inputs for beams like per-prompt ones, so the model itself gives rows features of "
                    "other images): use one beam / return, or another transformers version") if repeated else ""
            raise UnsupportedModelError(
                f"rows {start}..{start + copies - 1} of the batch do not show whole images of the vision "
                f"tower's batch (visual tokens per row {rows}, per image {list(image_tokens)}){hint}")
        out += [picked] * copies
    return out


def grids_from_sizes(sizes: Sequence[tuple[int, int, int]], input_ids_visual: torch.Tensor) -> list[list[ImageGrid]]:
    """Per batch row, one [`ImageGrid`][fvlm.types.ImageGrid] per image of ``(frames, rows, cols)`` tokens, the images
    matched to rows by [`images_per_row`][fvlm.adapters.base.images_per_row] (``generate`` may repeat prompts for beams)."""
    rows = images_per_row([t * h * w for t, h, w in sizes], input_ids_visual.sum(dim=1).tolist())
    grids = []
    for images in rows:
        spans, offset = [], 0
        for t, h, w in (sizes[i] for i in images):
            spans.append(ImageGrid(offset, t * h * w, h, w))
            offset += t * h * w
        grids.append(spans)
    return grids


def fixed_size_grids(visual: torch.Tensor, size: int) -> list[list[ImageGrid]]:
    """Per row of ``visual`` (``[B, S]`` bool), its visual tokens as consecutive square grids of
    ``size`` tokens each (LLaVA-1.5's images, InternVL's tiles)."""
    side = int(round(size**0.5))
    return [[ImageGrid(o, size, side, side) for o in range(0, int(row.sum()), size)] for row in visual.cpu()]


def run_lengths(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor."""
    lengths, count = [], 0
    for value in row.tolist():
        if value:
            count += 1
        elif count:
            lengths.append(count)
            count = 0
    if count:
        lengths.append(count)
    return lengths


_run_lengths = run_lengths  # the name earlier code imports
