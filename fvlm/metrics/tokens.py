"""Visual-token accounting from a stage schedule: input count, count per layer, layer average.

The same rules as :class:`fvlm.PruningSession`: a ``"vision"`` / ``"input"`` stage sets the count
that enters the LLM; a stage at ``l`` (after ``l`` decoder layers) sets the count of layers ``l``
and later; a stage keeps :meth:`Stage.count <fvlm.selectors.base.Stage.count>` tokens, or what the
selector's :meth:`~fvlm.selectors.base.TokenSelector.keep_count` says when one is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fvlm.types import Stage


def stage_count(keep: int | float, original: int) -> int:
    """Visual tokens a stage keeps: an int count, or a float fraction of ``original`` (:meth:`Stage.count`)."""
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
            keep = stage_count(stage.keep, original)
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
