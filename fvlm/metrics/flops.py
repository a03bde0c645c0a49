"""Analytic FLOPs in two clearly separated conventions (pure functions, no torch).

**Paper convention** ([`paper_layer_flops`][fvlm.metrics.flops.paper_layer_flops], [`paper_flops`][fvlm.metrics.flops.paper_flops]): the count the FastV /
PyramidDrop / PIO-FVLM efficiency tables print. Per decoder layer with ``n`` tokens::

    f(n) = 4 n d^2 + 2 n^2 d + 2 n d m        (d hidden size, m MLP intermediate size)

summed over the layers, with ``n`` the number of **visual tokens only** at each layer. It counts one
multiply-add as one operation, assumes full multi-head attention (four d x d projections) and a
two-matrix MLP, and leaves out text tokens, the LM head, the vision tower and any selection cost.
LLaVA-1.5-7B (Vicuna-7B, d=4096, m=11008, 32 layers) at 576 visual tokens: 2.986e12. SparseVLM's
code counts the gated MLP as ``3 n d m`` instead: that is [`paper_layer_flops`][fvlm.metrics.flops.paper_layer_flops] with
``mlp_matrices=3``.

**Full convention** ([`full_flops`][fvlm.metrics.flops.full_flops] and its parts): what the model really computes in a prefill,
counted like ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add of every matrix
product; element-wise work such as norms, rotary, softmax and activations is not counted):

* every token of the sequence at each layer (text + visual + padding rows),
* grouped-query projections (``num_kv_heads`` for K and V), the attention products over the full
  ``q_len x kv_len`` rectangle (what dense SDPA / eager kernels compute; flash kernels skip the masked
  half of a causal prefill),
* the gated (SwiGLU, 3-matrix) or plain (2-matrix) MLP,
* the LM head on the rows whose logits are computed (``generate`` keeps only the last one),
* the vision tower (patch embedding, every encoder layer, windowed attention for Qwen2.5-VL) and the
  projector / merger,
* selector overhead (e.g. PIO-FVLM's proxy forward + backward), passed in by the caller (see
  [`selector_overhead_flops`][fvlm.metrics.flops.selector_overhead_flops]).

The architecture is described by the small frozen dataclasses [`TextArch`][fvlm.types.ModelInfo] (the shared
[`fvlm.types.ModelInfo`][fvlm.types.ModelInfo]) and [`VisionArch`][fvlm.metrics.flops.VisionArch] (build them from a transformers config with `fvlm.profiling.arch`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

from fvlm.types import ModelInfo

# ---------------------------------------------------------------------------------------------
# Paper convention
# ---------------------------------------------------------------------------------------------


def paper_layer_flops(n: float, hidden: int, intermediate: int, mlp_matrices: int = 2) -> float:
    """One decoder layer in the papers' convention: ``4nd^2 + 2n^2d + mlp_matrices * n d m``."""
    d, m = hidden, intermediate
    return 4 * n * d * d + 2 * n * n * d + mlp_matrices * n * d * m


def paper_flops(visual_per_layer: Iterable[float], hidden: int, intermediate: int, mlp_matrices: int = 2) -> float:
    """Papers' convention summed over layers; ``visual_per_layer[i]`` = visual tokens at layer ``i``.

    >>> round(paper_flops([576] * 32, 4096, 11008) / 1e12, 3)   # LLaVA-1.5-7B, keep-all
    2.986
    """
    return float(sum(paper_layer_flops(n, hidden, intermediate, mlp_matrices) for n in visual_per_layer))


# ---------------------------------------------------------------------------------------------
# Architecture descriptions for the full convention
# ---------------------------------------------------------------------------------------------


TextArch = ModelInfo  # the language model: one architecture record for selectors and FLOP counts


@dataclass(frozen=True)
class VisionArch:
    """The vision tower and projector.

    ``kind``: ``"clip"`` (a ViT over fixed-size tiles, with a CLS token or without one as SigLIP:
    LLaVA, LLaVA-NeXT, LLaVA-OneVision) or ``"qwen"`` (Qwen2-VL / Qwen2.5-VL / Qwen3-VL: 3-D patch
    embedding, optional windowed attention, 2x2 patch merger).
    ``projector``: the ``(fan_in, fan_out)`` of each linear layer the projector/merger applies per
    output token (LLaVA: ``[(1024, 4096), (4096, 4096)]``; Qwen: ``[(4*1280, 4*1280), (4*1280, 3584)]``;
    Qwen3-VL adds its DeepStack mergers).
    """

    kind: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    in_channels: int = 3
    gated_mlp: bool = False
    image_size: int = 0  # clip: the tile size in pixels
    has_cls: bool = True  # clip: the tower adds a CLS token (CLIP; SigLIP has none)
    keep_cls: bool = False  # clip: vision_feature_select_strategy "full" projects the CLS token too
    temporal_patch_size: int = 1  # qwen
    spatial_merge_size: int = 1  # qwen
    window_size: int = 0  # qwen2.5: attention window in pixels (0: full attention everywhere)
    fullatt_layers: tuple[int, ...] = ()  # qwen2.5: layers with full attention
    projector: tuple[tuple[int, int], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Full convention: building blocks
# ---------------------------------------------------------------------------------------------


def linear_flops(rows: float, fan_in: int, fan_out: int) -> float:
    """A dense ``rows x fan_in @ fan_in x fan_out`` product: ``2 * rows * fan_in * fan_out``."""
    return 2 * rows * fan_in * fan_out


def attention_flops(q_len: float, kv_len: float, num_heads: int, head_dim: int) -> float:
    """Scores ``Q K^T`` and ``P V`` over the full ``q_len x kv_len`` rectangle, all query heads."""
    return 2 * (2 * q_len * kv_len * num_heads * head_dim)


def decoder_layer_flops(q_len: float, kv_len: float, text: TextArch) -> float:
    """One decoder layer on ``q_len`` new tokens attending to ``kv_len`` keys (prefill: equal)."""
    d, hd = text.hidden_size, text.head_dim
    q_width, kv_width = text.num_heads * hd, text.num_kv_heads * hd
    projections = linear_flops(q_len, d, q_width) + 2 * linear_flops(q_len, d, kv_width) + linear_flops(q_len, q_width, d)
    mlp = (3 if text.gated_mlp else 2) * linear_flops(q_len, d, text.intermediate_size)
    return projections + attention_flops(q_len, kv_len, text.num_heads, hd) + mlp


def lm_head_flops(rows: float, text: TextArch) -> float:
    """The LM head on ``rows`` positions (``generate``'s prefill computes 1 row per sample)."""
    return linear_flops(rows, text.hidden_size, text.vocab_size)


def llm_prefill_flops(tokens_per_layer: Sequence[float], text: TextArch) -> float:
    """All decoder layers of a prefill; ``tokens_per_layer[i]`` = sequence length at layer ``i``."""
    _check_layers(tokens_per_layer, text)
    return float(sum(decoder_layer_flops(n, n, text) for n in tokens_per_layer))


def llm_decode_flops(kv_per_layer: Sequence[float], text: TextArch) -> float:
    """One decode step (one new token per sample); ``kv_per_layer[i]`` = keys it attends to at layer
    ``i`` (the cache length *including* the new token). Includes the LM head on that token."""
    _check_layers(kv_per_layer, text)
    return float(sum(decoder_layer_flops(1, t, text) for t in kv_per_layer)) + lm_head_flops(1, text)


def _check_layers(values: Sequence[float], text: TextArch) -> None:
    if len(values) != text.num_layers:
        raise ValueError(f"need one value per decoder layer ({text.num_layers}), got {len(values)}")


def vit_layer_flops(tokens: float, vision: VisionArch, attention_groups: Sequence[float] | None = None) -> float:
    """One vision encoder layer on ``tokens`` tokens.

    ``attention_groups`` (token counts summing to ``tokens``) splits attention into independent
    blocks (per image, or per window for Qwen2.5-VL's windowed layers); default: one block.
    """
    d = vision.hidden_size
    groups = [tokens] if attention_groups is None else attention_groups
    attn = sum(attention_flops(g, g, vision.num_heads, d // vision.num_heads) for g in groups)
    mlp = (3 if vision.gated_mlp else 2) * linear_flops(tokens, d, vision.intermediate_size)
    return 4 * linear_flops(tokens, d, d) + attn + mlp


def qwen_windows(grid_h: int, grid_w: int, vision: VisionArch) -> list[int]:
    """Patch counts of Qwen2.5-VL's attention windows for one ``grid_h x grid_w`` patch grid (per frame)."""
    merge = vision.spatial_merge_size
    side = vision.window_size // merge // vision.patch_size  # window side in merged units
    mh, mw = grid_h // merge, grid_w // merge

    def chunks(length: int) -> list[int]:
        return [min(side, length - s) for s in range(0, length, side)]

    return [a * b * merge * merge for a in chunks(mh) for b in chunks(mw)]


def vision_flops(vision: VisionArch, images: Sequence[Mapping]) -> dict[str, float]:
    """Vision tower + projector for a list of images.

    Each image is ``{"tiles": k}`` for CLIP (k crops of ``image_size`` pixels: 1 for LLaVA-1.5, 5 for
    LLaVA-NeXT at 672x672) or ``{"grid_thw": [t, h, w]}`` (in patches) for Qwen. Returns
    ``{"embed", "encoder", "projector"}`` in FLOPs. Every encoder layer is counted, since transformers
    runs them all even when the features come from the penultimate layer.
    """
    embed = encoder = projector = 0.0
    d = vision.hidden_size
    for image in images:
        if vision.kind == "clip":
            tiles = int(image.get("tiles", 1))
            patches = (vision.image_size // vision.patch_size) ** 2
            tokens = patches + int(vision.has_cls)
            embed += tiles * linear_flops(patches, vision.in_channels * vision.patch_size**2, d)
            encoder += tiles * vision.num_layers * vit_layer_flops(tokens, vision)
            out_tokens = tiles * (tokens if vision.keep_cls and vision.has_cls else patches)
        elif vision.kind == "qwen":
            t, h, w = (int(x) for x in image["grid_thw"])
            patches = t * h * w
            patch_in = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
            embed += linear_flops(patches, patch_in, d)
            full = [float(patches)]
            windowed = qwen_windows(h, w, vision) * t if vision.window_size else full
            for i in range(vision.num_layers):
                groups = full if (not vision.window_size or i in vision.fullatt_layers) else windowed
                encoder += vit_layer_flops(patches, vision, groups)
            out_tokens = patches // vision.spatial_merge_size**2
        else:
            raise ValueError(f"unknown vision kind {vision.kind!r} (expected 'clip' or 'qwen')")
        projector += sum(linear_flops(out_tokens, a, b) for a, b in vision.projector)
    return {"embed": embed, "encoder": encoder, "projector": projector}


# ---------------------------------------------------------------------------------------------
# Selector overhead
# ---------------------------------------------------------------------------------------------

PROXY_ROWS = 4  # PIO-FVLM: the loss uses the last 4 positions of the shifted logits


def value_mixing_pays(seq_len: float, rows: int, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether ``BackboneAdapter.rows_forward`` computes the values of ``rows`` query rows as mixed
    inputs (``P X`` for every head, then each head's ``head_dim`` rows of ``v_proj``) rather than
    from the values of all ``seq_len`` rows (``v_proj`` on every row, then ``P V``): whichever has
    fewer multiply-adds (a tie keeps all rows)."""
    mixed = num_heads * rows * (seq_len * hidden + hidden * head_dim)
    direct = seq_len * hidden * num_kv_heads * head_dim + num_heads * rows * seq_len * head_dim
    return mixed < direct


def proxy_flops(seq_len: float, text: TextArch, loss_rows: int = PROXY_ROWS, mode: str = "rows",
                head_rows: str = "loss", backward: bool = True, value_mixing: bool | None = None) -> float:
    """PIO-FVLM's layer-local proxy at one stage on ``seq_len`` current tokens: one decoder block, the
    final norm and LM head, then (``backward``) the gradient w.r.t. the hidden states only (weights get
    no gradient: one ``dX = dY W^T`` product per linear layer).

    ``mode="rows"`` (fvlm's default; ``BackboneAdapter.rows_forward``): the block runs for the
    ``loss_rows`` query rows only: keys of all rows, queries / ``o_proj`` / MLP / head on the rows,
    attention as matmuls (backward 2x the forward). Values: from all rows (``v_proj`` on ``seq_len``
    rows, then ``P V``), or with ``value_mixing`` (default: [`value_mixing_pays`][fvlm.metrics.flops.value_mixing_pays], as
    ``rows_forward`` decides) from mixed inputs: ``P X`` for every head, then each of those
    ``heads x rows`` vectors through its head's ``head_dim`` rows of ``v_proj``. ``mode="block"``: the whole block on all rows like the authors' code (SDPA
    attention, backward 2.5x the forward: scores recomputed, then dV, dP, dQ, dK), with the head on
    the loss rows (``head_rows="loss"``) or on every row (``"all"``).
    """
    d, hd, h = text.hidden_size, text.head_dim, text.num_heads
    q_width, kv_width = h * hd, text.num_kv_heads * hd
    n, k = seq_len, min(loss_rows, seq_len)
    mlp = 3 if text.gated_mlp else 2
    if mode == "rows":
        mixing = value_mixing_pays(n, k, d, h, text.num_kv_heads, hd) if value_mixing is None else value_mixing
        linear = (linear_flops(n, d, kv_width) + linear_flops(k, d, q_width) + linear_flops(k, q_width, d)
                  + mlp * linear_flops(k, d, text.intermediate_size))
        scores = 2 * k * n * h * hd  # Q K^T
        if mixing:
            linear += linear_flops(h * k, d, hd)
            mix = 2 * h * k * n * d  # P X for every head
        else:
            linear += linear_flops(n, d, kv_width)
            mix = 2 * k * n * h * hd  # P V
        attn, attn_backward = scores + mix, 2.0
    elif mode == "block":
        linear = (2 * linear_flops(n, d, kv_width) + 2 * linear_flops(n, d, q_width)
                  + mlp * linear_flops(n, d, text.intermediate_size))
        attn, attn_backward = attention_flops(n, n, h, hd), 2.5
    else:
        raise ValueError(f"proxy mode must be 'rows' or 'block', got {mode!r}")
    head = lm_head_flops(n if (mode == "block" and head_rows == "all") else k, text)
    forward = linear + attn + head
    if not backward:
        return forward
    return forward + linear + attn_backward * attn + head


def attention_rows_flops(seq_len: float, text: TextArch, rows: int = 1) -> float:
    """Recomputing ``rows`` attention rows of one layer (FastV-style, under SDPA): queries of the
    rows, keys of all ``seq_len`` tokens, and the ``rows x seq_len`` scores of every head."""
    hd = text.head_dim
    return (linear_flops(rows, text.hidden_size, text.num_heads * hd)
            + linear_flops(seq_len, text.hidden_size, text.num_kv_heads * hd)
            + 2 * rows * seq_len * text.num_heads * hd)


def key_states_flops(seq_len: float, text: TextArch) -> float:
    """Recomputing one layer's key states for ``seq_len`` tokens (DART-style)."""
    return linear_flops(seq_len, text.hidden_size, text.num_kv_heads * text.head_dim)


def similarity_flops(n_visual: float, hidden: int) -> float:
    """The ``N x N`` cosine-similarity matrix of ``n_visual`` tokens: ``2 N^2 d``."""
    return 2 * n_visual * n_visual * hidden


def nms_similarity_flops(n_visual: float, kept: float | None, hidden: int) -> float:
    """PIO-FVLM's NMS (`fvlm.selectors.algorithms.nms_fill`): the similarity block of the
    ``min(N, 2 k)`` best-ranked of ``n_visual`` tokens (``kept`` = k; ``None``: all ``N``). A stage
    where NMS suppresses more than k of them recomputes a bigger block, which this does not count."""
    m = n_visual if kept is None else min(n_visual, 2 * kept)
    return similarity_flops(m, hidden)


def dpp_map_flops(n: float, dim: int, k: float) -> float:
    """CDPruner's greedy DPP MAP on one view of ``n`` tokens: the ``2 n^2 d`` similarity kernel and
    the Cholesky-row updates (``2 t n`` at step ``t``, about ``n k^2`` for ``k`` picks)."""
    return similarity_flops(n, dim) + n * k * k


def clip_text_flops(rows: float = 1, tokens: int = 77, layers: int = 12, width: int = 768, mlp: int = 3072) -> float:
    """A CLIP text tower on ``rows`` rows of ``tokens`` tokens, with its projection (defaults: the
    ViT-L/14 text tower CDPruner uses: 12 layers, width 768, MLP 3072)."""
    per_row = layers * (4 * linear_flops(tokens, width, width) + 2 * linear_flops(tokens, width, mlp)
                        + attention_flops(tokens, tokens, 1, width)) + linear_flops(1, width, width)
    return rows * per_row


def merge_flops(n: float, kept: float, dim: int) -> float:
    """Assigning each of the ``n - kept`` dropped tokens to its most similar kept token (VScan)."""
    return 2 * (n - kept) * kept * dim


def cls_rows_flops(tokens: float, width: int) -> float:
    """One CLS-query attention row of a vision layer recomputed from its input: keys of all
    ``tokens``, the CLS query and the scores."""
    return linear_flops(tokens, width, width) + linear_flops(1, width, width) + 2 * tokens * width


def received_attention_flops(patches: float, width: int) -> float:
    """The attention every patch receives in one full-attention vision block (Qwen2.5-VL): queries and
    keys of all ``patches`` and the ``patches x patches`` scores."""
    return 2 * linear_flops(patches, width, width) + 2 * patches * patches * width


def selector_overhead_flops(needs: Iterable, seq_len: float, text: TextArch, n_visual: float = 0,
                            nms: bool = False, kept: float | None = None, **proxy_options) -> float:
    """Estimated extra FLOPs of one in-LLM stage from what the selector declares it needs.

    ``needs`` holds [`fvlm.Need`][fvlm.types.Need] members (or their string values): ``gradient`` -> the
    PIO-FVLM proxy ([`proxy_flops`][fvlm.metrics.flops.proxy_flops] with ``proxy_options``: ``loss_rows``, ``mode``,
    ``head_rows``) plus, with ``nms``, the similarity block of the NMS that keeps ``kept`` of the
    ``n_visual`` tokens ([`nms_similarity_flops`][fvlm.metrics.flops.nms_similarity_flops]); else ``attention`` -> one recomputed attention row
    ([`attention_rows_flops`][fvlm.metrics.flops.attention_rows_flops]); else ``keys`` -> one layer's keys. Other similarity / top-k work
    is not counted. A selector can replace this estimate by defining
    ``overhead_flops(info, stage, seq_len, n_visual) -> float``.
    """
    values = {getattr(n, "value", n) for n in needs}
    if "gradient" in values:
        nms_flops = nms_similarity_flops(n_visual, kept, text.hidden_size) if nms else 0.0
        return proxy_flops(seq_len, text, **proxy_options) + nms_flops
    if "attention" in values:
        return attention_rows_flops(seq_len, text)
    if "keys" in values:
        return key_states_flops(seq_len, text)
    return 0.0


# ---------------------------------------------------------------------------------------------
# Full convention: a whole prefill
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsBreakdown:
    """A prefill in the full convention, by component (FLOPs per sample unless built with batch)."""

    vision: float
    projector: float
    llm: float
    lm_head: float
    overhead: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.llm + self.lm_head + self.overhead

    @property
    def model(self) -> float:
        """Everything but the selector overhead (the FLOPs-ideal reference)."""
        return self.total - self.overhead

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(total=self.total, model=self.model)
        return out


def full_flops(
    text: TextArch,
    tokens_per_layer: Sequence[float],
    *,
    vision: VisionArch | None = None,
    images: Sequence[Mapping] = (),
    lm_head_rows: float = 1,
    overhead: float = 0.0,
    batch: int = 1,
) -> FlopsBreakdown:
    """A prefill in the full convention.

    ``tokens_per_layer[i]``: sequence length (text + visual, per sample) entering decoder layer ``i``.
    ``images``: per-sample images for the vision tower (see [`vision_flops`][fvlm.metrics.flops.vision_flops]). ``lm_head_rows``:
    rows per sample whose logits are computed (1 in ``generate``). ``overhead``: selector FLOPs per
    sample ([`selector_overhead_flops`][fvlm.metrics.flops.selector_overhead_flops]). Everything is multiplied by ``batch``.
    """
    vis = vision_flops(vision, images) if vision is not None and images else {"embed": 0.0, "encoder": 0.0, "projector": 0.0}
    return FlopsBreakdown(
        vision=batch * (vis["embed"] + vis["encoder"]),
        projector=batch * vis["projector"],
        llm=batch * llm_prefill_flops(tokens_per_layer, text),
        lm_head=batch * lm_head_flops(lm_head_rows, text),
        overhead=batch * overhead,
    )
