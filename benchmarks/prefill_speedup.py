"""Prefill speedup of every selector vs keep-all, next to the FLOPs-ideal speedup, on one random model.

One run, one random mid-size LLaVA (``fvlm.testing.sized_llava``: Llama-shaped LLM, a tiny CLIP
tower giving 576 visual tokens), one prompt. For each layer-average budget (192 / 128 / 64 by
default) and each registered selector that takes a budget, the prefill forward
(``model(**inputs, use_cache=True, logits_to_keep=1)``, the first step of ``generate``) is timed and
compared with keep-all:

* ``measured``: median keep-all time / median selector time (selection overhead included);
* ``ideal``: full-convention FLOPs of the keep-all prefill / FLOPs of the pruned prefill *without*
  the selector's own work (vision tower, projector, every decoder layer at the lengths the real
  trace recorded, LM head; :func:`fvlm.metrics.flops.full_flops`) -- the limit a free selector
  would reach if time were proportional to FLOPs;
* ``ratio`` = measured / ideal; ``ideal+ovh`` also counts the selector's estimated FLOPs.

Repeats are interleaved (round-robin over all configurations) so drift in machine load hits all
of them alike. Also: FastV with attention rows recomputed under SDPA (fvlm's way) side by side
with FastV reading the eager attention map at the pruning layer (the official code's way), time
and peak memory; and ``generate`` figures (TTFT, decode per token, end-to-end, throughput, peak
memory) for keep-all and a few selectors.

    python benchmarks/prefill_speedup.py --hidden 1024 --layers 32 --threads 1 --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import fvlm  # noqa: E402
from fvlm.metrics.flops import full_flops  # noqa: E402
from fvlm.profiling.analytic import in_llm_overhead_flops, selector_kwargs_for_average  # noqa: E402
from fvlm.profiling.arch import text_arch, vision_arch  # noqa: E402
from fvlm.profiling.timing import PeakMemory, StepClock, measure_generate  # noqa: E402
from fvlm.selectors.base import ScoreSelector, Stage, TokenSelector  # noqa: E402
from fvlm.testing import sized_llava, sized_llava_inputs  # noqa: E402

SKIP = {"keep_all", "compose"}  # the reference itself; a combinator without a budget of its own


# -- local selectors (not registered) ------------------------------------------------------------
class RandomAtStages(TokenSelector):
    """Random picks on a given stage schedule: the cost of a schedule with a free selector."""

    def __init__(self, stages: list[Stage], seed: int = 0):
        self._stages = list(stages)
        self.seed = seed

    def stages(self, info):
        return self._stages

    def select(self, ctx):
        from fvlm.selectors.algorithms import topk_indices

        gen = torch.Generator().manual_seed(self.seed + ctx.stage_index)
        return topk_indices(torch.rand(ctx.visual_index.shape, generator=gen).to(ctx.hidden.device),
                            ctx.visual_valid, ctx.budget)


class FastVAttentionMap(ScoreSelector):
    """FastV scored from the attention map the eager kernel materialised in layer ``layer-1`` (``[B, H, L, L]``,
    captured by a forward hook on its ``self_attn``): the official code's ``output_attentions`` route."""

    def __init__(self, layer: int, keep: int | float):
        self.layer, self.keep = layer, keep
        self.captured: torch.Tensor | None = None

    def stages(self, info):
        return [Stage(self.layer, self.keep)]

    @contextlib.contextmanager
    def capture(self, model):
        attn = model.model.language_model.layers[self.layer - 1].self_attn

        def hook(module, args, output):
            if output[1] is None:
                raise RuntimeError("the pruning layer returned no attention map: run the model with eager attention")
            if output[1].shape[-2] > 1:  # prefill only
                self.captured = output[1]

        handle = attn.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
            self.captured = None

    def score(self, ctx):
        probs = self.captured  # [B, H, L, L], rows = queries
        last = ctx.last_index[:, None, None, None].expand(-1, probs.shape[1], 1, probs.shape[-1])
        row = probs.gather(2, last)[:, :, 0]  # [B, H, L]
        index = ctx.visual_index.clamp(min=0)[:, None, :].expand(-1, row.shape[1], -1)
        return row.gather(2, index).mean(dim=1) * ctx.visual_valid


# -- configurations ------------------------------------------------------------------------------
@dataclass
class Config:
    label: str
    group: str  # selector name (one curve per group)
    budget: float | None
    make: Callable[[], TokenSelector | None]
    attn: str = "sdpa"
    extra: Callable | None = None  # (selector, model) -> context manager around the run
    times: list[float] = field(default_factory=list)  # the chosen clock
    wall: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    select_s: list[float] = field(default_factory=list)
    trace: object = None
    selector: TokenSelector | None = None
    picks: list | None = None  # kept visual indices per sample at each stage (last run)
    error: str | None = None


def _selector_factory(name: str, kwargs: dict):
    return lambda: fvlm.create_selector(name, **kwargs)


def build_configs(args, info, console) -> tuple[list[Config], list[Config]]:
    main = [Config("keep_all", "keep_all", None, lambda: None)]
    names = args.selectors or [n for n in fvlm.list_selectors() if n not in SKIP]
    for budget in args.budgets:
        for name in names:
            try:
                kwargs = selector_kwargs_for_average(name, budget, info, args.visual_total)
            except Exception as exc:  # noqa: BLE001 -- report and go on with the others
                console.print(f"[yellow]skip {name} @{budget:g}: {exc}[/yellow]")
                continue
            main.append(Config(f"{name} @{budget:g}", name, budget, _selector_factory(name, kwargs)))
            if name == "pio_fvlm" and args.schedule_only:
                stages = list(fvlm.create_selector(name, **kwargs).stages(info))
                main.append(Config(f"pio schedule, random picks @{budget:g}", "pio schedule (random picks)", budget,
                                   lambda stages=stages: RandomAtStages(stages)))
    fastv = []
    if args.fastv_compare:
        budget = min(args.budgets)
        if "fastv" in fvlm.list_selectors():
            kwargs = selector_kwargs_for_average("fastv", budget, info, args.visual_total)
            k, keep = kwargs.get("layer", 2), kwargs["keep"]
            fastv = [
                Config(f"fastv layer={k} keep={keep}: SDPA model, rows recomputed", "fastv-sdpa", budget,
                       _selector_factory("fastv", kwargs)),
                Config(f"fastv layer={k} keep={keep}: eager model, rows recomputed", "fastv-eager-rows", budget,
                       _selector_factory("fastv", kwargs), attn="eager"),
                Config(f"fastv layer={k} keep={keep}: eager model, attention map of layer {k - 1}", "fastv-eager-map",
                       budget, lambda k=k, keep=keep: FastVAttentionMap(k, keep), attn="eager",
                       extra=lambda sel, model: sel.capture(model)),
            ]
        else:
            console.print("[yellow]FastV comparison skipped: no selector registered as 'fastv'[/yellow]")
    return main, fastv


# -- running -------------------------------------------------------------------------------------
class _PickRecorder:
    """A session listener keeping every stage's picks, sorted (to compare the picks of two variants)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        cfg.picks = []

    def on_stage(self, stage, ctx, selection) -> None:
        self.cfg.picks.append([sorted(i for i in row.tolist() if i >= 0) for row in selection.indices])


def _session_for(model, cfg: Config):
    if model.config.get_text_config()._attn_implementation != cfg.attn:
        model.set_attn_implementation(cfg.attn)
    selector = cfg.make()
    session = contextlib.nullcontext()
    if selector is not None:
        session = fvlm.PruningSession(model, selector, listeners=[_PickRecorder(cfg)])
    extra = cfg.extra(selector, model) if cfg.extra else contextlib.nullcontext()
    return selector, session, extra


def run_once(model, inputs, cfg: Config, clock: str) -> None:
    """One timed prefill (no memory probe inside the timed region)."""
    selector, session, extra = _session_for(model, cfg)
    device = next(model.parameters()).device
    with torch.no_grad(), extra, session, StepClock(model, device, clock) as timer:
        wall = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)
        wall = time.perf_counter() - wall
    (start, end), = timer.steps()
    cfg.times.append(end - start)
    cfg.wall.append(wall)
    if selector is not None:
        cfg.trace, cfg.selector = session.trace, selector
        cfg.select_s.append(sum(s.seconds for s in session.trace.stages))


def memory_once(model, inputs, cfg: Config) -> None:
    """One prefill under :class:`PeakMemory` (CUDA: max allocated; CPU: RSS high-water mark)."""
    selector, session, extra = _session_for(model, cfg)
    with torch.no_grad(), extra, session, PeakMemory(next(model.parameters()).device) as mem:
        model(**inputs, use_cache=True, logits_to_keep=1)
    cfg.peaks.append(mem.reading.peak_increase)


def run_rounds(model, inputs, configs: list[Config], repeats: int, warmup: int, clock: str, console) -> None:
    """Interleaved timing rounds (warm-up rounds discarded), then one memory round."""
    for r in range(warmup + repeats + 1):
        memory = r == warmup + repeats
        t0 = time.perf_counter()
        for cfg in configs:
            if cfg.error:
                continue
            try:
                if memory:
                    memory_once(model, inputs, cfg)
                else:
                    run_once(model, inputs, cfg, clock)
            except Exception as exc:  # noqa: BLE001
                cfg.error = f"{type(exc).__name__}: {exc}"
                console.print(f"[red]{cfg.label}: {cfg.error}[/red]")
                continue
            if r < warmup:  # drop warm-up measurements
                cfg.times.pop(), cfg.wall.pop()
                if cfg.select_s:
                    cfg.select_s.pop()
        kind = "warm-up" if r < warmup else "memory" if memory else f"repeat {r - warmup + 1}/{repeats}"
        console.print(f"[dim]{kind}: {len(configs)} configurations in {time.perf_counter() - t0:.1f} s[/dim]")
    model.set_attn_implementation("sdpa")


# -- FLOPs ---------------------------------------------------------------------------------------
def flops_of(cfg: Config, text, vision, seq: int, batch: int, images: int = 1) -> tuple[float, float]:
    """(model FLOPs, selector overhead FLOPs) of one configuration's prefill, full convention."""
    tokens = cfg.trace.prefill_length if cfg.trace is not None else [seq] * text.num_layers
    over = 0.0
    if cfg.trace is not None and cfg.selector is not None:
        over = in_llm_overhead_flops(cfg.selector, cfg.trace.stages, cfg.trace.visual_per_layer[0], tokens, text)
    flops = full_flops(text, tokens, vision=vision, images=[{"tiles": 1}] * images, lm_head_rows=1, batch=batch)
    return flops.model, over * batch


# -- output --------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=None, help="default hidden // 64")
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None, help="default 2.6875 x hidden (the Vicuna-7B ratio)")
    p.add_argument("--vocab", type=int, default=8192,
                   help="vocabulary (LM head rows); default 8192 keeps Vicuna-7B's LM-head : decoder-layer weight ratio "
                        "(0.65) at d=1024; 32000 at d=1024 makes the head 2.6 layers' worth of weights")
    p.add_argument("--visual", type=int, default=576, help="visual tokens per image (a square: 576 = 24 x 24)")
    p.add_argument("--images", type=int, default=1,
                   help="images per prompt, back to back (5 x 576 = LLaVA-NeXT's 2,880 visual tokens)")
    p.add_argument("--text", type=int, default=64, help="text tokens per prompt")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budgets", type=float, nargs="+", default=[192, 128, 64], help="layer-average budgets")
    p.add_argument("--selectors", nargs="*", default=None, help="default: every registered selector with a budget")
    p.add_argument("--no-schedule-only", dest="schedule_only", action="store_false",
                   help="skip the 'PIO schedule with random picks' rows")
    p.add_argument("--no-fastv-compare", dest="fastv_compare", action="store_false")
    p.add_argument("--generate-tokens", type=int, default=8, help="0 to skip the generate measurements")
    p.add_argument("--generate-selectors", nargs="*", default=["pio_fvlm", "fastv"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default=None,
                   help="cpu: thread CPU time (CPU device, one thread; robust on a shared machine); "
                        "default cpu with --threads 1 on CPU, else wall")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write all measurements here")
    p.add_argument("--plot", help="save a PNG: prefill latency and speedup vs budget")
    args = p.parse_args(argv)

    console = Console(highlight=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    side = math.isqrt(args.visual)
    if side * side != args.visual:
        p.error("--visual must be a square number of patches (e.g. 576)")
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = sized_llava(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                        intermediate=args.intermediate, vocab=args.vocab, image_size=side * 14, patch=14,
                        dtype=dtype, seed=args.seed, device=args.device)
    inputs = sized_llava_inputs(model, text_tokens=args.text, batch=args.batch, seed=args.seed, images=args.images)
    args.visual_total = args.visual * args.images
    info = fvlm.PruningSession(model, fvlm.create_selector("keep_all")).info
    text, vision = text_arch(model.config), vision_arch(model.config)
    seq = int(inputs["input_ids"].shape[1])
    started = datetime.datetime.now().astimezone()
    header = (f"random LLaVA: LLM {args.layers} layers, d={args.hidden}, m={text.intermediate_size}, "
              f"{text.num_heads} heads ({text.num_kv_heads} KV), vocab {args.vocab}; tiny CLIP -> {args.images} x {args.visual} visual "
              f"tokens; prompt {seq} tokens x batch {args.batch}; {args.device} {args.dtype}, "
              f"{torch.get_num_threads()} thread(s); built in {time.perf_counter() - t0:.1f} s")
    clock = args.clock or ("cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall")
    if clock == "cpu" and (args.device != "cpu" or torch.get_num_threads() != 1):
        p.error("--clock cpu needs --device cpu and --threads 1 (thread CPU time misses other threads' work)")
    header += f"; clock: {'thread CPU time' if clock == 'cpu' else 'wall time'}"
    console.print(header)
    console.print(f"machine: {machine()}; started {started:%Y-%m-%d %H:%M %Z}")

    main_cfgs, fastv_cfgs = build_configs(args, info, console)
    run_rounds(model, inputs, main_cfgs + fastv_cfgs, args.repeats, args.warmup, clock, console)

    ref = main_cfgs[0]
    ref_time = statistics.median(ref.times)
    ref_flops, _ = flops_of(ref, text, vision, seq, args.batch, args.images)
    ref_peak = f", peak +{max(ref.peaks) / 2**20:.0f} MiB" if ref.peaks else ""
    table = Table(title=f"prefill speedup vs keep-all ({ref_time:.3f} s {clock} time, {ref_flops / 1e12:.3f} TFLOPs "
                        f"full convention{ref_peak})")
    for col in ("budget", "selector", "stages", "layer avg", "prefill s", "wall s", "select s", "peak MiB",
                "ideal", "ideal+ovh", "measured", "ratio"):
        table.add_column(col, justify="left" if col in ("selector", "stages") else "right")
    rows = []
    for cfg in main_cfgs[1:]:
        if cfg.error or not cfg.times:
            table.add_row(f"{cfg.budget:g}", cfg.group, *["-"] * 9, cfg.error or "no run")
            continue
        med = statistics.median(cfg.times)
        flops, over = flops_of(cfg, text, vision, seq, args.batch, args.images)
        ideal, ideal_ovh, measured = ref_flops / flops, ref_flops / (flops + over), ref_time / med
        avg = cfg.trace.mean_layer_average
        stages = ",".join(f"{s.where}:{s.budget[0]}" for s in cfg.trace.stages)
        table.add_row(f"{cfg.budget:g}", cfg.group, stages, f"{avg:.1f}", f"{med:.3f}",
                      f"{statistics.median(cfg.wall):.3f}", f"{statistics.median(cfg.select_s):.3f}",
                      f"{max(cfg.peaks) / 2**20:.0f}" if cfg.peaks else "-", f"{ideal:.2f}x", f"{ideal_ovh:.2f}x",
                      f"{measured:.2f}x", f"{measured / ideal:.2f}")
        rows.append(dict(label=cfg.label, selector=cfg.group, budget=cfg.budget, stages=stages, layer_average=avg,
                         times=cfg.times, wall_times=cfg.wall, median_s=med, select_s=cfg.select_s, model_flops=flops, overhead_flops=over,
                         ideal_speedup=ideal, ideal_speedup_with_overhead=ideal_ovh, measured_speedup=measured,
                         ratio=measured / ideal, peak_increase=cfg.peaks))
    console.print(table)
    console.print("[dim]ideal = keep-all / pruned FLOPs (full convention, whole prefill incl. text tokens, vision tower "
                  "and LM head; selector work not counted); ideal+ovh counts the selector's estimated FLOPs too; "
                  "measured = keep-all / selector median prefill time (selection included; 'prefill s' on the chosen "
                  "clock, 'wall s' the wall time of the same runs, 'select s' the wall time of the selection stages); "
                  "peak: memory increase during one prefill; ratio = measured / ideal[/dim]")

    fastv_rows = []
    if fastv_cfgs and all(c.times for c in fastv_cfgs):
        ft = Table(title="FastV: attention rows recomputed under SDPA vs the eager attention map")
        for col in ("variant", "prefill s (median)", "wall s", "peak increase MiB", "picks shared with row 1"):
            ft.add_column(col, justify="left" if col == "variant" else "right")
        for cfg in fastv_cfgs:
            same = _same_picks(fastv_cfgs[0], cfg)
            med = statistics.median(cfg.times)
            peak = max(cfg.peaks) / 2**20
            ft.add_row(cfg.label, f"{med:.3f}", f"{statistics.median(cfg.wall):.3f}", f"{peak:.1f}", same)
            fastv_rows.append(dict(label=cfg.label, times=cfg.times, wall_times=cfg.wall, median_s=med,
                                   peak_increase=cfg.peaks))
        console.print(ft)

    gen_rows = []
    if args.generate_tokens:
        gen_rows = _generate_table(args, model, inputs, info, clock, console)

    if args.json:
        out = dict(command=" ".join([os.path.basename(sys.executable), *sys.argv]), machine=machine(), clock=clock,
                   started=started.isoformat(), header=header, keep_all=dict(times=ref.times, model_flops=ref_flops,
                   peak_increase=ref.peaks), rows=rows, fastv=fastv_rows, generate=gen_rows, args=vars(args))
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        console.print(f"wrote {args.json}")
    if args.plot:
        _plot(rows, ref_time, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


def _same_picks(a: Config, b: Config) -> str:
    """Kept visual tokens shared by two runs (all stages, all samples): ``"30/30"``."""
    if not a.picks or not b.picks:
        return "-"
    shared = sum(len(set(x) & set(y)) for sa, sb in zip(a.picks, b.picks) for x, y in zip(sa, sb))
    total = sum(len(x) for sa in a.picks for x in sa)
    return f"{shared}/{total}"


def _generate_table(args, model, inputs, info, clock, console) -> list[dict]:
    budget = min(args.budgets)
    configs = [("keep_all", None)]
    for name in args.generate_selectors:
        if name in fvlm.list_selectors():
            configs.append((f"{name} @{budget:g}", (name, selector_kwargs_for_average(name, budget, info, args.visual_total))))
    table = Table(title=f"generate, {args.generate_tokens} new tokens, batch {args.batch} "
                        f"(medians of {args.repeats}, {clock} time)")
    for col in ("config", "TTFT s", "prefill s", "decode s/token", "end-to-end s", "samples/s", "peak incr. MiB"):
        table.add_column(col, justify="left" if col == "config" else "right")
    out = []
    for label, spec in configs:
        ctx = (lambda spec=spec: fvlm.prune(model, spec[0], **spec[1])) if spec else None
        g = measure_generate(model, inputs, max_new_tokens=args.generate_tokens, context=ctx,
                             repeats=args.repeats, warmup=1, clock=clock)
        table.add_row(label, f"{g.ttft:.3f}", f"{g.prefill:.3f}", f"{g.decode_per_token:.4f}", f"{g.end_to_end:.3f}",
                      f"{g.throughput:.3f}", f"{g.peak_memory_increase / 2**20:.1f}")
        out.append(dict(label=label, **g.to_dict()))
    console.print(table)
    console.print(f"[dim]peak memory: {out[0]['memory_kind']} ({out[0]['memory_scope']} scope), increase over the "
                  "start of each run[/dim]")
    return out


def _plot(rows: list[dict], ref_time: float, path: str) -> None:
    from fvlm.profiling.report import _pyplot

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["selector"], []).append(r)
    for name, members in groups.items():
        members = sorted(members, key=lambda r: r["layer_average"])
        x = [r["layer_average"] for r in members]
        left.plot(x, [r["median_s"] for r in members], marker="o", label=name)
        right.plot(x, [r["measured_speedup"] for r in members], marker="o", label=name)
    ideal = sorted(rows, key=lambda r: r["layer_average"])
    right.plot([r["layer_average"] for r in ideal], [r["ideal_speedup"] for r in ideal], "k:", marker=".",
               label="FLOPs-ideal")
    left.axhline(ref_time, color="k", linestyle="--", label="keep-all")
    left.set(xlabel="visual tokens (layer average)", ylabel="prefill seconds", title="prefill latency vs budget")
    right.set(xlabel="visual tokens (layer average)", ylabel="speedup vs keep-all", title="measured vs FLOPs-ideal")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
