"""Efficiency metrics as pure functions: analytic FLOPs (paper and full conventions), KV-cache
bytes (real cache and analytic), and the visual-token accounting of [`fvlm.budget`][fvlm.budget]. See [`fvlm.metrics.flops`][fvlm.metrics.flops]."""
from fvlm.metrics.flops import (
    FlopsBreakdown,
    TextArch,
    VisionArch,
    decoder_layer_flops,
    full_flops,
    llm_decode_flops,
    llm_prefill_flops,
    paper_flops,
    paper_layer_flops,
    proxy_flops,
    selector_overhead_flops,
    value_mixing_pays,
    vision_flops,
)
from fvlm.metrics.kv import MIB, dtype_bytes, kv_bytes, kv_bytes_per_token, kv_cache_bytes
from fvlm.budget import VisualCounts, layer_average, stage_count, visual_counts

__all__ = [
    "MIB",
    "FlopsBreakdown",
    "TextArch",
    "VisionArch",
    "VisualCounts",
    "decoder_layer_flops",
    "dtype_bytes",
    "full_flops",
    "kv_bytes",
    "kv_bytes_per_token",
    "kv_cache_bytes",
    "layer_average",
    "llm_decode_flops",
    "llm_prefill_flops",
    "paper_flops",
    "paper_layer_flops",
    "proxy_flops",
    "selector_overhead_flops",
    "stage_count",
    "value_mixing_pays",
    "vision_flops",
    "visual_counts",
]
