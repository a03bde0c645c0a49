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

Under the *layer-average* convention (`Setting.average_kwargs`, the papers' "64 tokens") a
budget ``N`` is the visual-token count averaged over all decoder layers: pre-LLM selectors keep
``N``; in-LLM selectors prune where the authors do on the 32-layer LLaVA-1.5, scaled to the model's
depth (`scaled_layers`), keeping as many tokens as make the average ``N`` (multi-stage
schedules in the authors' proportions, [`counts_for_average`][fvlm.budget.counts_for_average]; the
two-stage methods at the same layer 2 and 3 : 1 ratio as above, the encoder count raised to meet it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from fvlm import registry
from fvlm.budget import counts_for_average
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


#: Depth of the model the authors' pruning layers refer to (LLaVA-1.5-7B's Vicuna-7B).
REFERENCE_DEPTH = 32


def scaled_layers(layers, num_layers: int, reference: int = REFERENCE_DEPTH) -> list[int]:
    """The authors' pruning layers (on ``reference`` layers) at the same relative depth of a
    ``num_layers``-layer model: rounded, at least 1, strictly increasing, below ``num_layers``."""
    out: list[int] = []
    for layer in layers:
        out.append(max(round(layer * num_layers / reference), 1, out[-1] + 1 if out else 1))
    if out[-1] >= num_layers:
        raise ValueError(f"{len(out)} pruning layers {list(layers)} do not fit a {num_layers}-layer model")
    return out


def single_stage_keep(average: float, layer: int, num_layers: int, n_visual: int) -> int:
    """Tokens kept after ``layer`` so that the layer average is ``average`` (nearest integer; the
    one-stage case of [`counts_for_average`][fvlm.budget.counts_for_average])."""
    if average * num_layers - layer * n_visual <= 0.5 * (num_layers - layer):  # rounds to no token
        raise ValueError(f"a layer average of {average} is below what the first {layer} layer(s) of {num_layers} "
                         f"already use ({layer * n_visual / num_layers:.0f})")
    return counts_for_average([layer], average, num_layers, n_visual)[0]


def _single(name: str, authors_layer: int, **extra):
    """Layer-average kwargs of a one-stage in-LLM method whose layer argument is ``name``."""
    def kwargs(average: float, num_layers: int, n_visual: int) -> dict:
        layer = scaled_layers([authors_layer], num_layers)[0]
        return {name: layer, **extra, "keep": single_stage_keep(average, layer, num_layers, n_visual)}
    return kwargs


@dataclass(frozen=True)
class Setting:
    """One benchmark row: a registered selector plus how its arguments follow the budget."""

    label: str
    selector: str
    kwargs: Callable[[int, int], dict] = field(repr=False)  # (budget, num_layers) -> kwargs
    budgeted: bool = True  # False: one run, independent of the budget (keep_all)
    #: (layer average, num_layers, n_visual) -> kwargs; None: same as ``kwargs`` (pre-LLM selectors)
    average: Callable[[float, int, int], dict] | None = field(default=None, repr=False)

    def make_kwargs(self, budget: int, num_layers: int) -> dict:
        return self.kwargs(budget, num_layers)

    def average_kwargs(self, average: float, num_layers: int, n_visual: int) -> dict:
        """Arguments whose layer-average visual-token count is ``average`` (see the module docstring)."""
        if self.average is None:
            return self.kwargs(int(average), num_layers)
        return self.average(average, num_layers, n_visual)


def _pio_three(b: int, num_layers: int) -> dict:
    layers = [1, max(2, num_layers // 2), num_layers - 1]
    if len(set(layers)) < 3:
        raise ValueError(f"pio_fvlm_3stage needs at least 4 decoder layers, the model has {num_layers}")
    keep = [b, max(1, round(b * 128 / 218)), max(1, round(b * 54 / 218))]
    return {"layers": layers, "keep": keep}


def _sparsevlm_average(average: float, num_layers: int, n_visual: int) -> dict:
    from fvlm.selectors import sparsevlm

    layers = scaled_layers(sparsevlm.DEFAULT_LAYERS, num_layers)
    shapes = sparsevlm.COUNTS["v1.5"]
    nearest = min(shapes, key=lambda b: abs(b * n_visual / 576 - average))  # the authors' shape
    counts = counts_for_average(layers, average, num_layers, n_visual, shape=shapes[nearest])
    return {"schedule": [(layer, count) for layer, count in zip(layers, counts)], "recycle": False}


def _pio_three_average(average: float, num_layers: int, n_visual: int) -> dict:
    from fvlm.selectors.pio_fvlm import AUTHORS_SCHEDULES

    return {"layers": scaled_layers(AUTHORS_SCHEDULES["llava15_avg128"]["layers"], num_layers), "average": float(average),
            "n_visual": n_visual}


def _stride(b: int, _: int) -> dict:
    return {"stride": max(1, round((576 / b) ** 0.5))}


def _two_stage(b: int) -> tuple[int, int]:
    return b, max(1, round(b / 3))


def _vscan(encoder: int, keep: int) -> dict:
    return {"encoder_keep": encoder, "keep": keep, "layer": 2, "local_layer": 0}


def _pio_ve(encoder: int, keep: int) -> dict:
    return {"selectors": [{"name": "vscan_encoder", "args": {"keep": encoder, "local_layer": 0}},
                          {"name": "pio_fvlm", "args": {"layers": [2], "keep": [keep]}}]}


def _two_stage_average(make: Callable[[int, int], dict]):
    """Layer-average kwargs of an encoder stage plus a third of it after layer 2: the encoder count
    that makes the average (``2 e + (L - 2) e / 3 = N L``)."""
    def kwargs(average: float, num_layers: int, n_visual: int) -> dict:
        if num_layers <= 2:
            raise ValueError(f"a two-stage schedule pruning after layer 2 needs more than {num_layers} layers")
        encoder = round(average * num_layers / (2 + (num_layers - 2) / 3))
        if encoder > n_visual:
            raise ValueError(f"a layer average of {average} needs {encoder} encoder tokens, more than the {n_visual}")
        return make(*_two_stage(encoder))
    return kwargs


SETTINGS: dict[str, Setting] = {s.label: s for s in [
    Setting("keep_all", "keep_all", lambda b, n: {}, budgeted=False),
    Setting("random", "random", lambda b, n: {"keep": b, "seed": 0}),
    Setting("uniform", "uniform", lambda b, n: {"keep": b}),
    Setting("pool", "pool", _stride),
    Setting("divprune", "divprune", lambda b, n: {"keep": b}),
    Setting("visionzip", "visionzip", lambda b, n: VisionZip.split(b)),
    Setting("cdpruner", "cdpruner", lambda b, n: {"keep": b, "relevance_source": "llm_embed"}),
    Setting("vscan_encoder", "vscan_encoder", lambda b, n: {"keep": b, "local_layer": 0}),
    Setting("vscan", "vscan", lambda b, n: _vscan(*_two_stage(b)), average=_two_stage_average(_vscan)),
    Setting("fastv", "fastv", lambda b, n: {"layer": 2, "keep": b}, average=_single("layer", 2)),
    Setting("sparsevlm", "sparsevlm", lambda b, n: {"schedule": [(2, b)], "recycle": False},
            average=_sparsevlm_average),
    Setting("dart", "dart", lambda b, n: {"layer": 2, "keep": b}, average=_single("layer", 2)),
    Setting("pio_fvlm", "pio_fvlm", lambda b, n: {"layers": [1], "keep": [b]},
            average=lambda a, n, v: {"layers": [1], "keep": [single_stage_keep(a, 1, n, v)]}),
    Setting("pio_fvlm_3stage", "pio_fvlm", _pio_three, average=_pio_three_average),
    Setting("pio_fvlm_ve", "compose", lambda b, n: _pio_ve(*_two_stage(b)), average=_two_stage_average(_pio_ve)),
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


__all__ = ["SETTINGS", "FAMILY", "Setting", "setting", "default_labels", "describe", "scaled_layers",
           "single_stage_keep"]
