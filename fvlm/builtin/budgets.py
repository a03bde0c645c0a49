"""Selector settings for a visual-token budget on the built-in model (benchmark and ``fvlm visualize``).

A *budget* ``b`` is the number of visual tokens (of 576) that every selector keeps from its first
pruning point on. Selectors that prune before the language model (``random``, ``uniform``,
``divprune``, ``visionzip``) feed it ``b`` tokens; in-LLM selectors (``fastv``, ``sparsevlm``,
``dart``, ``pio_fvlm``) run the first layers on all 576 and keep ``b`` after their pruning layer, so
their layer-average token count is higher (the benchmark reports it). ``pio_fvlm_3stage`` is the
multi-stage schedule: ``b`` after layer 1, then the authors' 218 : 128 : 54 shape after the next
two stage layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

#: Selector names that are combinators, not methods (left out of the benchmark by default).
SKIP = frozenset({"compose"})

#: What each method ranks tokens by (titles of ``fvlm visualize``).
FAMILY = {
    "pio_fvlm": "gradient", "pio_fvlm_3stage": "gradient", "fastv": "text attention",
    "sparsevlm": "text attention", "dart": "key-norm pivots", "visionzip": "CLS attention",
    "divprune": "diversity", "random": "random", "uniform": "spatial grid", "keep_all": "no pruning",
}


@dataclass(frozen=True)
class Setting:
    """One benchmark row: a registered selector plus how its arguments follow the budget."""

    label: str
    selector: str
    kwargs: Callable[[int, int], dict] = field(repr=False)  # (budget, num_layers) -> kwargs
    budgeted: bool = True  # False: one run, independent of the budget (keep_all)

    def make_kwargs(self, budget: int, num_layers: int) -> dict:
        return self.kwargs(budget, num_layers)


def _pio_three(b: int, num_layers: int) -> dict:
    layers = [1, max(2, num_layers // 2), num_layers - 1]
    if len(set(layers)) < 3:
        raise ValueError(f"pio_fvlm_3stage needs at least 4 decoder layers, the model has {num_layers}")
    keep = [b, max(1, round(b * 128 / 218)), max(1, round(b * 54 / 218))]
    return {"layers": layers, "keep": keep}


def _visionzip(b: int, _: int) -> dict:
    dominant = max(1, round(b * 5 / 6))  # the authors' 54 + 10 split, about 5 : 1
    return {"dominant": dominant, "contextual": b - dominant}


SETTINGS: dict[str, Setting] = {s.label: s for s in [
    Setting("keep_all", "keep_all", lambda b, n: {}, budgeted=False),
    Setting("random", "random", lambda b, n: {"keep": b, "seed": 0}),
    Setting("uniform", "uniform", lambda b, n: {"keep": b}),
    Setting("divprune", "divprune", lambda b, n: {"keep": b}),
    Setting("visionzip", "visionzip", _visionzip),
    Setting("fastv", "fastv", lambda b, n: {"k": 2, "keep": b}),
    Setting("sparsevlm", "sparsevlm", lambda b, n: {"schedule": [(2, b)], "recycle": False}),
    Setting("dart", "dart", lambda b, n: {"layer": 2, "keep": b}),
    Setting("pio_fvlm", "pio_fvlm", lambda b, n: {"layers": [1], "keep": [b]}),
    Setting("pio_fvlm_3stage", "pio_fvlm", _pio_three),
]}


def setting(label: str) -> Setting:
    """The :class:`Setting` for ``label``; a registered selector without one gets ``keep=b`` if it takes ``keep``."""
    if label in SETTINGS:
        return SETTINGS[label]
    from fvlm import registry

    params = registry.SELECTORS.info(label).parameters
    if "keep" not in params:
        raise ValueError(f"no budget mapping for selector {label!r} (it has no `keep` parameter)")
    return Setting(label, label, lambda b, n: {"keep": b})


def default_labels() -> list[str]:
    """Every registered selector except combinators, plus the extra rows of :data:`SETTINGS`, in table order."""
    import fvlm

    registered = [n for n in fvlm.list_selectors() if n not in SKIP]
    ordered = [label for label, s in SETTINGS.items() if s.selector in registered]
    return ordered + [n for n in registered if n not in SETTINGS]


def describe(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "-"


__all__ = ["SETTINGS", "FAMILY", "Setting", "setting", "default_labels", "describe"]
