"""Decoder-layer math on a transformers decoder layer's own modules (Llama / Qwen / Mistral shaped).

What the attention of one layer computes, recomputed outside its forward so that it works whatever
attention kernel the model runs: queries / keys / values with the layer's input norm, its per-head
q/k norms where it has them (Qwen3, Gemma) and its rotary function ([`project_qkv`][fvlm.adapters.layer_math.project_qkv]), attention
probabilities of a few query rows ([`attention_rows`][fvlm.adapters.layer_math.attention_rows]), and the layer's output at a few rows only
([`rows_forward`][fvlm.adapters.layer_math.rows_forward]). Every function is differentiable w.r.t. its hidden-state input.
"""
from __future__ import annotations

import sys
from typing import Callable, NamedTuple, Union

import torch
from torch import nn

from fvlm.errors import UnsupportedModelError
from fvlm.indexing import gather_seq

# ``value_mixing`` of [`rows_forward`][fvlm.adapters.layer_math.rows_forward]: a decision, or a rule (seq_len, rows, hidden, heads,
# kv_heads, head_dim) -> bool that is asked only where mixing is possible (a plain nn.Linear v_proj).
ValueMixing = Union[bool, None, Callable[[int, int, int, int, int, int], bool]]


class Projections(NamedTuple):
    """What [`project_qkv`][fvlm.adapters.layer_math.project_qkv] returns (post-norm, post-rotary queries / keys; values)."""

    queries: torch.Tensor | None
    keys: torch.Tensor
    values: torch.Tensor | None
    normed: torch.Tensor


def _heads(proj: nn.Module, norm: nn.Module | None, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``proj(x)`` as ``[B, heads, L, head_dim]``, through ``norm`` the way the layer applies it: per
    head (a norm over ``head_dim``, Qwen3 / Gemma) or over the whole projection (a wider norm)."""
    out = proj(x)
    weight = getattr(norm, "weight", None)
    whole = norm is not None and weight is not None and weight.numel() == out.shape[-1] != head_dim
    if whole:
        out = norm(out)
    out = out.view(*x.shape[:-1], -1, head_dim)
    if norm is not None and not whole:
        out = norm(out)
    return out.transpose(1, 2)


def _rotary(attn: nn.Module) -> Callable:
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def project_qkv(
    layer: nn.Module, hidden_in: torch.Tensor, position_embeddings, rows: torch.Tensor | None = None,
    *, queries: bool = True, values: bool = False, rotary: bool = True,
) -> Projections:
    """What ``layer``'s attention computes from ``hidden_in`` ``[B, S, D]``.

    Runs the layer's own ``input_layernorm`` and ``k_proj`` (+ ``k_norm``; ``v_proj`` if ``values``) on
    all ``S`` rows, and ``q_proj`` (+ ``q_norm``) only on query ``rows`` (``[B, Q]`` positions; ``None`` =
    all rows; skipped if not ``queries``), with the layer's rotary function on queries and keys
    (unless ``rotary=False``: raw projections, as VScan's Qwen scoring uses them). Returns ``queries`` ``[B, H, Q, hd]``, ``keys`` / ``values`` ``[B, H_kv, S, hd]`` (``None`` where not
    asked for) and ``normed``, the normalised input ``[B, S, D]``.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_in)
    hd = attn.head_dim
    cos, sin = position_embeddings if rotary else (None, None)
    apply = _rotary(attn)
    keys = _heads(attn.k_proj, getattr(attn, "k_norm", None), normed, hd)
    if rotary:
        _, keys = apply(keys[:, :1], keys, cos, sin)  # a one-head stand-in for the unused query side
    vals = _heads(attn.v_proj, None, normed, hd) if values else None
    q = None
    if queries:
        q_in = normed if rows is None else gather_seq(normed, rows)
        q = _heads(attn.q_proj, getattr(attn, "q_norm", None), q_in, hd)
        if rotary:
            q_cos, q_sin = (cos, sin) if rows is None else (gather_seq(cos, rows), gather_seq(sin, rows))
            q, _ = apply(q, q[:, :1], q_cos, q_sin)
    return Projections(q, keys, vals, normed)


def rotary_bias(layer: nn.Module, position_embeddings, rows: torch.Tensor) -> torch.Tensor:
    """``[B, Q, S]`` float32: all-ones queries (at ``rows``, ``[B, Q]``) and keys (every position),
    rotated by ``layer``'s rotary function, dot product over ``sqrt(head_dim)``."""
    attn = layer.self_attn
    cos, sin = (t.float() for t in position_embeddings)
    rotary = _rotary(attn)
    ones = torch.ones(rows.shape[0], 1, cos.shape[-2], attn.head_dim, device=cos.device)
    _, keys = rotary(ones[:, :, :1], ones, cos, sin)
    q = ones[:, :, : rows.shape[1]]
    q, _ = rotary(q, q[:, :, :1], gather_seq(cos, rows), gather_seq(sin, rows))
    return torch.matmul(q, keys.transpose(2, 3))[:, 0] / attn.head_dim**0.5


def allowed(key_valid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[B, 1, Q, S]`` bool: key ``s`` is visible from query row ``rows[b, q]`` (valid and ``s <= row``)."""
    seq = key_valid.shape[1]
    causal = torch.arange(seq, device=rows.device)[None, None, None, :] <= rows[:, None, :, None]
    return key_valid[:, None, None, :] & causal


def attention_rows(
    layer: nn.Module, hidden_in: torch.Tensor, position_embeddings, key_valid: torch.Tensor, rows: torch.Tensor,
    *, rotary: bool = True,
) -> torch.Tensor:
    """Attention probabilities ``[B, H, Q, S]`` (float32) of query ``rows`` (``[B, Q]``) in ``layer``.

    ``key_valid`` ``[B, S]`` masks padding; causality is applied per query row; ``rotary=False``
    leaves out the rotary embedding.
    """
    attn = layer.self_attn
    proj = project_qkv(layer, hidden_in, position_embeddings, rows, rotary=rotary)
    queries, keys = proj.queries, proj.keys
    keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    scores = torch.matmul(queries.float(), keys.float().transpose(2, 3)) * attn.scaling
    scores = scores.masked_fill(~allowed(key_valid, rows), torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1)


def rows_forward(
    layer: nn.Module, hidden: torch.Tensor, position_embeddings, key_valid: torch.Tensor, rows: torch.Tensor,
    *, value_mixing: ValueMixing = None,
) -> torch.Tensor:
    """Output ``[B, Q, D]`` of ``layer`` at ``rows`` (``[B, Q]``) only.

    In a causal decoder layer an output row depends on the other rows only through their keys and
    values, so this equals running the whole layer on ``hidden`` (``[B, S, D]``, no cache) and
    gathering ``rows``: norm + key projection (+ rotary) for all ``S`` rows; queries, attention,
    ``o_proj``, ``post_attention_layernorm`` and MLP for the ``Q`` rows. Keys are masked causally per
    query row and by ``key_valid`` ``[B, S]``; grouped-query heads share their key/value head.
    Attention follows HF's eager kernel (scores in the model dtype, softmax in at least float32).

    Values: ``v_proj`` is affine and every attention row sums to 1, so head ``h``'s output
    ``P_h @ v_proj(x)`` equals ``W_g @ (P_h @ x) + b_g`` with ``W_g, b_g`` the rows of ``v_proj`` for
    head ``h``'s key/value head ``g``. With ``value_mixing`` (``True``, or a rule that says so; needs a
    plain ``nn.Linear`` ``v_proj``) the ``H * Q`` mixed inputs each go through their own head's
    ``head_dim`` rows of ``v_proj``; otherwise (``None`` / ``False``) the values of all rows are
    computed. Same result up to float rounding.
    """
    attn = layer.self_attn
    seq = hidden.shape[1]
    plain_values = type(attn.v_proj) is nn.Linear
    mix_inputs = value_mixing
    if callable(value_mixing):
        cfg = attn.config
        mix_inputs = plain_values and value_mixing(
            seq, rows.shape[1], cfg.hidden_size, cfg.num_attention_heads, attn.v_proj.out_features // attn.head_dim,
            attn.head_dim)
    elif mix_inputs and not plain_values:
        raise UnsupportedModelError(
            f"rows_forward(value_mixing=True) needs the layer's v_proj to be a plain nn.Linear (its weight rows "
            f"per head), got {type(attn.v_proj).__name__}; use value_mixing=False")
    q, k, v, normed = project_qkv(layer, hidden, position_embeddings, rows, values=not mix_inputs)
    bsz, heads, nq, hd = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    # head h reads key/value head h // groups (repeat_interleave order), without copying k / v
    qg = q.reshape(bsz, kv_heads, groups * nq, hd)
    scores = torch.matmul(qg, k.transpose(2, 3)).view(bsz, heads, nq, seq) * attn.scaling
    scores = scores.masked_fill(~allowed(key_valid, rows), torch.finfo(scores.dtype).min)
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
    mid = gather_seq(hidden, rows) + out
    return mid + layer.mlp(layer.post_attention_layernorm(mid))


def _span(indices: list[int]) -> str:
    return ", ".join(map(str, indices)) if len(indices) <= 8 else f"{', '.join(map(str, indices[:6]))}, ... ({len(indices)} layers)"


def architecture_problems(layers: nn.ModuleList | None, text_config) -> list[str]:
    """Why this module's math cannot stand for a language model (empty: it can): linear-attention
    layers, sliding-window / chunked attention (masks per layer type), layers of different shapes,
    logit soft-capping. Read from the text config and, when given, the decoder ``layers``, before
    anything runs (``layers=None``: from the config alone, before the weights are loaded)."""
    problems = []
    types = list(getattr(text_config, "layer_types", None) or [])
    count = len(layers) if layers is not None else (getattr(text_config, "num_hidden_layers", None) or len(types))
    attns = [getattr(layer, "self_attn", None) for layer in layers] if layers is not None else []
    linear = {i for i, t in enumerate(types) if "linear" in t}
    linear |= {i for i, a in enumerate(attns) if a is None}
    if linear:
        problems.append(f"linear attention in decoder layers {_span(sorted(linear))} (no softmax attention rows to "
                        "recompute, and a recurrent state instead of a per-token KV cache to prune)")
    windowed = {i for i, t in enumerate(types) if t != "full_attention" and "linear" not in t}
    windowed |= {i for i, a in enumerate(attns) if getattr(a, "sliding_window", None)}
    if not types and getattr(text_config, "sliding_window", None) and getattr(text_config, "use_sliding_window", True):
        windowed |= set(range(count))  # one window for every layer (Mistral)
    if windowed:
        problems.append(f"sliding-window or chunked attention in decoder layers {_span(sorted(windowed))} (masks per "
                        "layer type; fvlm's attention rows and pruned masks assume full causal attention)")
    shapes: dict[tuple, list[int]] = {}
    for i, a in enumerate(attns):
        if a is not None:
            hd = getattr(a, "head_dim", None)
            q, k = getattr(a, "q_proj", None), getattr(a, "k_proj", None)
            shapes.setdefault((hd, getattr(q, "out_features", None), getattr(k, "out_features", None)), []).append(i)
    if len(shapes) > 1:
        parts = "; ".join(f"head_dim {hd}, q/k widths {q}/{k} in layers {_span(idx)}" for (hd, q, k), idx in shapes.items())
        problems.append(f"decoder layers of different shapes ({parts}); fvlm needs one shape in every layer")
    softcap = getattr(text_config, "attn_logit_softcapping", None)
    if softcap:
        problems.append(f"attention logits soft-capped at {softcap}, which the recomputed attention rows do not model")
    return problems


def check_prompt_length(layer: nn.Module, seq_len: int) -> None:
    """Refuse a prompt longer than the range where the layer's queries are unscaled (Ministral 3's
    position-dependent query scaling is 1 below ``original_max_position_embeddings``)."""
    rope = getattr(layer.self_attn.config, "rope_parameters", None) or {}
    beta, limit = rope.get("llama_4_scaling_beta"), rope.get("original_max_position_embeddings")
    if beta and limit and seq_len > limit:
        raise UnsupportedModelError(
            f"a prompt of {seq_len} tokens reaches positions where this model scales its queries by position "
            f"(llama_4_scaling_beta={beta} beyond {limit} positions), which fvlm's attention rows do not model")
