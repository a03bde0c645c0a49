"""Backbone adapters: the only code that knows where things live inside a transformers VLM."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
from torch import nn

from fvlm.errors import UnsupportedModelError
from fvlm.metrics.flops import value_mixing_pays


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
    from the vision layer whose output feeds the projector; ``cls_features`` ``[I, Dv]`` is that
    layer's output at the CLS token (which the projector never sees in HF LLaVA)."""

    features: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor
    cls_features: torch.Tensor | None = None


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
        return cls.matches_config(getattr(model, "config", None))

    @classmethod
    def matches_config(cls, config: Any) -> bool:
        """Whether this adapter handles models of ``config`` (read before the weights are loaded)."""
        return getattr(config, "model_type", None) in cls.model_types

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

    def _check_full_attention(self, layer_index: int) -> nn.Module:
        attn = self.layers[layer_index].self_attn
        window = getattr(attn, "sliding_window", None)
        if window is not None:
            raise UnsupportedModelError(
                f"{self.family}: decoder layer {layer_index} uses sliding-window attention (window {window}); "
                "fvlm's per-row attention probes (attention rows, rows-only layer proxy) assume full causal "
                "attention over the prompt"
            )
        return attn

    def project_qkv(
        self, layer_index: int, hidden_in: torch.Tensor, position_embeddings, rows: torch.Tensor | None = None,
        *, queries: bool = True, values: bool = False,
    ) -> "Projections":
        """The shared per-layer primitive: what layer ``layer_index``'s attention computes from ``hidden_in``.

        Runs the layer's own ``input_layernorm`` and ``k_proj`` (and ``v_proj`` if ``values``) on all
        ``S`` rows, and ``q_proj`` only on query ``rows`` (``[B, Q]`` positions; ``None`` = all rows;
        skipped if not ``queries``), with the layer's rotary function on queries and keys. Returns
        :class:`Projections` with ``queries`` ``[B, H, Q, hd]`` and ``keys`` / ``values``
        ``[B, H_kv, S, hd]`` (``None`` where not asked for), and ``normed``, the normalised input
        ``[B, S, D]``. Differentiable w.r.t. ``hidden_in``.
        """
        layer = self.layers[layer_index]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden_in)
        bsz, seq, _ = normed.shape
        hd = attn.head_dim
        cos, sin = position_embeddings
        rotary = self._rotary_fn(attn)
        keys = attn.k_proj(normed).view(bsz, seq, -1, hd).transpose(1, 2)
        _, keys = rotary(keys[:, :1], keys, cos, sin)  # a one-head stand-in for the unused query side
        vals = attn.v_proj(normed).view(bsz, seq, -1, hd).transpose(1, 2) if values else None
        q = None
        if queries:
            if rows is None:
                q_in, q_cos, q_sin = normed, cos, sin
            else:
                q_in = normed.gather(1, rows.unsqueeze(-1).expand(-1, -1, normed.shape[-1]))
                q_cos, q_sin = _gather_seq(cos, rows), _gather_seq(sin, rows)
            q = attn.q_proj(q_in).view(bsz, q_in.shape[1], -1, hd).transpose(1, 2)
            q, _ = rotary(q, q[:, :1], q_cos, q_sin)
        return Projections(q, keys, vals, normed)

    def rotary_bias(self, layer_index: int, position_embeddings, rows: torch.Tensor) -> torch.Tensor:
        """``[B, Q, S]`` float32: all-ones queries (at ``rows``, ``[B, Q]``) and keys (every position),
        rotated by layer ``layer_index``'s rotary function, dot product over ``sqrt(head_dim)``."""
        attn = self.layers[layer_index].self_attn
        cos, sin = (t.float() for t in position_embeddings)
        rotary = self._rotary_fn(attn)
        ones = torch.ones(rows.shape[0], 1, cos.shape[-2], attn.head_dim, device=cos.device)
        _, keys = rotary(ones[:, :, :1], ones, cos, sin)
        q = ones[:, :, : rows.shape[1]]
        q, _ = rotary(q, q[:, :, :1], _gather_seq(cos, rows), _gather_seq(sin, rows))
        return torch.matmul(q, keys.transpose(2, 3))[:, 0] / attn.head_dim**0.5

    def key_states(self, layer_index: int, hidden_in: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Post-rotary keys ``[B, H_kv, S, head_dim]`` that layer ``layer_index`` computes."""
        return self.project_qkv(layer_index, hidden_in, position_embeddings, queries=False).keys

    def attention_rows(
        self, layer_index: int, hidden_in: torch.Tensor, position_embeddings, key_valid: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """Attention probabilities ``[B, H, Q, S]`` of query ``rows`` (``[B, Q]``) in one layer.

        Recomputed from the layer's own q/k projections and rotary embedding, so it works whatever
        attention kernel the model runs. ``key_valid`` ``[B, S]`` masks padding; causality is applied
        per query row.
        """
        attn = self._check_full_attention(layer_index)
        proj = self.project_qkv(layer_index, hidden_in, position_embeddings, rows)
        queries, keys = proj.queries, proj.keys
        groups = queries.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1)
        scores = torch.matmul(queries.float(), keys.float().transpose(2, 3)) * attn.scaling
        scores = scores.masked_fill(~_allowed(key_valid, rows), torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1)

    def rows_forward(
        self, layer_index: int, hidden: torch.Tensor, position_embeddings, key_valid: torch.Tensor,
        rows: torch.Tensor, *, value_mixing: bool | None = None,
    ) -> torch.Tensor:
        """Output ``[B, Q, D]`` of decoder layer ``layer_index`` at ``rows`` (``[B, Q]``) only.

        In a causal decoder layer an output row depends on the other rows only through their keys
        and values, so this equals running the whole layer on ``hidden`` (``[B, S, D]``, no cache)
        and gathering ``rows``, at a fraction of the cost: norm + key projection (+ rotary) for all
        ``S`` rows, queries, attention, ``o_proj``, ``post_attention_layernorm`` and MLP for the ``Q``
        rows. Keys are masked causally per query row and by ``key_valid`` ``[B, S]`` (padding /
        filler slots); grouped-query heads share their key/value head. Attention follows HF's eager
        kernel (scores in the model dtype, softmax in at least float32). Uses the layer's own
        modules, so it is differentiable w.r.t. ``hidden`` (the PIO-FVLM proxy back-propagates
        through it).

        Values: ``v_proj`` is affine and every attention row sums to 1, so head ``h``'s output
        ``P_h @ v_proj(x)`` equals ``W_g @ (P_h @ x) + b_g`` with ``W_g, b_g`` the rows of ``v_proj``
        for head ``h``'s key/value head ``g``. With ``value_mixing`` (default: when that costs fewer
        FLOPs, :func:`fvlm.metrics.flops.value_mixing_pays`; needs a plain ``nn.Linear`` ``v_proj``)
        the values are computed that way: the ``H * Q`` mixed inputs each go through their own
        head's ``head_dim`` rows of ``v_proj``, not all ``S`` rows through all of it, in the forward
        and in the backward. Otherwise from the values of all rows. Same result up to float rounding.
        """
        layer = self.layers[layer_index]
        attn = self._check_full_attention(layer_index)
        seq = hidden.shape[1]
        plain_values = type(attn.v_proj) is nn.Linear
        mix_inputs = value_mixing
        if mix_inputs is None:
            cfg = attn.config
            mix_inputs = plain_values and value_mixing_pays(
                seq, rows.shape[1], cfg.hidden_size, cfg.num_attention_heads, attn.v_proj.out_features // attn.head_dim,
                attn.head_dim)
        elif mix_inputs and not plain_values:
            raise UnsupportedModelError(
                f"rows_forward(value_mixing=True) needs layer {layer_index}'s v_proj to be a plain nn.Linear "
                f"(its weight rows per head), got {type(attn.v_proj).__name__}; use value_mixing=False")
        q, k, v, normed = self.project_qkv(layer_index, hidden, position_embeddings, rows, values=not mix_inputs)
        bsz, heads, nq, hd = q.shape
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        # head h reads key/value head h // groups (repeat_interleave order), without copying k / v
        qg = q.reshape(bsz, kv_heads, groups * nq, hd)
        scores = torch.matmul(qg, k.transpose(2, 3)).view(bsz, heads, nq, seq) * attn.scaling
        scores = scores.masked_fill(~_allowed(key_valid, rows), torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(normed.dtype)
        if mix_inputs:
            mixed = torch.matmul(probs.view(bsz, heads * nq, seq), normed)  # [B, H*Q, D], P X for every head
            mixed = mixed.view(bsz, kv_heads, groups * nq, -1).transpose(0, 1).reshape(kv_heads, bsz * groups * nq, -1)
            weight = attn.v_proj.weight.view(kv_heads, hd, -1)
            out = torch.bmm(mixed, weight.transpose(1, 2))  # each kv head's own rows of v_proj only
            if attn.v_proj.bias is not None:
                out = out + attn.v_proj.bias.view(kv_heads, 1, hd)
            out = out.view(kv_heads, bsz, groups * nq, hd).transpose(0, 1)
        else:
            out = torch.matmul(probs.view(bsz, kv_heads, groups * nq, seq), v)
        out = out.reshape(bsz, heads, nq, hd)
        out = attn.o_proj(out.transpose(1, 2).reshape(bsz, nq, heads * hd))
        residual = hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        mid = residual + out
        return mid + layer.mlp(layer.post_attention_layernorm(mid))


class Projections(NamedTuple):
    """What :meth:`BackboneAdapter.project_qkv` returns (post-rotary queries / keys, values)."""

    queries: torch.Tensor | None
    keys: torch.Tensor
    values: torch.Tensor | None
    normed: torch.Tensor


def _allowed(key_valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[B, 1, Q, S]`` bool: key ``s`` is visible from query row ``rows[b, q]`` (valid and ``s <= row``)."""
    seq = key_valid.shape[1]
    causal = torch.arange(seq, device=rows.device)[None, None, None, :] <= rows[:, None, :, None]
    return key_valid[:, None, None, :] & causal


def _gather_seq(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``t`` (``[B or 1, S, ...]``) along dim 1 with a per-sample ``index`` ``[B, K]``."""
    if t.shape[0] != index.shape[0]:
        t = t.expand(index.shape[0], *t.shape[1:])
    shape = index.shape + t.shape[2:]
    idx = index.reshape(*index.shape, *([1] * (t.dim() - 2))).expand(shape)
    return t.gather(1, idx)


def images_per_row(image_tokens: Sequence[int], row_tokens: Sequence[int]) -> list[list[int]]:
    """Which images each row of the LLM batch shows, as indices into the vision tower's batch.

    ``image_tokens[i]``: visual tokens of image ``i`` (the prompts' images one after another, as the
    vision tower saw them); ``row_tokens[b]``: visual tokens in row ``b`` of the LLM batch. ``generate``
    encodes the images once and may then repeat every prompt ``e`` times in a row (beam search,
    ``num_return_sequences``); the ``e`` copies show the same images. ``e`` is the ratio of the two
    totals. Raises :class:`~fvlm.errors.UnsupportedModelError` when no such layout fits the counts.
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
            raise UnsupportedModelError(
                f"rows {start}..{start + copies - 1} of the batch do not show whole images of the vision "
                f"tower's batch (visual tokens per row {rows}, per image {list(image_tokens)})")
        out += [picked] * copies
    return out


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
