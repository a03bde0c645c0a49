"""Profiling: real-scale architectures without weights (:mod:`~fvlm.profiling.arch`), analytic
profiles of schedules and selectors (:mod:`~fvlm.profiling.analytic`), reports and plots
(:mod:`~fvlm.profiling.report`), measured timing and memory (:mod:`~fvlm.profiling.timing`), measured
FLOPs (:mod:`~fvlm.profiling.flop_counter`) and the meta-device cross-check (:mod:`~fvlm.profiling.meta`).
Pure metric functions live in :mod:`fvlm.metrics`."""
from fvlm.profiling.analytic import (
    ProfileRow,
    keep_all_row,
    parse_schedule,
    profile_selector,
    profile_stages,
    selector_for_average,
)
from fvlm.profiling.arch import Architecture, build_meta_model, load_architecture, model_info, shipped_models
from fvlm.profiling.flop_counter import MeasuredFlops, measure_flops
from fvlm.profiling.timing import (
    GenerationTiming,
    PeakMemory,
    PrefillTiming,
    StepClock,
    measure_generate,
    time_prefill,
)

__all__ = [
    "Architecture",
    "GenerationTiming",
    "MeasuredFlops",
    "PeakMemory",
    "PrefillTiming",
    "ProfileRow",
    "StepClock",
    "build_meta_model",
    "keep_all_row",
    "load_architecture",
    "measure_flops",
    "measure_generate",
    "model_info",
    "parse_schedule",
    "profile_selector",
    "profile_stages",
    "selector_for_average",
    "shipped_models",
    "time_prefill",
]
