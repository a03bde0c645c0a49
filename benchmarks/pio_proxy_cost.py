"""Cost of PIO-FVLM's proxy gradient: rows-only proxy vs. the full-block reference; batching throughput.

    python benchmarks/pio_proxy_cost.py --markdown /tmp/pio_proxy_cost.md --json /tmp/pio_proxy_cost.json

Part 1 (proxy cost). A random Llama-shaped LLaVA (:func:`fvlm.testing.sized_llava`; default hidden
1024, intermediate 2752, 16 heads, 4 layers, vocab 32,000, float32 on the CPU) prefills one prompt
with ``576`` and ``2,880`` visual tokens (1 and 5 images of 576) plus ``--text`` text tokens, under
PIO-FVLM with the authors' stage shape (after layers 1, 2, 3 keep 218 / 128 / 54 of 576). At every
stage, on the very same hidden states, it times (fastest of ``--repeats``, variants interleaved;
every repeat is in the JSON):

* the unit: one forward of the proxy's decoder layer on the current sequence (``no_grad``);
* the proxy gradient (forward + backward to the hidden states) with ``proxy="rows"`` (fvlm's
  default), ``proxy="block", head_rows="loss"`` and ``proxy="block", head_rows="all"`` (the authors'
  code: every row through the block, final norm and LM head);
* the NMS + fill that follows (the same for every variant);

and reports each in layer-forward equivalents, with the peak memory increase of one gradient call
and whether the three variants pick the same tokens. Memory on the CPU is the peak resident-set
increase of the block (``/proc/self/clear_refs`` + ``VmHWM``, :class:`fvlm.profiling.timing.PeakMemory`);
the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns every
freed tensor to the system and RSS follows live tensor bytes (on a GPU: ``max_memory_allocated``).
The analytic FLOPs ratio (:func:`fvlm.metrics.flops.proxy_flops` over one layer) is printed next to it.

Part 2 (throughput). A smaller model of the same family (``--tp-hidden``) runs greedy ``generate``
at batch 1 and batch ``--tp-batch`` for keep-all, FastV and PIO-FVLM; samples/s from
:func:`fvlm.profiling.timing.measure_generate`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import fvlm  # noqa: E402
from fvlm.profiling.timing import PeakMemory, measure_generate  # noqa: E402
from fvlm.selectors.algorithms import nms_fill  # noqa: E402
from fvlm.selectors.pio_fvlm import PIOFVLM  # noqa: E402
from fvlm.testing import sized_llava, sized_llava_inputs  # noqa: E402

VARIANTS = {  # name -> PIOFVLM proxy options
    "rows": dict(proxy="rows"),
    "block/loss": dict(proxy="block", head_rows="loss"),
    "block/all": dict(proxy="block", head_rows="all"),
}
CHEAPER = ("rows", "block/loss")  # compared with the authors' way, block/all
AUTHORS_SHAPE = (218, 128, 54)  # of 576, after layers 1, 2, 3
MIB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class ProxyProbe(PIOFVLM):
    """PIO-FVLM that, at every stage, times and measures every proxy variant on the same context,
    then selects with the rows proxy."""

    def __init__(self, repeats: int, memory: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.repeats, self.memory = repeats, memory
        self.variants = {name: PIOFVLM(**kwargs, **opts) for name, opts in VARIANTS.items()}
        self.records: list[dict] = []

    def select(self, ctx):
        device = ctx.hidden.device

        def unit():
            with torch.no_grad():
                ctx.run_layer(ctx.layer, ctx.hidden)

        jobs = {"unit": unit, **{name: (lambda v=v: v.gradient(ctx)) for name, v in self.variants.items()}}
        memory, saliency, kind = {}, {}, ""
        for name, job in jobs.items():  # warm-up, peak memory (memory pass), saliency
            job()
            if self.memory:
                with PeakMemory(device) as mem:
                    job()
                memory[name], kind = mem.reading.peak_increase, mem.reading.kind
            if name != "unit":
                saliency[name] = self.variants[name].saliency(ctx)
        seconds = {name: [] for name in jobs}
        for _ in range(0 if self.memory else self.repeats):
            for name, job in jobs.items():
                seconds[name].append(_timed(job, device))
        picks = {name: nms_fill(s, ctx.visual_hidden, ctx.visual_valid, ctx.budget, self.tau, self.nms)
                 for name, s in saliency.items()}
        nms = min(
            _timed(lambda: nms_fill(saliency["rows"], ctx.visual_hidden, ctx.visual_valid, ctx.budget, self.tau,
                                    self.nms), device) for _ in range(3))
        ref = saliency["block/loss"]
        self.records.append(dict(
            layer=ctx.layer, seq_len=int(ctx.hidden.shape[1]), n_visual=int(ctx.num_visual.max()),
            keep=int(ctx.budget.max()), memory_kind=kind,
            seconds={k: min(v) for k, v in seconds.items() if v}, all_seconds=seconds,
            peak_bytes=memory, nms_seconds=nms,
            picks_equal=all(torch.equal(p, picks["block/loss"]) for p in picks.values()),
            picks_shared=min(_shared(p, picks["block/loss"]) for p in picks.values()),
            picks_total=int((picks["block/loss"] >= 0).sum()),
            max_rel_saliency_diff=max(float(((s - ref).abs().max() / ref.abs().max())) for s in saliency.values()),
        ))
        return picks["rows"]


def _shared(a: torch.Tensor, b: torch.Tensor) -> int:
    """Kept tokens two index sets ``[B, K]`` (``-1`` padded) have in common."""
    return sum(len(set(x.tolist()) & set(y.tolist()) - {-1}) for x, y in zip(a, b))


def _same(r: dict) -> str:
    """``yes``, or the smallest overlap with the block/loss picks (low precision can flip near-ties)."""
    return "yes" if r["picks_equal"] else f"{r['picks_shared']}/{r['picks_total']}"


def analytic_ratios(model, seq_len: int) -> dict:
    """FLOPs of each proxy variant (forward + input-gradient backward) over one decoder-layer forward."""
    try:
        from fvlm.metrics.flops import decoder_layer_flops, proxy_flops
        from fvlm.profiling.arch import text_arch
    except ImportError:
        return {}
    text = text_arch(model.config)
    unit = decoder_layer_flops(seq_len, seq_len, text)
    return {name: proxy_flops(seq_len, text, mode=o["proxy"], head_rows=o.get("head_rows", "loss")) / unit
            for name, o in VARIANTS.items()}


def _model(args, hidden: int, layers: int, heads: int):
    return sized_llava(hidden=hidden, layers=layers, heads=heads, vocab=args.vocab, attn_implementation=args.attn,
                       dtype=getattr(torch, args.dtype), device=args.device)


def proxy_cost(args, console: Console, memory: bool = False) -> list[dict]:
    model = _model(args, args.hidden, args.layers, args.heads)
    per_image = int(model.config.image_seq_length)
    keep = [k / 576 for k in AUTHORS_SHAPE]
    rows = []
    for n_visual in args.visual:
        if n_visual % per_image:
            raise SystemExit(f"--visual {n_visual}: must be a multiple of {per_image} (whole images)")
        inputs = sized_llava_inputs(model, text_tokens=args.text, images=n_visual // per_image)
        probe = ProxyProbe(repeats=args.repeats, memory=memory, layers=[1, 2, 3], keep_fraction=keep)
        start = time.perf_counter()
        with fvlm.prune(model, probe), torch.no_grad():
            model(**inputs, use_cache=False)
        what = "memory" if memory else "time"
        console.print(f"[dim]{n_visual} visual tokens: {what} measured in {time.perf_counter() - start:.0f} s[/dim]")
        for r in probe.records:
            r.update(visual_tokens=n_visual, flops_ratio=analytic_ratios(model, r["seq_len"]))
            rows.append(r)
    return rows


def schedule_totals(rows: list[dict]) -> list[dict]:
    """Per input size, the whole 3-stage schedule: seconds of each proxy variant and of the unit layers."""
    out = []
    for n in dict.fromkeys(r["visual_tokens"] for r in rows):
        group = [r for r in rows if r["visual_tokens"] == n]
        total = {k: sum(r["seconds"][k] for r in group) for k in ("unit", *VARIANTS)}
        total["nms"] = sum(r["nms_seconds"] for r in group)
        out.append(dict(visual_tokens=n, seconds=total))
    return out


def totals_table(totals: list[dict]) -> Table:
    table = Table(title="Whole schedule (3 stages): proxy seconds, and the authors' cost (block/all) ÷ each")
    for col in ("visual", "3 layer forwards", *VARIANTS, "NMS + fill", *(f"block/all ÷ {v}" for v in CHEAPER)):
        table.add_column(col, justify="right")
    for t in totals:
        s = t["seconds"]
        table.add_row(str(t["visual_tokens"]), *(f"{s[k]:.3f} s" for k in ("unit", *VARIANTS, "nms")),
                      *(f"{s['block/all'] / s[v]:.1f}" for v in CHEAPER))
    return table


def proxy_table(rows: list[dict]) -> Table:
    table = Table(title="PIO-FVLM proxy gradient per stage (time in layer-forward equivalents = unit)")
    for col in ("visual", "stage", "seq", "what", "ms", "× unit", "FLOPs × unit", "peak memory", "same picks"):
        table.add_column(col, justify="right")
    for r in rows:
        s, mem, unit = r["seconds"], r["peak_bytes"], r["seconds"]["unit"]
        first = True
        for what in ("unit", *VARIANTS, "nms"):
            sec = r["nms_seconds"] if what == "nms" else s[what]
            flops = r["flops_ratio"].get(what) if what in VARIANTS else (1.0 if what == "unit" else None)
            lead = [str(r["visual_tokens"]), f"after {r['layer']}", str(r["seq_len"])] if first else ["", "", ""]
            table.add_row(*lead, what, f"{sec * 1e3:.1f}", f"{sec / unit:.2f}", "" if flops is None else f"{flops:.2f}",
                          _mib(mem, what) if what in mem else "",
                          _same(r) if first else "", end_section=what == "nms")
            first = False
    return table


def throughput(args, console: Console) -> list[dict]:
    model = _model(args, args.tp_hidden, args.tp_layers or args.layers, args.tp_heads or max(1, args.tp_hidden // 64))
    keep = [k / 576 for k in AUTHORS_SHAPE]
    selectors = {
        "keep_all": None,
        "fastv": ("fastv", dict(layer=2, keep=0.25)),
        "pio_fvlm": ("pio_fvlm", dict(layers=[1, 2, 3], keep_fraction=keep)),
    }
    out = []
    for new_tokens in args.tp_new_tokens:
        for name, spec in selectors.items():
            if spec is not None and spec[0] not in fvlm.list_selectors():
                console.print(f"[yellow]{spec[0]} is not registered: skipped[/yellow]")
                continue
            row = dict(selector=name, new_tokens=new_tokens)
            for batch in (1, args.tp_batch):
                inputs = sized_llava_inputs(model, text_tokens=args.text, batch=batch)
                context = (lambda s=spec: fvlm.prune(model, s[0], **s[1])) if spec else None
                timing = measure_generate(model, inputs, max_new_tokens=new_tokens, context=context,
                                          repeats=args.tp_repeats, warmup=1)
                row[batch] = timing.to_dict()
            row["speedup"] = row[args.tp_batch]["throughput"] / row[1]["throughput"]
            out.append(row)
    return out


def _tp_cells(r: dict, batch: int) -> list[str]:
    one, many = r[1], r[batch]
    return [r["selector"], str(r["new_tokens"]), f"{one['throughput']:.2f}", f"{many['throughput']:.2f}",
            f"{r['speedup']:.2f}x", f"{one['prefill'] * 1e3:.0f} / {many['prefill'] / batch * 1e3:.0f}",
            f"{one['decode_per_token'] * 1e3:.1f} / {many['decode_per_token'] / batch * 1e3:.1f}"]


TP_COLUMNS = ("selector", "new tokens", "samples/s B=1", "samples/s B={b}", "speedup",
              "prefill ms per sample B=1 / B={b}", "decode ms per token per sample B=1 / B={b}")


def throughput_table(rows: list[dict], batch: int) -> Table:
    table = Table(title=f"Throughput of greedy generate at batch {batch} vs. batch 1")
    for col in TP_COLUMNS:
        table.add_column(col.format(b=batch), justify="right")
    for r in rows:
        table.add_row(*_tp_cells(r, batch))
    return table


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cpu = f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); {cpu}"
    return cpu


def _mib(mem: dict, key: str) -> str:
    return f"{mem[key] / MIB:.0f} MiB" if key in mem else "n/a"


def markdown(args, proxy_rows: list[dict], tp_rows: list[dict]) -> str:
    lines = [f"Command: `{' '.join(['python', *sys.argv])}`", "",
             f"Machine: {machine()}; date {datetime.date.today().isoformat()}", ""]
    if proxy_rows:
        lines += ["| visual | stage | seq | unit: 1 layer forward | " + " | ".join(VARIANTS)
                  + " | NMS + fill | block/all ÷ rows | same picks | FLOPs × unit: " + " / ".join(VARIANTS) + " |",
                  "|" + "---:|" * (8 + len(VARIANTS))]
        for r in proxy_rows:
            s, mem, unit = r["seconds"], r["peak_bytes"], r["seconds"]["unit"]
            cells = [f"{s[v] / unit:.2f} ({_mib(mem, v)})" for v in VARIANTS]
            flops = " / ".join(f"{r['flops_ratio'][v]:.2f}" for v in VARIANTS) if r["flops_ratio"] else "n/a"
            lines.append(f"| {r['visual_tokens']} | after {r['layer']} | {r['seq_len']} | {unit * 1e3:.0f} ms "
                         f"({_mib(mem, 'unit')}) | " + " | ".join(cells)
                         + f" | {r['nms_seconds'] / unit:.2f} | {s['block/all'] / s['rows']:.1f} | "
                         f"{_same(r)} | {flops} |")
        lines += ["", "| visual | 3 layer forwards | " + " | ".join(VARIANTS) + " | NMS + fill | "
                  + " | ".join(f"block/all ÷ {v}" for v in CHEAPER) + " |",
                  "|" + "---:|" * (3 + len(VARIANTS) + len(CHEAPER))]
        for t in schedule_totals(proxy_rows):
            s = t["seconds"]
            lines.append(f"| {t['visual_tokens']} | " + " | ".join(f"{s[k]:.3f} s" for k in ("unit", *VARIANTS, "nms"))
                         + " | " + " | ".join(f"{s['block/all'] / s[v]:.1f}" for v in CHEAPER) + " |")
        lines.append("")
    if tp_rows:
        b = args.tp_batch
        lines += ["| " + " | ".join(c.format(b=b) for c in TP_COLUMNS) + " |",
                  "|---|" + "---:|" * (len(TP_COLUMNS) - 1)]
        lines += ["| " + " | ".join(_tp_cells(r, b)) + " |" for r in tp_rows]
        lines.append("")
    return "\n".join(lines)


def memory_pass(args, console: Console) -> dict:
    """Peak memory per (visual tokens, stage, variant), measured in a child process that runs with
    ``MALLOC_MMAP_THRESHOLD_=65536`` (every tensor buffer is its own mapping, returned on free, so
    RSS follows live tensor bytes; that setting slows allocation, hence not for the timings)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "memory.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-pass", "--json", path, "--skip-throughput",
               "--hidden", str(args.hidden), "--heads", str(args.heads), "--layers", str(args.layers),
               "--vocab", str(args.vocab), "--text", str(args.text), "--attn", args.attn,
               "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype,
               "--visual", *map(str, args.visual)]
        subprocess.run(cmd, check=True, env={**os.environ, MMAP_ENV: "65536"})
        with open(path) as fh:
            rows = json.load(fh)["proxy"]
    return {(r["visual_tokens"], r["layer"]): r["peak_bytes"] for r in rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--visual", type=int, nargs="+", default=[576, 2880])
    p.add_argument("--text", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine, 2 OpenMP threads spin "
                        "against other processes and timings scatter by several x; 0 = torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--tp-hidden", type=int, default=256)
    p.add_argument("--tp-layers", type=int, default=None, help="default --layers")
    p.add_argument("--tp-heads", type=int, default=None, help="default tp-hidden // 64")
    p.add_argument("--tp-batch", type=int, default=8)
    p.add_argument("--tp-new-tokens", type=int, nargs="+", default=[8, 32])
    p.add_argument("--tp-repeats", type=int, default=2)
    p.add_argument("--skip-proxy", action="store_true")
    p.add_argument("--skip-memory", action="store_true", help="no peak-memory pass (a second process)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--markdown", help="write the tables (with command, machine and date) to this file")
    p.add_argument("--json", help="write the raw numbers to this file")
    p.add_argument("--memory-pass", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    if args.memory_pass:
        rows = proxy_cost(args, console, memory=True)
        with open(args.json, "w") as fh:
            json.dump(dict(proxy=rows), fh, default=str)
        return
    console.print(f"[bold]{machine()}[/bold]")
    start = time.perf_counter()
    proxy_rows = [] if args.skip_proxy else proxy_cost(args, console)
    if proxy_rows:
        peaks = {} if args.skip_memory else memory_pass(args, console)
        for r in proxy_rows:
            r["peak_bytes"] = peaks.get((r["visual_tokens"], r["layer"]), {})
        console.print(proxy_table(proxy_rows))
        console.print(totals_table(schedule_totals(proxy_rows)))
    tp_rows = [] if args.skip_throughput else throughput(args, console)
    if tp_rows:
        console.print(throughput_table(tp_rows, args.tp_batch))
    console.print(f"[dim]total {time.perf_counter() - start:.0f} s[/dim]")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(markdown(args, proxy_rows, tp_rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(argv=sys.argv, machine=machine(), date=datetime.date.today().isoformat(),
                           proxy=proxy_rows, throughput=tp_rows), fh, indent=1, default=str)


if __name__ == "__main__":
    main()
