"""The ``fvlm`` command line: ``fvlm list``, ``fvlm info NAME``, ``fvlm demo`` (and run, compare, profile, visualize).

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func``; append it to ``COMMANDS`` to add a command (run, profile, visualize, ...). Every command
follows one convention (``fvlm.commands.options``): dash or underscore spellings, bare booleans.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from rich.markdown import Markdown
from rich.table import Table
from rich.text import Text

from fvlm import registry
from fvlm.commands import docstrings
from fvlm.commands.options import ArgumentParser
from fvlm.console import console
from fvlm.errors import FVLMError, PluginLoadError, UsageError


_console = console  # the shared console of every command (fvlm.console)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fvlm")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _registry(args: argparse.Namespace) -> registry.EntryPointRegistry:
    return registry.ADAPTERS if getattr(args, "adapters", False) else registry.SELECTORS


def _needs(needs) -> str:
    return ", ".join(sorted(getattr(n, "value", str(n)) for n in needs)) or "-"


# fvlm list ------------------------------------------------------------------------------------
def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list registered selectors (or adapters) and whether they load")
    p.add_argument("pattern", nargs="?", help="glob on the names, e.g. 'uni*'")
    p.add_argument("--adapters", action="store_true", help="list backbone adapters instead of selectors")
    p.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    if args.adapters:
        return _list_adapters(args)
    reg = _registry(args)
    conflicts = reg.conflicts()
    table = Table(title=f"fvlm {reg.kind}s (entry-point group {reg.group})")
    for column in ("name", "description", "class", "needs", "distribution", "status"):
        table.add_column(column, overflow="fold")
    for name in reg.names(args.pattern):
        regs = reg.registrations(name)
        if name in conflicts:
            status = Text.assemble(("CONFLICT", "bold red"), f": {' vs '.join(conflicts[name])}")
            table.add_row(name, "?", "\n".join(r.value for r in regs), "?", "\n".join(conflicts[name]), status)
            continue
        try:
            info = reg.info(name)
            about, needs, status = docstrings.plain(info.summary), _needs(info.needs), Text("ok", style="green")
        except PluginLoadError as exc:
            about, needs, status = "?", "?", Text.assemble(("BROKEN", "bold red"), f": {exc.reason}")
        table.add_row(name, about, regs[0].value, needs, regs[0].where, status)
    _console().print(table)
    return 0


def _list_adapters(args: argparse.Namespace) -> int:
    """The supported model families: one row per registered model type."""
    reg = registry.ADAPTERS
    conflicts = reg.conflicts()
    table = Table(title=f"fvlm backbone adapters: supported model families (entry-point group {reg.group})")
    for column in ("model_type", "family", "transformers class", "example checkpoint", "tiny model", "adapter",
                   "status"):
        table.add_column(column, overflow="fold")
    for name in reg.names(args.pattern):
        regs = reg.registrations(name)
        if name in conflicts:
            status = Text.assemble(("CONFLICT", "bold red"), f": {' vs '.join(conflicts[name])}")
            table.add_row(name, "?", "?", "?", "?", "\n".join(r.value for r in regs), status)
            continue
        try:
            cls = reg.get_class(name)
        except PluginLoadError as exc:
            table.add_row(name, "?", "?", "?", "?", regs[0].value, Text.assemble(("BROKEN", "bold red"), f": {exc.reason}"))
            continue
        about = cls.about or {}
        table.add_row(name, about.get("name", cls.family), about.get("classes", {}).get(name, "-"),
                      about.get("checkpoints", {}).get(name, "-"), "yes" if name in cls.tiny else "no",
                      f"{regs[0].value} ({regs[0].where})", Text("ok", style="green"))
    _console().print(table)
    return 0


# fvlm info NAME -------------------------------------------------------------------------------
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a selector's (or adapter's) class, needs and parameters")
    p.add_argument("name")
    p.add_argument("--adapters", action="store_true", help="look NAME up among the backbone adapters")
    p.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    """The name and summary, class, needs and origin, the docstring as Markdown, then the parameters
    with their ``Args:`` descriptions in one table."""
    info = _registry(args).info(args.name)
    doc = docstrings.split(info.doc)
    summary, _, body = doc.body.partition("\n")
    head = Table.grid(padding=(0, 2))
    head.add_row("class", f"{info.cls.__module__}.{info.cls.__qualname__}")
    head.add_row("needs", _needs(info.needs))
    head.add_row("distribution", f"{info.distribution} {info.version}")
    params = Table(title="parameters", title_justify="left")
    for column in ("name", "type", "default", "description"):
        params.add_column(column, overflow="fold")
    for pname, (ann, default) in info.parameters.items():
        params.add_row(pname, ann or "-", "(required)" if default is registry.REQUIRED else repr(default),
                       docstrings.plain(doc.args.get(pname, "")))
    console = _console()
    console.print(Text.assemble((info.name, "bold"), ": ", docstrings.plain(summary)))
    console.print(head)
    if body.strip():
        console.print()
        console.print(Markdown(body.strip()), width=min(console.width, 100))
    console.print()
    console.print(params)
    return 0


# fvlm demo ------------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="prune a built-in tiny model and compare with the unpruned run (no download)")
    p.add_argument("--family", default="llava", help="tiny backbone family (a registered adapter's model type, "
                   "see `fvlm list --adapters`)")
    p.add_argument("--selector", default=None, help="registered selector (default: its example settings)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="selector argument, YAML-parsed (repeatable), e.g. --set keep=8")
    p.add_argument("--tokens", type=int, default=8, help="tokens to generate")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import torch
    import yaml

    import fvlm
    from fvlm.adapters.tiny import image_token_id, specs, tiny_inputs, tiny_model
    from fvlm.profiling.timing import StepClock

    FAMILIES = tuple(specs())

    if args.family not in FAMILIES:
        raise UsageError(f"unknown tiny family {args.family!r}; choose from {', '.join(FAMILIES)}")
    names = [args.selector] if args.selector else [n for n in ("random", "divprune", "pio_fvlm") if n in fvlm.list_selectors()]
    options = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        options[key] = yaml.safe_load(value)
    if options and not args.selector:
        raise UsageError("--set needs --selector")
    if args.tokens < 1:
        raise UsageError(f"--tokens must be >= 1, got {args.tokens}")
    # selectors first: a bad name or argument fails before any model is built
    selectors = {name: fvlm.create_selector(name, **(options or fvlm.registry.get_selector_class(name).example_kwargs))
                 for name in names}
    model = tiny_model(args.family)
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    console = _console()
    console.print(f"[bold]fvlm demo[/bold]: tiny random {args.family} backbone, batch of 2 prompts "
                  f"(1 and 2 images, left padding), greedy generate of {args.tokens} tokens")
    with torch.no_grad(), StepClock(model) as clock:
        reference = model.generate(**inputs, max_new_tokens=args.tokens, do_sample=False)
    base_time = clock.total
    table = Table(title="pruned generate vs. unpruned (random weights: agreement, not accuracy)")
    for column in ("selector", "visual tokens", "LLM input", "layer avg", "KV length / layer", "same tokens", "time"):
        table.add_column(column)
    table.add_row("(unpruned)", str(inputs["input_ids"].eq(image_token_id(model)).sum(1).tolist()), "-", "-", "-", "-", f"{base_time * 1e3:.0f} ms")
    questions = ["What is in the picture?", "What is on the left?"]  # for instruction-conditioned selectors
    for name, selector in selectors.items():
        with fvlm.prune(model, selector, instructions=questions) as session, torch.no_grad(), StepClock(model) as clock:
            out = model.generate(**inputs, max_new_tokens=args.tokens, do_sample=False)
        elapsed = clock.total
        trace = session.trace
        same = (out[:, -args.tokens:] == reference[:, -args.tokens:]).float().mean().item()
        table.add_row(name, str(trace.original_visual), str(trace.llm_input_visual),
                      str([round(a, 1) for a in trace.layer_average]), str(trace.kv_length), f"{same:.0%}",
                      f"{elapsed * 1e3:.0f} ms")
    console.print(table)
    return 0


# fvlm profile ---------------------------------------------------------------------------------
def _add_profile(sub) -> None:
    from fvlm.commands.profile import add_parser

    add_parser(sub)


# fvlm run -c recipe.yaml ---------------------------------------------------------------------
def _add_run(sub) -> None:
    from fvlm.commands.run import add_parser

    add_parser(sub)


# fvlm compare OUTPUT_DIR... ------------------------------------------------------------------
def _add_compare(sub) -> None:
    from fvlm.commands.compare import add_parser

    add_parser(sub)


# fvlm visualize -------------------------------------------------------------------------------
def _add_visualize(sub) -> None:
    from fvlm.commands.visualize import add_parser

    add_parser(sub)


COMMANDS: list[Callable] = [_add_list, _add_info, _add_demo, _add_profile, _add_run, _add_compare, _add_visualize]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fvlm", description="Training-free visual-token pruning for VLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fvlm`` console script; returns the exit status ([`ExitCode`][fvlm.commands.exit_codes.ExitCode])."""
    from fvlm.commands.exit_codes import for_error

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FVLMError as exc:
        _console(stderr=True).print(Text(f"error: {exc}", style="red"), soft_wrap=True)
        return int(for_error(exc))


if __name__ == "__main__":
    sys.exit(main())
