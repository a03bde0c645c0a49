"""``fvlm profile``: analytic efficiency of selectors / schedules on real-scale architectures.

No weights and no forward pass: the architecture comes from a shipped config (or any config .json),
a selector's schedule from ``selector.stages(info)``. Prints the visual tokens entering the LLM,
the layer average, FLOPs in the paper and full conventions, the KV cache, and ratios vs keep-all.

    fvlm profile --model llava-1.5-7b --schedule 1:218,10:128,15:54 --schedule 1:92,10:54,15:22
    fvlm profile --model llava-next-7b --selector random --selector uniform --budget 192 128 64 --plot out.png
"""
from __future__ import annotations

import argparse

import yaml

from fvlm.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="analytic FLOPs / KV cache / visual tokens of selectors on real-scale models (no weights)",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Conventions: 'paper' = sum of 4nd^2+2n^2d+2ndm over layers, visual tokens only (the papers' "
        "tables); 'full' = every matmul of the prefill (2 FLOPs per multiply-add), all tokens, vision tower, "
        "LM head and selector overhead.",
    )
    p.add_argument("--model", default="llava-1.5-7b",
                   help="shipped architecture (see --list-models) or a path to a config .json")
    p.add_argument("--list-models", action="store_true", help="list the shipped architectures and exit")
    p.add_argument("--schedule", action="append", default=[], metavar="SPEC",
                   help="explicit stages, e.g. '1:218,10:128,15:54' or 'input:64' (repeatable)")
    p.add_argument("--selector", action="append", default=[], metavar="NAME",
                   help="registered selector (repeatable); its schedule comes from selector.stages(info)")
    p.add_argument("--budget", nargs="+", type=float, default=[], metavar="AVG",
                   help="layer-average visual-token budget(s) for every --selector (e.g. 192 128 64)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="selector argument for every --selector, YAML-parsed (repeatable), e.g. --set k=3")
    p.add_argument("--visual", type=int, help="visual tokens per sample before pruning (default: the model's)")
    p.add_argument("--text-tokens", type=int, help="text tokens per sample (default: the model's profile)")
    p.add_argument("--decode-tokens", type=int, default=0, help="add this many generated tokens to the KV cache")
    p.add_argument("--kv-dtype", help="KV cache dtype (default: the model's, e.g. float16)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--plot", metavar="PATH", help="also save a PNG: visual tokens per layer, cost vs budget")
    p.add_argument("--meta-check", action="store_true",
                   help="build the real model on the meta device and compare measured FLOPs / KV with keep-all")
    p.set_defaults(func=run)


def _params(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace) -> int:
    from fvlm.console import console as _console
    from fvlm.profiling import analytic, report
    from fvlm.profiling.arch import load_architecture, shipped_models

    console = _console()
    if args.list_models:
        for name in shipped_models():
            console.print(f"{name}: {load_architecture(name).description}")
        return 0
    if args.budget and not args.selector:
        raise UsageError("--budget needs at least one --selector (for explicit stages use --schedule)")
    arch = load_architecture(args.model)
    common = dict(visual_tokens=args.visual, text_tokens=args.text_tokens, decode_tokens=args.decode_tokens,
                  kv_dtype=args.kv_dtype)
    params = _params(args.options)
    rows = [analytic.keep_all_row(arch, **common)]
    try:
        for spec in args.schedule:
            rows.append(analytic.profile_stages(arch, analytic.parse_schedule(spec), label=spec, **common))
        for name in args.selector:
            if args.budget and analytic.budget_parameter(name) is None:
                console.print(f"[yellow]skipping {name}: it has no budget parameter "
                              f"({', '.join(analytic.BUDGET_PARAMETERS)}); profile it without --budget, "
                              "with --set for its own parameters[/yellow]")
                continue
            for budget in args.budget or [None]:
                rows.append(analytic.profile_selector(arch, name, budget=budget, params=params, **common))
    except ValueError as exc:  # bad selector arguments or schedules
        raise UsageError(str(exc)) from None
    report.print_report(arch, rows, console, decode_tokens=args.decode_tokens, kv_dtype=args.kv_dtype)
    if args.meta_check:
        _meta_check(arch, args, console)
    if args.json:
        path = report.write_json(args.json, report.report_dict(arch, rows, args.decode_tokens, args.kv_dtype))
        console.print(f"wrote {path}")
    if args.plot:
        path = report.plot_profile(arch, rows, args.plot)
        console.print(f"wrote {path}")
    return 0


def _meta_check(arch, args, console) -> None:
    from fvlm.profiling.meta import meta_check
    from fvlm.profiling.report import sig

    result = meta_check(arch, args.visual, args.text_tokens)
    console.print(f"meta-device check ({arch.name}, keep-all, transformers model with no weights):")
    for key, unit, scale in (("llm", "TFLOPs", 1e12), ("vision", "TFLOPs", 1e12), ("kv_bytes", "MiB", 2**20)):
        if result[key] is None:
            console.print(f"  {key}: not run on the meta device")
            continue
        measured, analytic = result[key]
        status = "[green]match[/green]" if measured == analytic else "[red]MISMATCH[/red]"
        console.print(f"  {key}: measured {sig(measured / scale)} {unit}, analytic {sig(analytic / scale)} {unit}: {status}")
