"""KV-cache size: measured from a real cache object, and analytic per token / per layer.

``kv_cache_bytes(cache)`` sums ``numel * element_size`` of every key and value tensor the cache
holds (transformers ``DynamicCache`` and friends, or a legacy tuple of ``(key, value)`` pairs). For
a pre-allocated cache (``StaticCache``) that is the allocated size, not the used part. The analytic
functions give the same figure from lengths: per layer ``2 (K and V) x num_kv_heads x head_dim x
bytes`` per token. Vicuna-7B in float16: 32 layers x 2 x 4096 x 2 B = 0.5 MiB per token.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

MIB = 1024**2

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
                "float8": 1, "fp8": 1, "int8": 1, "uint8": 1}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a torch dtype or its name (``"float16"``, ``"bf16"``, ...)."""
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    name = str(dtype).replace("torch.", "").lower()
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def cache_tensors(cache: Any) -> Iterator[Any]:
    """Every key and value tensor held by ``cache`` (layers that were never written are skipped)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56 Cache: per-layer objects with .keys / .values
        for layer in layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if tensor is not None and hasattr(tensor, "element_size"):
                    yield tensor
        return
    if isinstance(cache, (tuple, list)):  # legacy ((k, v), ...) format
        for entry in cache:
            for tensor in entry:
                if tensor is not None:
                    yield tensor
        return
    raise TypeError(f"cannot read key/value tensors from {type(cache).__name__}")


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of all key and value tensors in a real cache (works on the meta device too)."""
    return int(sum(t.numel() * t.element_size() for t in cache_tensors(cache)))


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_element: int) -> int:
    """Cache bytes one token adds across all layers: ``layers x 2 x kv_heads x head_dim x bytes``."""
    return num_layers * 2 * num_kv_heads * head_dim * bytes_per_element


def kv_bytes(lengths_per_layer: Sequence[int], num_kv_heads: int, head_dim: int, bytes_per_element: int,
             batch: int = 1) -> int:
    """Cache bytes for per-layer cache lengths (in-LLM pruning makes later layers shorter).

    ``lengths_per_layer`` is e.g. `fvlm.Trace.kv_length` (per-row lengths incl. padding) with
    ``batch`` rows.
    """
    per_token_layer = 2 * num_kv_heads * head_dim * bytes_per_element
    return int(batch * per_token_layer * sum(lengths_per_layer))
