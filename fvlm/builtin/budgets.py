"""Selector settings for a visual-token budget on the built-in model (benchmark and ``fvlm visualize``).

A *budget* ``b`` is the number of visual tokens (of 576) that every selector keeps from its first
pruning point on. Selectors that prune before the language model (``random``, ``uniform``,
``divprune``, ``visionzip``, ``cdpruner``, ``vscan_encoder``) feed it ``b`` tokens; in-LLM selectors
(``fastv``, ``sparsevlm``, ``dart``, ``pio_fvlm``) run the first layers on all 576 and keep ``b`` after
their pruning layer, so their layer-average token count is higher (the benchmark reports it).
``pio_fvlm_3stage`` is the multi-stage schedule: ``b`` after layer 1, then the authors' 218 : 128 : 54
shape after the next two stage layers. Two-stage methods keep ``b`` from the encoder and a third of it
after layer 2 (the authors' 96 : 32): ``vscan`` and ``pio_fvlm_ve`` (PIO-FVLM "w/ VE": VScan's encoder
stage composed with PIO-FVLM). ``pool`` averages ``s x s`` blocks with ``s = round(sqrt(576 / b))``, so
its real count differs from ``b`` (144 for 192 and 128, 64, 36): the benchmark reports it.

The built-in model has no CLIP text tower, so ``cdpruner`` takes its relevance from the LLM input
embeddings of the prompt text after the image (``relevance_source="llm_embed"``, the Qwen default),
not from the authors' CLIP text rule; its vision tower has 3 layers, so VScan's local map reads layer
0 (the authors' layer 5 of 24) and its global map layer 1, the one feeding the projector.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from fvlm import registry
from fvlm.selectors.diversity import VisionZip

#: Selector names that are combinators, not methods (left out of the benchmark by default).
SKIP = frozenset({"compose"})

#: What each method ranks tokens by (titles of ``fvlm visualize``).
FAMILY = {
    "pio_fvlm": "gradient", "pio_fvlm_3stage": "gradient", "fastv": "text attention",
    "sparsevlm": "text attention", "dart": "key-norm pivots", "visionzip": "CLS attention",
    "divprune": "diversity", "random": "random", "uniform": "spatial grid", "keep_all": "no pruning",
    "cdpruner": "conditional DPP", "vscan": "CLS scan + merge", "vscan_encoder": "CLS scan + merge",
    "pio_fvlm_ve": "CLS scan + gradient", "pool": "average pooling",
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


def _stride(b: int, _: int) -> dict:
    return {"stride": max(1, round((576 / b) ** 0.5))}


def _two_stage(b: int) -> tuple[int, int]:
    return b, max(1, round(b / 3))


def _pio_ve(b: int, _: int) -> dict:
    encoder, keep = _two_stage(b)
    return {"selectors": [{"name": "vscan_encoder", "args": {"keep": encoder, "local_layer": 0}},
                          {"name": "pio_fvlm", "args": {"layers": [2], "keep": [keep]}}]}


SETTINGS: dict[str, Setting] = {s.label: s for s in [
    Setting("keep_all", "keep_all", lambda b, n: {}, budgeted=False),
    Setting("random", "random", lambda b, n: {"keep": b, "seed": 0}),
    Setting("uniform", "uniform", lambda b, n: {"keep": b}),
    Setting("pool", "pool", _stride),
    Setting("divprune", "divprune", lambda b, n: {"keep": b}),
    Setting("visionzip", "visionzip", lambda b, n: VisionZip.split(b)),
    Setting("cdpruner", "cdpruner", lambda b, n: {"keep": b, "relevance_source": "llm_embed"}),
    Setting("vscan_encoder", "vscan_encoder", lambda b, n: {"keep": b, "local_layer": 0}),
    Setting("vscan", "vscan", lambda b, n: dict(zip(("encoder_keep", "keep"), _two_stage(b)), layer=2, local_layer=0)),
    Setting("fastv", "fastv", lambda b, n: {"layer": 2, "keep": b}),
    Setting("sparsevlm", "sparsevlm", lambda b, n: {"schedule": [(2, b)], "recycle": False}),
    Setting("dart", "dart", lambda b, n: {"layer": 2, "keep": b}),
    Setting("pio_fvlm", "pio_fvlm", lambda b, n: {"layers": [1], "keep": [b]}),
    Setting("pio_fvlm_3stage", "pio_fvlm", _pio_three),
    Setting("pio_fvlm_ve", "compose", _pio_ve),
]}


def setting(label: str) -> Setting:
    """The [`Setting`][fvlm.builtin.budgets.Setting] for ``label``; a registered selector without one gets ``keep=b`` if it takes ``keep``."""
    if label in SETTINGS:
        return SETTINGS[label]
    params = registry.selector_info(label).parameters
    if "keep" not in params:
        raise ValueError(f"no budget mapping for selector {label!r} (it has no `keep` parameter)")
    return Setting(label, label, lambda b, n: {"keep": b})


def default_labels() -> list[str]:
    """Every registered selector except combinators, plus the extra rows of [`SETTINGS`][fvlm.builtin.budgets.SETTINGS], in table order."""
    installed = registry.list_selectors()
    ordered = [label for label, s in SETTINGS.items() if s.selector in installed]
    return ordered + [n for n in installed if n not in SETTINGS and n not in SKIP]


def describe(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "-"


__all__ = ["SETTINGS", "FAMILY", "Setting", "setting", "default_labels", "describe"]
