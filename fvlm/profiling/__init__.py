"""Profiling: real-scale architectures without weights ([`arch`][fvlm.profiling.arch]), analytic
profiles of schedules and selectors ([`analytic`][fvlm.profiling.analytic]), reports and plots
([`report`][fvlm.profiling.report]), measured timing and memory ([`timing`][fvlm.profiling.timing]), measured
FLOPs ([`flop_counter`][fvlm.profiling.flop_counter]) and the meta-device cross-check ([`meta`][fvlm.profiling.meta]).
Pure metric functions live in [`fvlm.metrics`][fvlm.metrics]."""
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
