"""Composition: several selectors in one schedule (e.g. a vision-side stage, then an in-LLM method)."""
from __future__ import annotations

from fvlm.errors import FVLMError
from fvlm.selectors.base import TokenSelector


class Compose(TokenSelector):
    """Runs its parts' stages as one schedule; each stage is answered by the part that declared it.

    ``selectors`` are instances, registered names, or ``{"name": ..., "args": {...}}`` mappings.
    PIO-FVLM's encoder-involved mode ("w/ VE") is ``Compose([VScanEncoder(keep=96),
    PIOFVLM(layers=[16], keep=[32])])``. Needs, vision layers and auxiliary models are the union of
    the parts'; every part is checked against its own needs.
    """

    example_kwargs = {"selectors": [{"name": "divprune", "args": {"keep": 10}}, {"name": "random", "args": {"keep": 4, "layer": 2}}]}

    def __init__(self, selectors: list):
        from fvlm.registry import create_selector

        parts = []
        for item in selectors:
            if isinstance(item, str):
                item = create_selector(item)
            elif isinstance(item, dict):
                item = create_selector(item["name"], **item.get("args", {}))
            if not isinstance(item, TokenSelector):
                raise TypeError(f"Compose parts must be selectors, names or {{name, args}} mappings, got {item!r}")
            parts.append(item)
        if not parts:
            raise FVLMError("Compose needs at least one selector")
        self.selectors = parts
        self._owner: dict = {}

    @property
    def needs(self) -> frozenset:  # parts may settle their needs in stages() (e.g. per model family)
        return frozenset().union(*(p.needs for p in self.selectors))

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
