"""The visual-token budget: how a keep is spelled, how stages become per-layer counts, the layer average.

Spelling: an ``int`` keep is a count of visual tokens, a ``float`` a fraction in (0, 1] of each
sample's original visual tokens (``keep: 1`` keeps one token, ``keep: 1.0`` keeps all); a stage
turns it into a count with [`Stage.count`][fvlm.types.Stage.count] (its ``rounding``), or
with the selector's [`keep_count`][fvlm.selectors.base.TokenSelector.keep_count] where the authors'
count follows another rule.

Per-layer counts follow the rules of [`fvlm.PruningSession`][fvlm.PruningSession]: a ``"vision"`` / ``"input"``
stage sets the count that enters the LLM; a stage at ``l`` (after ``l`` decoder layers) sets the
count of layers ``l`` and later. The *layer average* is the mean of the per-layer counts over all
decoder layers (the PyramidDrop convention the papers' budgets use: "64 tokens" is that average,
not the final count). A selector maps a target layer average to its own arguments with
[`TokenSelector.for_average`][fvlm.selectors.base.TokenSelector.for_average].
"""
from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fvlm.errors import BudgetError, FVLMError
from fvlm.types import Stage

KEEP_RULE = "an int count >= 1, or a float fraction in (0, 1] of each sample's visual tokens (1.0 keeps all)"
#: Parameters a layer-average budget sets, in this order of preference. AVERAGE_PARAMETERS take the
#: target itself (the selector maps it to its own stage counts); COUNT_PARAMETERS are a kept-token
#: count, searched until the schedule's layer average is nearest the target.
AVERAGE_PARAMETERS = ("average", "target_average", "budget")
COUNT_PARAMETERS = ("keep", "num_tokens", "tokens")
BUDGET_PARAMETERS = AVERAGE_PARAMETERS + COUNT_PARAMETERS


def stage_count(keep: int | float, original: int) -> int:
    """Visual tokens a stage keeps: an int count, or a float fraction of ``original`` ([`Stage.count`][fvlm.types.Stage.count])."""
    return int(Stage("input", keep).count(original))


@dataclass(frozen=True)
class VisualCounts:
    """Visual tokens of one sample: ``original`` (before any stage), ``llm_input`` (entering layer 0)
    and ``per_layer[i]`` (entering decoder layer ``i``)."""

    original: int
    llm_input: int
    per_layer: tuple[int, ...]

    @property
    def layer_average(self) -> float:
        """Average over all decoder layers (the PyramidDrop convention the papers' budgets use)."""
        return layer_average(self.per_layer)


def visual_counts(stages: Sequence[Stage], num_layers: int, original: int, selector=None,
                  images: int = 1) -> VisualCounts:
    """Expand a stage schedule into per-layer visual-token counts for ``original`` visual tokens in
    ``images`` images (a ``selector`` gives each stage's count with its ``keep_count``)."""
    count = llm_input = original
    changes: dict[int, int] = {}
    for stage in sorted(stages, key=lambda s: s.order):
        if selector is None:
            keep = int(stage.count(original))
        else:
            keep = int(selector.keep_count(stage, torch.tensor([count]), torch.tensor([original]),
                                           torch.tensor([images]))[0])
        if keep > count:
            raise ValueError(f"stage at {stage.where!r} keeps {keep} visual tokens but only {count} remain")
        if isinstance(stage.where, int):
            if stage.where >= num_layers:
                raise ValueError(f"stage after layer {stage.where} is out of range for {num_layers} decoder layers")
            changes[stage.where] = keep
        else:
            llm_input = keep
        count = keep
    per_layer, current = [], llm_input
    for i in range(num_layers):
        current = changes.get(i, current)
        per_layer.append(current)
    return VisualCounts(original, llm_input, tuple(per_layer))


def layer_average(per_layer: Sequence[float]) -> float:
    """Mean of a per-layer count (e.g. ``Trace.visual_per_layer[b]``)."""
    if not per_layer:
        raise ValueError("need at least one layer")
    return sum(per_layer) / len(per_layer)


def schedule_average(schedule: Sequence[tuple[int, int]], num_layers: int, n_input: int) -> float:
    """The layer average of an in-LLM ``schedule`` of ``(layer, keep)`` pairs for ``n_input`` tokens."""
    return visual_counts([Stage(layer, keep) for layer, keep in schedule], num_layers, n_input).layer_average


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


def check_average(target: float, original: int) -> None:
    """Raise [`BudgetError`][fvlm.errors.BudgetError] unless ``0 < target <= original`` (a reachable layer average)."""
    if not 0 < target <= original:
        raise BudgetError(f"a layer-average budget of {target:g} visual tokens is outside (0, {original}]: "
                          f"the model has {original} visual tokens per sample")


def budget_parameter(selector_class: type) -> str | None:
    """The first of [`BUDGET_PARAMETERS`][fvlm.budget.BUDGET_PARAMETERS] that ``selector_class`` takes, or None."""
    params = inspect.signature(selector_class.__init__).parameters
    return next((p for p in BUDGET_PARAMETERS if p in params), None)


def with_input_size(selector_class: type, params: dict, original: int) -> dict:
    """``params`` with ``n_visual=original`` for a selector that derives its stage counts for an input
    size (PIO-FVLM's ``average``), unless given."""
    if "n_visual" in inspect.signature(selector_class.__init__).parameters and "n_visual" not in params:
        return {**params, "n_visual": original}
    return params


def arguments_for_average(selector_class: type, target: float, info, original: int, params: dict) -> dict:
    """``params`` plus the value of the selector's budget parameter whose schedule averages ``target``
    visual tokens (of ``original``) over the decoder layers of ``info`` (a [`ModelInfo`][fvlm.types.ModelInfo]).

    An average parameter (``average``, ...) gets ``target`` as is (the selector's own mapping to stage
    counts is authoritative); a count parameter (``keep``, ...) is searched over ``1..original`` for the
    schedule whose layer average is nearest ``target`` (FastV keeping R after K layers:
    R = (L * target - K * N) / (L - K), rounded). A selector with an ``n_visual`` parameter gets
    ``original`` unless given. The default of ``TokenSelector.for_average``.
    """
    name = selector_class.__name__
    check_average(target, original)
    params = with_input_size(selector_class, params, original)
    param = budget_parameter(selector_class)
    if param is None:
        raise BudgetError(f"{name} has none of the budget parameters {', '.join(BUDGET_PARAMETERS)}; "
                          "give its own parameters instead of a layer-average budget")

    def average(value) -> float:
        selector = selector_class(**{**params, param: value})
        return visual_counts(list(selector.stages(info)), info.num_layers, original, selector).layer_average

    if param in AVERAGE_PARAMETERS:
        value = int(target) if float(target).is_integer() else target
        try:
            average(value)
        except (ValueError, TypeError) as exc:
            raise BudgetError(f"{name} with {param}={value}: {exc}") from None
        return {**params, param: value}

    def safe(value: int) -> float | None:
        try:
            return average(value)
        except (ValueError, TypeError, FVLMError):
            return None

    lo, hi = 1, original  # the smallest count whose layer average reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        avg = safe(mid)
        if avg is not None and avg >= target:
            hi = mid
        else:
            lo = mid + 1
    best = None
    for value in sorted({max(1, lo - 1), lo}):
        avg = safe(value)
        if avg is not None and (best is None or abs(avg - target) < best[0]):
            best = (abs(avg - target), value)
    if best is None:
        raise BudgetError(f"{name}: no value of {param!r} gives a valid schedule")
    ends = [safe(1), safe(original)]
    step = abs(ends[1] - ends[0]) / (original - 1) if None not in ends and original > 1 else 1.0
    if best[0] > max(1.0, step):  # more than a rounding gap: the target is out of this selector's reach
        raise BudgetError(f"{name} cannot reach a layer average of {target:g} through {param!r}: "
                          f"the nearest it gets is {average(best[1]):.1f} ({param}={best[1]})")
    return {**params, param: best[1]}
