"""Cross-check the analytic keep-all profile on the real 7B model built on the meta device.

The meta device carries shapes but no data, so a forward pass costs well under a second, needs no
weights and no memory, and still goes through transformers' real code: ``FlopCounterMode`` counts
the real matmuls and the real ``DynamicCache`` holds real-shaped (empty) key/value tensors.
"""
from __future__ import annotations

import torch

from fvlm.adapters import adapter_for
from fvlm.metrics.flops import lm_head_flops, llm_prefill_flops, vision_flops
from fvlm.metrics.kv import dtype_bytes, kv_bytes, kv_cache_bytes
from fvlm.profiling.arch import Architecture, build_meta_model
from fvlm.profiling.flop_counter import measure_flops


def meta_check(arch: Architecture, visual_tokens: int | None = None, text_tokens: int | None = None) -> dict:
    """Keep-all prefill of ``arch`` on the meta device: measured vs analytic FLOPs and KV bytes.

    Returns ``{"llm": (measured, analytic), "kv_bytes": (measured, analytic), "vision": (measured,
    analytic) or None}``; ``llm`` covers the decoder layers and the LM head on the last position.
    The vision tower is run for the tile-based towers (LLaVA, LLaVA-NeXT, LLaVA-OneVision); Qwen's
    vision tower computes window indices / position interpolation from data and does not run on the
    meta device.
    """
    seq = (arch.visual_tokens if visual_tokens is None else visual_tokens) + (
        arch.text_tokens if text_tokens is None else text_tokens)
    dtype = getattr(torch, arch.kv_dtype)
    model = build_meta_model(arch).to(dtype)
    t = arch.text
    embeds = torch.empty(1, seq, t.hidden_size, device="meta", dtype=dtype)
    with torch.no_grad():
        out, measured = measure_flops(model, inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    result = {
        "llm": (measured.total, llm_prefill_flops([seq] * t.num_layers, t) + lm_head_flops(1, t)),
        "kv_bytes": (kv_cache_bytes(adapter_for(model).cache_of(out)),
                     kv_bytes([seq] * t.num_layers, t.num_kv_heads, t.head_dim, dtype_bytes(dtype))),
        "vision": None,
    }
    v = arch.vision
    if v is not None and v.kind == "clip" and arch.images:
        tiles = int(arch.images[0].get("tiles", 1))
        kwargs = {}
        if arch.model_type in ("llava_next", "llava_onevision"):  # any-res: the tiles of one image
            side = v.image_size
            pixels = torch.empty(1, tiles, v.in_channels, side, side, device="meta", dtype=dtype)
            grid = {1: (1, 1), 3: (1, 2), 5: (2, 2)}.get(tiles, (1, 1))
            kwargs["image_sizes"] = torch.tensor([[grid[0] * side, grid[1] * side]])
        else:
            pixels = torch.empty(tiles, v.in_channels, v.image_size, v.image_size, device="meta", dtype=dtype)
        with torch.no_grad():
            _, vis = measure_flops(adapter_for(model).image_features, pixel_values=pixels, **kwargs)
        result["vision"] = (vis.total, sum(vision_flops(v, arch.images[:1]).values()))
    return result
