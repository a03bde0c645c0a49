"""Stage schedules and budget accounting (input count vs. layer average).

A schedule is a list of ``(layer, keep)`` pairs: after ``layer`` decoder layers, ``keep`` visual
tokens remain. Layers before the first stage see all ``n_input`` tokens (PyramidDrop convention:
"64 tokens" means the average over all LLM layers, not the final count).
"""
from __future__ import annotations

import itertools
import math
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
    one factor, rounded and nudged one token at a time to a non-increasing schedule near the target.
    Then every schedule within a few tokens of that one is tried (each stage but the widest moved,
    the widest solved for): the one nearest the target wins, ties going to the one nearest the
    scaled shape. Raises ``ValueError`` when the target cannot be reached.
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
    ideal = [w * budget / weighted for w in shape]
    start = _nudged([max(0, min(n_input, round(x))) for x in ideal], spans, budget, n_input)
    if start != sorted(start, reverse=True):
        raise ValueError(f"no non-increasing schedule after layers {layers} averages {target}")

    def key(counts: list[int]) -> tuple[float, float]:
        return (abs(sum(s * x for s, x in zip(spans, counts)) - budget),
                sum((x - r) ** 2 for x, r in zip(counts, ideal)))

    widest = max(range(len(layers)), key=lambda i: (spans[i], -i))
    others = [i for i in range(len(layers)) if i != widest]
    radius = min(_SEARCH_RADIUS, int((_SEARCH_SIZE ** (1 / max(1, len(others))) - 1) / 2))
    best = start
    for deltas in itertools.product(range(-radius, radius + 1), repeat=len(others)):
        counts = list(start)
        for i, d in zip(others, deltas):
            counts[i] += d
        rest = budget - sum(spans[i] * counts[i] for i in others)
        for c in (math.floor(rest / spans[widest]), math.ceil(rest / spans[widest])):
            counts[widest] = c
            if all(0 <= x <= n_input for x in counts) and counts == sorted(counts, reverse=True) \
                    and key(counts) < key(best):
                best = list(counts)
    return best


_SEARCH_RADIUS = 12  # tokens each non-widest stage may move away from the nudged schedule
_SEARCH_SIZE = 20000  # candidate schedules at most (the radius shrinks with many stages)


def _nudged(counts: list[int], spans: list[int], budget: float, n_input: int) -> list[int]:
    """Move one stage by one token at a time (widest stages first, keeping the schedule
    non-increasing) while that brings ``sum(spans * counts)`` closer to ``budget``."""
    order = sorted(range(len(counts)), key=lambda i: -spans[i])
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
    return counts


def fractions_of_current_to_original(ratios: Sequence[float]) -> list[float]:
    """Convert per-stage ratios of the *current* count (multiplicative) to fractions of the original."""
    out, acc = [], 1.0
    for r in ratios:
        acc *= r
        out.append(acc)
    return out
