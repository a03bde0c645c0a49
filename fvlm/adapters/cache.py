"""Where transformers passes and returns the KV cache, under either of its names.

transformers 5.24 renamed the cache from ``past_key_values`` to ``cache``: in the keyword arguments
of every ``forward`` and in model and ``generate`` outputs. fvlm supports releases on both sides of
the rename and reads the cache only through :func:`cache_of`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CACHE_NAMES = ("cache", "past_key_values")  # newest first


def cache_of(source: Any) -> Any:
    """The KV cache in a forward call's keyword arguments or in a model / ``generate`` output.

    ``source`` is a mapping (``kwargs``, a ``ModelOutput``) or an object with attributes; returns
    ``None`` where it holds no cache under either name.
    """
    for name in CACHE_NAMES:
        value = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
        if value is not None:
            return value
    return None


def is_prefill_call(kwargs: Mapping[str, Any]) -> bool:
    """Whether a forward call with these keyword arguments is a prefill (no cache, or an empty one).

    In ``generate`` that is the first forward call; every later one decodes against the cache.
    """
    cache = cache_of(kwargs)
    return cache is None or cache.get_seq_length() == 0
