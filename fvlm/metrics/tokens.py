"""Visual-token accounting from a stage schedule: input count, count per layer, layer average.

The same rules as :class:`fvlm.PruningSession`: a ``"vision"`` / ``"input"`` stage sets the count
that enters the LLM; a stage at ``l`` (after ``l`` decoder layers) sets the count of layers ``l``
and later; a float ``keep`` is a fraction of the *original* count (rounded, at least 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fvlm.types import Stage


def stage_count(keep: int | float, original: int) -> int:
    """Visual tokens a stage keeps: an int count, or a float fraction of ``original``."""
    if isinstance(keep, float):
        return max(1, round(original * keep)) if original else 0
    return int(keep)


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


def visual_counts(stages: Sequence[Stage], num_layers: int, original: int) -> VisualCounts:
    """Expand a stage schedule into per-layer visual-token counts for ``original`` visual tokens."""
    count = llm_input = original
    changes: dict[int, int] = {}
    for stage in sorted(stages, key=lambda s: s.order):
        keep = stage_count(stage.keep, original)
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
