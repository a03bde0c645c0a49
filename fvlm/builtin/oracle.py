"""The ground-truth selector of the built-in tasks: keeps the patches of the objects a question is about.

Not a registered method: it reads each record's ``target`` objects (the generator's ground truth), so
the benchmark builds one per batch. It marks how much of an accuracy loss the *choice* of tokens can
recover at a pruning point: the target objects' patches first, then seeded random patches up to the
budget, so that it keeps exactly as many tokens as the methods it is compared with.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from fvlm.builtin import synthetic
from fvlm.errors import FVLMError
from fvlm.selectors.base import Stage, TokenSelector


def patch_order(record: dict, seed: int = 0) -> list[int]:
    """Every patch index once: the target objects' patches first (their patches in turn, one object
    after the other, each object's best-covered patch first), then the rest in a seeded random order."""
    objects, targets = record["objects"], record["target"]
    cover = synthetic.coverage(objects)
    queues = []
    for obj in targets:
        column = cover[:, objects.index(obj)]
        queues.append(sorted((int(p) for p in (column > 0).nonzero()[0]), key=lambda p: (-column[p], p)))
    order, seen = [], set()
    while any(queues):
        for queue in queues:
            while queue and queue[0] in seen:
                queue.pop(0)
            if queue:
                seen.add(queue[0])
                order.append(queue.pop(0))
    rest = [p for p in range(len(cover)) if p not in seen]
    random.Random(f"fvlm-oracle/{record.get('id')}/{seed}").shuffle(rest)
    return order + rest


class GroundTruthSelector(TokenSelector):
    """At every ``(where, keep)`` of ``stages``, keeps the ``keep`` surviving patches that come first
    in each sample's `patch_order` (``orders`` in batch order; one image per sample, all its
    patches at the first stage). Later stages choose among the survivors of the one before, so the
    oracle follows any schedule a method or its random control follows."""

    def __init__(self, orders: Sequence[Sequence[int]], stages: Sequence[tuple]):
        self.orders = [list(o) for o in orders]
        self.schedule = [Stage(where, keep) for where, keep in stages]
        self._survivors: list[list[int]] = []

    def stages(self, info):
        return list(self.schedule)

    def select(self, ctx):
        rows = ctx.visual_index.shape[0]
        if rows != len(self.orders):
            raise FVLMError(f"GroundTruthSelector has patch orders for {len(self.orders)} samples, the batch has "
                            f"{rows} (expanded batches such as beams are not supported)")
        if ctx.stage_index == 0:
            self._survivors = [sorted(order) for order in self.orders]
        picks = []
        for b, order in enumerate(self.orders):
            current = self._survivors[b]  # original patch index of every current visual token, in sequence order
            if int(ctx.num_visual[b]) != len(current):
                raise FVLMError(f"GroundTruthSelector needs all {len(order)} patches of one image per sample at its "
                                f"first stage, sample {b} has {int(ctx.num_visual[b])} visual tokens")
            rank = {p: i for i, p in enumerate(order)}
            at = {p: i for i, p in enumerate(current)}
            kept = sorted(sorted(current, key=rank.__getitem__)[: int(ctx.budget[b])])
            self._survivors[b] = kept
            picks.append([at[p] for p in kept])
        return torch.tensor(picks, dtype=torch.long, device=ctx.hidden.device)
