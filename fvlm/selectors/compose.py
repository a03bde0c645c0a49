"""Composition: several selectors in one schedule (e.g. a vision-side stage, then an in-LLM method)."""
from __future__ import annotations

from fvlm.errors import FVLMError
from fvlm.selectors.arguments import fail
from fvlm.selectors.base import TokenSelector


class Compose(TokenSelector):
    """Runs its parts' stages as one schedule; each stage is answered by the part that declared it.

    ``selectors`` are instances, registered names, or ``{"name": ..., "args": {...}}`` mappings.
    PIO-FVLM's encoder-involved mode is ``Compose([VisionZip(...), PIOFVLM(...)])``. Needs are the
    union of the parts' needs; every part is checked against its own, and each stage's budget is
    its part's :meth:`~fvlm.selectors.base.TokenSelector.keep_count`. Position policy: the parts'
    common one, ``"original"`` when they differ (pass ``positions=`` to the session to choose).
    """

    example_kwargs = {"selectors": [{"name": "divprune", "args": {"keep": 10}}, {"name": "random", "args": {"keep": 4, "layer": 2}}]}

    def __init__(self, selectors: list):
        from fvlm.registry import create_selector

        rule = "a non-empty list of selectors, names or {name, args} mappings"
        if not isinstance(selectors, (list, tuple)) or not selectors:
            raise fail(self, "selectors", rule, selectors)
        parts = []
        for item in selectors:
            if isinstance(item, str):
                item = create_selector(item)
            elif isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("args", {}), dict):
                item = create_selector(item["name"], **item.get("args", {}))
            if not isinstance(item, TokenSelector):
                raise fail(self, "selectors", rule, item)
            parts.append(item)
        self.selectors = parts
        self.needs = frozenset().union(*(p.needs for p in parts))
        policies = {p.positions for p in parts}
        self.positions = policies.pop() if len(policies) == 1 else "original"
        self._owner: dict = {}

    def stages(self, info):
        owner, stages = {}, []
        for part in self.selectors:
            for stage in part.stages(info):
                if stage.where in owner:
                    raise FVLMError(
                        f"Compose: {type(owner[stage.where]).__name__} and {type(part).__name__} "
                        f"both prune at {stage.where!r}"
                    )
                owner[stage.where] = part
                stages.append(stage)
        self._owner = owner
        return stages

    def keep_count(self, stage, current, original, images):
        return self._owner[stage.where].keep_count(stage, current, original, images)

    def select(self, ctx):
        part = self._owner[ctx.stage.where]
        return part.select(ctx.for_selector(part))
