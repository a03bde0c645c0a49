"""Stage schedules and budget accounting (input count vs. layer average).

A schedule is a list of ``(layer, keep)`` pairs: after ``layer`` decoder layers, ``keep`` visual
tokens remain. Layers before the first stage see all ``n_input`` tokens (PyramidDrop convention:
"64 tokens" means the average over all LLM layers, not the final count).
"""
from __future__ import annotations

from typing import Sequence


def layer_average(schedule: Sequence[tuple[int, int]], num_layers: int, n_input: int) -> float:
    """Visual tokens averaged over ``num_layers`` decoder layers for an in-LLM ``schedule``."""
    total, count, start = 0, n_input, 0
    for layer, keep in sorted(schedule):
        total += (layer - start) * count
        start, count = layer, keep
    total += (num_layers - start) * count
    return total / num_layers


def counts_for_average(
    layers: Sequence[int], target: float, num_layers: int, n_input: int, shape: Sequence[float] | None = None
) -> list[int]:
    """Per-stage keep counts after ``layers`` whose layer average is as close as possible to ``target``.

    The counts follow ``shape`` (relative sizes per stage; default: halving at every stage) scaled by
    one factor, rounded, then nudged one token at a time (widest stages first) to the integer
    solution nearest the target. Raises ``ValueError`` when the target cannot be reached.
    """
    layers = sorted(layers)
    shape = list(shape) if shape is not None else [0.5**i for i in range(len(layers))]
    if len(shape) != len(layers):
        raise ValueError(f"shape has {len(shape)} entries for {len(layers)} stages")
    spans = [b - a for a, b in zip(layers, [*layers[1:], num_layers])]
    budget = target * num_layers - layers[0] * n_input  # token-layers left for the stages
    weighted = sum(s * w for s, w in zip(spans, shape))
    if budget < 0 or weighted <= 0:
        raise ValueError(f"a layer average of {target} is below what the first {layers[0]} layers already use")
    counts = [max(0, min(n_input, round(w * budget / weighted))) for w in shape]
    order = sorted(range(len(layers)), key=lambda i: -spans[i])
    improved = True
    while improved:
        improved = False
        error = sum(s * c for s, c in zip(spans, counts)) - budget
        for i in order:
            step = -1 if error > 0 else 1
            new = counts[i] + step
            if 0 <= new <= n_input and (i == 0 or new <= counts[i - 1]) and (i + 1 == len(counts) or new >= counts[i + 1]):
                if abs(error + step * spans[i]) < abs(error):
                    counts[i] = new
                    improved = True
                    break
    if counts != sorted(counts, reverse=True):
        raise ValueError(f"no non-increasing schedule after layers {layers} averages {target}")
    return counts


def fractions_of_current_to_original(ratios: Sequence[float]) -> list[float]:
    """Convert per-stage ratios of the *current* count (multiplicative) to fractions of the original."""
    out, acc = [], 1.0
    for r in ratios:
        acc *= r
        out.append(acc)
    return out
