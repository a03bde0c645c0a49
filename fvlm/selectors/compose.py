"""Composition: several selectors in one schedule (e.g. a vision-side stage, then an in-LLM method)."""
from __future__ import annotations

from fvlm.errors import FVLMError
from fvlm.registry import create_selector
from fvlm.selectors.arguments import fail
from fvlm.selectors.base import TokenSelector


class Compose(TokenSelector):
    """Runs its parts' stages as one schedule; each stage is answered by the part that declared it.

    ``selectors`` are instances, registered names, or ``{"name": ..., "args": {...}}`` mappings.
    PIO-FVLM's encoder-involved mode ("w/ VE") is ``Compose([VScanEncoder(keep=96),
    PIOFVLM(layers=[16], keep=[32])])``. Needs, vision layers and auxiliary models are the union of
    the parts'; every part is checked against its own needs, and each stage's budget is its part's
    ([`keep_count`][fvlm.selectors.base.TokenSelector.keep_count], ``stage_budget``). Position policy: the
    parts' common one, ``"original"`` when they differ (pass ``positions=`` to the session to choose).
    """

    example_kwargs = {"selectors": [{"name": "divprune", "args": {"keep": 10}}, {"name": "random", "args": {"keep": 4, "layer": 2}}]}

    def __init__(self, selectors: list):
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
        self.needs = frozenset().union(*(p.needs for p in self.selectors))  # parts may settle theirs per family
        return stages

    def keep_count(self, stage, current, original, images):
        return self._owner[stage.where].keep_count(stage, current, original, images)

    def select(self, ctx):
        part = self._owner[ctx.stage.where]
        return part.select(ctx.for_selector(part))

    def stage_budget(self, ctx):
        part = self._owner[ctx.stage.where]
        return part.stage_budget(ctx.for_selector(part))

    def vision_layers(self, info):
        return frozenset().union(*(p.vision_layers(info) for p in self.selectors))

    def auxiliary_models(self):
        return [spec for part in self.selectors for spec in part.auxiliary_models()]
