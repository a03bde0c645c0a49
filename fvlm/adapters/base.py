"""Backbone adapters: the only code that knows where things live inside a transformers VLM."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fvlm.errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about a backbone that selectors may use to build their schedules."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    vision_has_cls: bool = False
    mrope: bool = False
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VisionProbe:
    """Per image (``[I, ...]``, in batch order): pre-projector features of the visual tokens, the
    CLS token's attention to them (summed over heads) and their keys (averaged over heads), all
    from the vision layer whose output feeds the projector."""

    features: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor


@dataclass(frozen=True)
class ImageGrid:
    """Where one image's tokens sit among a sample's visual tokens, and their 2-D layout.

    ``offset``/``length`` index the sample's visual tokens; ``rows`` x ``cols`` is the patch grid of
    the first ``rows * cols`` of them (LLaVA-NeXT's extra tiles and newline tokens follow as the rest).
    """

    offset: int
    length: int
    rows: int
    cols: int


class BackboneAdapter:
    """Base adapter for decoder-only VLMs whose language model is Llama/Qwen2-shaped.

    A family subclass sets ``family`` and ``model_types`` and, where needed, overrides the few
    locator methods. Everything else (attention-row probes, keys, proxies) is shared.
    """

    family: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    # -- discovery -------------------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

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
        tc = self.text_config
        heads = tc.num_attention_heads
        return ModelInfo(
            family=self.family,
            num_layers=len(self.layers),
            hidden_size=tc.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
            head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
            intermediate_size=tc.intermediate_size,
            vocab_size=tc.vocab_size,
            vision_has_cls=self.vision_has_cls,
            mrope=self.mrope,
        )

    vision_has_cls: ClassVar[bool] = False
    mrope: ClassVar[bool] = False

    def observe(self, store: dict, needs: frozenset) -> list:
        """Register hooks that record what selectors may need (image grids, vision-tower
        internals) into ``store`` while the model runs; return the hook handles."""
        return []

    def vision_probe(self, store: dict) -> "VisionProbe":
        """Vision-tower internals of the last image batch, one row per image (see :class:`VisionProbe`)."""
        raise UnsupportedModelError(
            f"{self.family}: vision-tower probes (CLS attention, pre-projector features) are not available; "
            "they need a CLS-token vision tower with one tile per image (LLaVA-1.5)"
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Map vision-tower features to LLM input embeddings with the model's own projector."""
        raise UnsupportedModelError(f"{self.family}: no stand-alone multimodal projector")

    # -- layout ----------------------------------------------------------------------------
    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` bool: which prompt positions hold visual tokens."""
        return input_ids == self.image_token_id

    def image_grids(self, input_ids: torch.Tensor, top_kwargs: dict) -> list[list[ImageGrid]]:
        """Per sample, the images among its visual tokens (contiguous spans, square grids)."""
        grids = []
        for row in self.visual_mask(input_ids).cpu():
            spans, offset = [], 0
            for length in _run_lengths(row):
                side = int(round(length**0.5))
                rows, cols = (side, side) if side * side == length else (1, length)
                spans.append(ImageGrid(offset, length, rows, cols))
                offset += length
            grids.append(spans)
        return grids

    # -- probes on a decoder layer (shared by every Llama/Qwen2-shaped family) -------------
    def _rotary_fn(self, attn: nn.Module):
        return sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def _project(self, layer_index: int, hidden_in: torch.Tensor, position_embeddings, rows=None):
        """Queries (for ``rows`` only) and keys of one layer, post-rotary; ``rows`` is ``[B, Q]``."""
        layer = self.layers[layer_index]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden_in)
        bsz, seq, _ = normed.shape
        hd = attn.head_dim
        cos, sin = position_embeddings
        keys = attn.k_proj(normed).view(bsz, seq, -1, hd).transpose(1, 2)
        if rows is None:
            q_in, q_cos, q_sin = normed, cos, sin
        else:
            idx = rows.unsqueeze(-1)
            q_in = normed.gather(1, idx.expand(-1, -1, normed.shape[-1]))
            q_cos = _gather_seq(cos, rows)
            q_sin = _gather_seq(sin, rows)
        queries = attn.q_proj(q_in).view(bsz, q_in.shape[1], -1, hd).transpose(1, 2)
        rotary = self._rotary_fn(attn)
        queries, _ = rotary(queries, queries, q_cos, q_sin)
        _, keys = rotary(keys, keys, cos, sin)
        return queries, keys

    def key_states(self, layer_index: int, hidden_in: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Post-rotary keys ``[B, H_kv, S, head_dim]`` that layer ``layer_index`` computes."""
        layer = self.layers[layer_index]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden_in)
        bsz, seq, _ = normed.shape
        keys = attn.k_proj(normed).view(bsz, seq, -1, attn.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        _, keys = self._rotary_fn(attn)(keys, keys, cos, sin)
        return keys

    def attention_rows(
        self, layer_index: int, hidden_in: torch.Tensor, position_embeddings, key_valid: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """Attention probabilities ``[B, H, Q, S]`` of query ``rows`` (``[B, Q]``) in one layer.

        Recomputed from the layer's own q/k projections and rotary embedding, so it works whatever
        attention kernel the model runs. ``key_valid`` ``[B, S]`` masks padding; causality is applied
        per query row.
        """
        attn = self.layers[layer_index].self_attn
        queries, keys = self._project(layer_index, hidden_in, position_embeddings, rows)
        groups = queries.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1)
        scores = torch.matmul(queries.float(), keys.float().transpose(2, 3)) * attn.scaling
        seq = keys.shape[2]
        allowed = key_valid[:, None, None, :] & (
            torch.arange(seq, device=rows.device)[None, None, None, :] <= rows[:, None, :, None]
        )
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1)


def _gather_seq(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``t`` (``[B or 1, S, ...]``) along dim 1 with a per-sample ``index`` ``[B, K]``."""
    if t.shape[0] != index.shape[0]:
        t = t.expand(index.shape[0], *t.shape[1:])
    shape = index.shape + t.shape[2:]
    idx = index.reshape(*index.shape, *([1] * (t.dim() - 2))).expand(shape)
    return t.gather(1, idx)


def _run_lengths(row: torch.Tensor) -> list[int]:
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
