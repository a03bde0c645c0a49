"""Analytic efficiency profile of a stage schedule on an architecture (no weights, no forward).

One `ProfileRow` per configuration (keep-all, an explicit schedule, a registered selector at a
budget): visual tokens (original, LLM input, per layer, layer average), FLOPs in the paper and full
conventions, KV-cache bytes after prefill (+ decode tokens), and one decode step's FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from fvlm.budget import BUDGET_PARAMETERS, VisualCounts, stage_count, visual_counts, with_input_size  # noqa: F401
from fvlm.errors import UsageError
from fvlm.metrics.flops import (
    FlopsBreakdown,
    TextArch,
    full_flops,
    llm_decode_flops,
    paper_flops,
    selector_overhead_flops,
)
from fvlm.metrics.kv import dtype_bytes, kv_bytes
from fvlm.profiling.arch import Architecture, model_info
from fvlm.registry import create_selector, get_selector_class
from fvlm.types import ModelInfo, Stage

@dataclass
class ProfileRow:
    """The analytic profile of one configuration (per sample)."""

    label: str
    kind: str  # "keep_all" | "schedule" | "selector"
    stages: list[Stage]
    counts: VisualCounts
    text_tokens: int
    paper_flops: float
    full: FlopsBreakdown
    kv_bytes: int
    decode_flops: float  # the first decode step, full convention
    selector: str | None = None
    params: dict = field(default_factory=dict)
    target: float | None = None  # requested layer average, if any

    @property
    def layer_average(self) -> float:
        return self.counts.layer_average

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "kind": self.kind,
            "selector": self.selector,
            "params": self.params,
            "target_layer_average": self.target,
            "stages": [[s.where, s.keep] for s in self.stages],
            "original_visual": self.counts.original,
            "llm_input_visual": self.counts.llm_input,
            "visual_per_layer": list(self.counts.per_layer),
            "layer_average": self.layer_average,
            "text_tokens": self.text_tokens,
            "paper_flops": self.paper_flops,
            "full_flops": self.full.to_dict(),
            "kv_bytes": self.kv_bytes,
            "decode_step_flops": self.decode_flops,
        }


def parse_schedule(text: str) -> list[Stage]:
    """``"1:218,10:128,15:54"`` -> stages; ``where`` is a layer, ``input`` or ``vision``; ``keep`` an
    int count or a float fraction of the original count (``"input:0.25"``)."""
    stages = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        where, sep, keep = part.partition(":")
        if not sep:
            raise UsageError(f"bad schedule entry {part!r}: expected WHERE:KEEP, e.g. 1:218 or input:64")
        where = where.strip()
        try:
            where_v: Any = where if where in ("vision", "input") else int(where)
            keep_v: Any = float(keep) if "." in keep else int(keep)
            stages.append(Stage(where_v, keep_v))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"bad schedule entry {part!r}: {exc}") from None
    if not stages:
        raise UsageError(f"empty schedule {text!r}")
    return stages


def format_schedule(stages: Sequence[Stage], original: int | None = None) -> str:
    """``"1:218,10:128,15:54"``; with ``original``, fractional keeps are shown as the counts they give."""
    def keep(s: Stage) -> str:
        if original is not None and isinstance(s.keep, float):
            return str(stage_count(s.keep, original))
        return f"{s.keep:g}" if isinstance(s.keep, float) else str(s.keep)

    return ",".join(f"{s.where}:{keep(s)}" for s in sorted(stages, key=lambda s: s.order))


def _overhead(selector, counts: VisualCounts, stages: Sequence[Stage], text_tokens: int, tokens: Sequence[int],
              arch: Architecture) -> float:
    """Selector FLOPs over its stages: its own ``overhead_flops`` if it defines one, else the
    estimate from its needs ([`in_llm_overhead_flops`][fvlm.profiling.analytic.in_llm_overhead_flops])."""
    custom = getattr(selector, "overhead_flops", None) if selector is not None else None
    if custom is None:
        return in_llm_overhead_flops(selector, stages, counts.per_layer, tokens, arch.text)
    total = 0.0
    for stage in stages:
        n_visual = counts.per_layer[stage.where - 1] if isinstance(stage.where, int) else counts.original
        total += float(custom(model_info(arch), stage, text_tokens + n_visual, n_visual))
    return total


def in_llm_overhead_flops(selector, stages: Iterable, per_layer: Sequence[int], tokens: Sequence[int],
                          text: TextArch) -> float:
    """Estimated FLOPs of ``selector``'s in-LLM stages from what it needs
    ([`fvlm.metrics.flops.selector_overhead_flops`][fvlm.metrics.flops.selector_overhead_flops]), where ``per_layer[i]`` visual tokens and
    ``tokens[i]`` tokens in all enter decoder layer ``i`` (a schedule's counts or a session trace's).
    ``stages``: anything with ``where`` (layer stages count, the others do not)."""
    needs = getattr(type(selector), "needs", frozenset())
    return sum(selector_overhead_flops(needs, tokens[s.where - 1], text, n_visual=per_layer[s.where - 1],
                                       kept=per_layer[s.where], **proxy_options(selector))
               for s in stages if isinstance(s.where, int))


def proxy_options(selector) -> dict:
    """Options of a gradient proxy read from a selector's public attributes (PIO-FVLM's ``k_last``,
    ``proxy`` = ``"rows"`` | ``"block"``, ``head_rows``, ``nms``); absent ones keep the defaults."""
    out = {}
    for attr, key in (("k_last", "loss_rows"), ("proxy", "mode"), ("head_rows", "head_rows"), ("nms", "nms")):
        value = getattr(selector, attr, None)
        if value is not None:
            out[key] = value
    return out


def profile_stages(
    arch: Architecture,
    stages: Sequence[Stage],
    *,
    label: str,
    kind: str = "schedule",
    selector=None,
    selector_name: str | None = None,
    params: dict | None = None,
    target: float | None = None,
    visual_tokens: int | None = None,
    text_tokens: int | None = None,
    decode_tokens: int = 0,
    kv_dtype: str | None = None,
) -> ProfileRow:
    """Profile one stage schedule (optionally produced by ``selector``) on ``arch``."""
    original = arch.visual_tokens if visual_tokens is None else int(visual_tokens)
    text_n = arch.text_tokens if text_tokens is None else int(text_tokens)
    counts = visual_counts(list(stages), arch.text.num_layers, original, selector, max(1, len(arch.images)))
    tokens = [text_n + v for v in counts.per_layer]
    overhead = _overhead(selector, counts, stages, text_n, tokens, arch)
    full = full_flops(arch.text, tokens, vision=arch.vision, images=arch.images, lm_head_rows=1, overhead=overhead)
    width = dtype_bytes(kv_dtype or arch.kv_dtype)
    kv = kv_bytes([t + decode_tokens for t in tokens], arch.text.num_kv_heads, arch.text.head_dim, width)
    decode = llm_decode_flops([t + 1 for t in tokens], arch.text)
    return ProfileRow(
        label=label, kind=kind, stages=list(stages), counts=counts, text_tokens=text_n,
        paper_flops=paper_flops(counts.per_layer, arch.text.hidden_size, arch.text.intermediate_size),
        full=full, kv_bytes=kv, decode_flops=decode, selector=selector_name, params=dict(params or {}),
        target=target,
    )


def keep_all_row(arch: Architecture, **kwargs) -> ProfileRow:
    """The unpruned reference (every visual token at every layer)."""
    return profile_stages(arch, [Stage("input", 1.0)], label="keep_all", kind="keep_all", **kwargs)


def budget_parameter(name: str) -> str | None:
    """What a layer-average budget sets on selector ``name``
    ([`budget_parameter`][fvlm.selectors.base.TokenSelector.budget_parameter]), or None."""
    return get_selector_class(name).budget_parameter()


def selector_kwargs_for_average(name: str, target: float, info: ModelInfo, original: int,
                                params: dict | None = None) -> dict:
    """Keyword arguments for registered selector ``name`` whose schedule has a layer average of
    ``target`` visual tokens (of ``original``) on a model described by ``info``: the class's
    [`for_average`][fvlm.selectors.base.TokenSelector.for_average]."""
    return get_selector_class(name).for_average(target, info, original, **dict(params or {}))


def selector_for_average(name: str, target: float, arch: Architecture, params: dict | None = None,
                         visual_tokens: int | None = None):
    """[`selector_kwargs_for_average`][fvlm.profiling.analytic.selector_kwargs_for_average] on an [`Architecture`][fvlm.profiling.arch.Architecture]; returns
    ``(selector, kwargs, stages)``."""
    original = arch.visual_tokens if visual_tokens is None else int(visual_tokens)
    kwargs = selector_kwargs_for_average(name, target, model_info(arch), original, params)
    selector = create_selector(name, **kwargs)
    return selector, kwargs, list(selector.stages(model_info(arch)))


def profile_selector(arch: Architecture, name: str, *, budget: float | None = None, params: dict | None = None,
                     **kwargs) -> ProfileRow:
    """Profile a registered selector, at a layer-average ``budget`` or with explicit ``params``."""
    if budget is not None:
        selector, used, stages = selector_for_average(name, budget, arch, params, kwargs.get("visual_tokens"))
        label = f"{name} @{budget:g}"
    else:
        original = arch.visual_tokens if kwargs.get("visual_tokens") is None else kwargs["visual_tokens"]
        used = with_input_size(get_selector_class(name), dict(params or {}), original)
        selector = create_selector(name, **used)
        stages = list(selector.stages(model_info(arch)))
        given = dict(params or {})
        label = name if not given else f"{name} ({', '.join(f'{k}={v}' for k, v in given.items())})"
    return profile_stages(arch, stages, label=label, kind="selector", selector=selector, selector_name=name,
                          params=used, target=budget, **kwargs)

