"""Measured latency and memory: prefill, decode per token, end-to-end, time to first token, peak
memory, throughput.

Timing. Every forward call of the top-level model is one step of ``generate`` (the first is the
prefill: vision tower + LLM prefill + selection + LM head; the others decode one token each).
[`StepClock`][fvlm.profiling.timing.StepClock] stamps the start and end of each call from forward hooks:

* CUDA: ``torch.cuda.Event(enable_timing=True)`` recorded on the current stream (no synchronisation
  inside the loop, so the measurement does not change what it measures); one synchronisation at the
  end, then ``elapsed_time`` between events.
* CPU: ``time.perf_counter()`` (kernels run synchronously), or with ``clock="cpu"`` the CPU time of
  the calling thread (``time.thread_time()``). With one intra-op thread every kernel runs in that
  thread, so thread CPU time is the compute the model did, insensitive to other processes sharing
  the cores (on a shared machine wall time mostly measures the neighbours); with more threads it
  misses the other threads' work, so it is only meaningful with ``torch.set_num_threads(1)``.

Peak memory. [`PeakMemory`][fvlm.profiling.timing.PeakMemory] reports the peak during a block:

* CUDA: ``torch.cuda.reset_peak_memory_stats`` before, ``torch.cuda.max_memory_allocated`` after
  (tensor memory through the caching allocator; ``peak_increase`` subtracts what was allocated at
  the start).
* CPU: the process's resident-set high-water mark. On Linux writing ``5`` to
  ``/proc/self/clear_refs`` resets it, and ``VmHWM`` in ``/proc/self/status`` reads it, so the peak
  is that of the block (``scope="block"``; freed heap memory is first returned to the OS with glibc's
  ``malloc_trim`` so that pages re-used inside the block count); elsewhere ``resource.getrusage`` gives the peak of the
  whole process lifetime (``scope="process"``), which only bounds the block's. RSS counts all of
  the process (weights, libraries), hence ``peak_increase`` = peak - RSS at the start.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager

import torch
from torch import nn


# -- clocks ------------------------------------------------------------------------------------
CLOCKS = ("wall", "cpu")


class _Stamp:
    """A point in time on ``device``: a recorded CUDA event, a perf_counter or a thread CPU time value."""

    __slots__ = ("event", "value")

    def __init__(self, device: torch.device, clock: str = "wall"):
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record(torch.cuda.current_stream(device))
            self.value = None
        else:
            self.event = None
            self.value = time.thread_time() if clock == "cpu" else time.perf_counter()

    def seconds_until(self, other: "_Stamp") -> float:
        if self.event is not None:
            return self.event.elapsed_time(other.event) / 1e3
        return other.value - self.value


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Interval:
    """One timed region on ``device``, stamped as [`StepClock`][fvlm.profiling.timing.StepClock] stamps a step (CUDA events on the
    current stream, else ``perf_counter``): ``watch = Interval(device)`` ... ``seconds = watch.stop()``."""

    def __init__(self, device: torch.device):
        self.start = _Stamp(device)
        self.device = device

    def stop(self) -> float:
        end = _Stamp(self.device)
        if end.event is not None:
            end.event.synchronize()
        return self.start.seconds_until(end)


class StepClock:
    """Stamps the start and end of every forward call of ``module`` while active.

    ``with StepClock(model) as clock: model.generate(...)`` then ``clock.steps()`` -> list of
    ``(start_s, end_s)`` relative to the moment the block was entered. ``clock``: ``"wall"`` or
    ``"cpu"`` (thread CPU time, CPU only; see the module docstring).
    """

    def __init__(self, module: nn.Module, device: torch.device | None = None, clock: str = "wall"):
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
        self.module = module
        self.device = device or _device_of(module)
        self.clock = clock
        self._marks: list[tuple[_Stamp, _Stamp | None]] = []
        self._handles: list = []
        self._origin: _Stamp | None = None
        self._end: _Stamp | None = None

    def __enter__(self) -> "StepClock":
        self._marks.clear()
        self._handles = [
            self.module.register_forward_pre_hook(self._pre),
            self.module.register_forward_hook(self._post),
        ]
        synchronize(self.device)
        self._origin = _Stamp(self.device, self.clock)
        return self

    def __exit__(self, *exc) -> None:
        self._end = _Stamp(self.device, self.clock)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        synchronize(self.device)

    def _pre(self, module, args):
        self._marks.append((_Stamp(self.device, self.clock), None))

    def _post(self, module, args, output):
        start, _ = self._marks[-1]
        self._marks[-1] = (start, _Stamp(self.device, self.clock))

    @property
    def total(self) -> float:
        """Seconds from entering to leaving the block."""
        return self._origin.seconds_until(self._end)

    def steps(self) -> list[tuple[float, float]]:
        return [(self._origin.seconds_until(a), self._origin.seconds_until(b)) for a, b in self._marks if b is not None]


# -- memory ------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc), so that re-used pages count again in the RSS peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryReading:
    """Peak memory of a block in bytes; ``kind`` is ``"cuda_allocated"`` or ``"rss"``."""

    peak: int = 0
    start: int = 0
    kind: str = ""
    scope: str = "block"  # "block" or "process" (CPU without a resettable high-water mark)

    @property
    def peak_increase(self) -> int:
        return max(0, self.peak - self.start)


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` then ``mem.reading`` (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.reading = MemoryReading()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reading = MemoryReading(start=torch.cuda.memory_allocated(self.device), kind="cuda_allocated")
        else:
            _malloc_trim()
            scope = "block" if _reset_rss_peak() and _proc_status_kib("VmHWM") is not None else "process"
            rss = _proc_status_kib("VmRSS")
            self.reading = MemoryReading(start=(rss or 0) * 1024, kind="rss", scope=scope)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.reading.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.reading.scope == "block":
            self.reading.peak = (_proc_status_kib("VmHWM") or 0) * 1024
        else:
            import resource
            import sys

            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.reading.peak = maxrss if sys.platform == "darwin" else maxrss * 1024


# -- measurements ------------------------------------------------------------------------------
@dataclass
class GenerationTiming:
    """One or more ``generate`` calls at batch size ``batch``; seconds are medians over repeats.

    ``prefill``: the first forward call (vision + LLM prefill + selection + LM head). ``ttft``: from
    the start of ``generate`` to the end of that call (includes input preparation). ``decode_per_token``:
    mean duration of the decode forward calls. ``end_to_end``: the whole ``generate``.
    ``throughput``: samples per second (``batch / end_to_end``); ``tokens_per_second`` counts
    generated tokens of the whole batch. ``runs`` keeps every repeat.
    """

    batch: int
    new_tokens: int
    prefill: float
    ttft: float
    decode_per_token: float
    end_to_end: float
    throughput: float
    tokens_per_second: float
    peak_memory: int
    peak_memory_increase: int
    memory_kind: str
    memory_scope: str
    device: str
    clock: str = "wall"
    runs: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _no_context() -> ContextManager:
    return contextlib.nullcontext()


def measure_generate(
    model: nn.Module,
    inputs: dict,
    *,
    max_new_tokens: int = 16,
    context: Callable[[], ContextManager] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    clock: str = "wall",
    **generate_kwargs: Any,
) -> GenerationTiming:
    """Time ``model.generate(**inputs)`` (greedy, exactly ``max_new_tokens`` new tokens).

    ``context`` makes the context manager each run happens in, e.g.
    ``lambda: fvlm.prune(model, "pio_fvlm", average=64)``. Runs under ``torch.no_grad()`` (not
    ``inference_mode``, which gradient-based selectors cannot use). ``clock``: see [`StepClock`][fvlm.profiling.timing.StepClock].
    """
    context = context or _no_context
    device = _device_of(model)
    batch = int(inputs["input_ids"].shape[0])
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    runs = []
    for i in range(warmup + repeats):
        with torch.no_grad(), context(), PeakMemory(device) as mem, StepClock(model, device, clock) as timer:
            model.generate(**inputs, **kwargs)
        if i < warmup:
            continue
        steps = timer.steps()
        if not steps:
            raise RuntimeError("generate made no forward call on the model")
        decode = [b - a for a, b in steps[1:]]
        runs.append(dict(prefill=steps[0][1] - steps[0][0], ttft=steps[0][1], end_to_end=timer.total,
                         decode_per_token=sum(decode) / len(decode) if decode else 0.0,
                         steps=len(steps), peak=mem.reading.peak, peak_increase=mem.reading.peak_increase))
    med = {k: statistics.median(r[k] for r in runs) for k in ("prefill", "ttft", "end_to_end", "decode_per_token")}
    return GenerationTiming(
        batch=batch, new_tokens=max_new_tokens, prefill=med["prefill"], ttft=med["ttft"],
        decode_per_token=med["decode_per_token"], end_to_end=med["end_to_end"],
        throughput=batch / med["end_to_end"], tokens_per_second=batch * max_new_tokens / med["end_to_end"],
        peak_memory=max(r["peak"] for r in runs), peak_memory_increase=max(r["peak_increase"] for r in runs),
        memory_kind=mem.reading.kind, memory_scope=mem.reading.scope, device=str(device), clock=clock, runs=runs,
    )


@dataclass
class PrefillTiming:
    """Prefill-only forward calls (``use_cache=True``, logits of the last position only)."""

    seconds: list[float]
    peak_memory_increase: int
    memory_kind: str

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def minimum(self) -> float:
        return min(self.seconds)


def time_prefill(model: nn.Module, inputs: dict, *, context: Callable[[], ContextManager] | None = None,
                 repeats: int = 3, warmup: int = 1, clock: str = "wall") -> PrefillTiming:
    """Time the prefill forward ``model(**inputs, use_cache=True, logits_to_keep=1)`` ``repeats`` times
    (``clock``: see [`StepClock`][fvlm.profiling.timing.StepClock])."""
    context = context or _no_context
    device = _device_of(model)
    seconds, peak, kind = [], 0, ""
    for i in range(warmup + repeats):
        with torch.no_grad(), context(), PeakMemory(device) as mem, StepClock(model, device, clock) as timer:
            model(**inputs, use_cache=True, logits_to_keep=1)
        if i >= warmup:
            (a, b), = timer.steps()
            seconds.append(b - a)
            peak, kind = max(peak, mem.reading.peak_increase), mem.reading.kind
    return PrefillTiming(seconds, peak, kind)
