"""The ``fvlm`` command line: ``fvlm list``, ``fvlm info NAME``, ``fvlm demo``.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func``; append it to ``COMMANDS`` to add a command (run, profile, visualize, ...).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fvlm import registry
from fvlm.errors import FVLMError, PluginLoadError


def _console(stderr: bool = False) -> Console:
    """The console every command prints through (width follows ``COLUMNS`` when not a terminal)."""
    return Console(stderr=stderr, highlight=False)


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
    reg = _registry(args)
    conflicts = reg.conflicts()
    table = Table(title=f"fvlm {reg.kind}s (entry-point group {reg.group})")
    for column in ("name", "class", "needs", "distribution", "status"):
        table.add_column(column, overflow="fold")
    for name in reg.names(args.pattern):
        regs = reg.registrations(name)
        if name in conflicts:
            status = Text.assemble(("CONFLICT", "bold red"), f": {' vs '.join(conflicts[name])}")
            table.add_row(name, "\n".join(r.value for r in regs), "?", "\n".join(conflicts[name]), status)
            continue
        try:
            needs, status = _needs(reg.info(name).needs), Text("ok", style="green")
        except PluginLoadError as exc:
            needs, status = "?", Text.assemble(("BROKEN", "bold red"), f": {exc.reason}")
        table.add_row(name, regs[0].value, needs, regs[0].where, status)
    _console().print(table)
    return 0


# fvlm info NAME -------------------------------------------------------------------------------
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a selector's (or adapter's) class, needs and parameters")
    p.add_argument("name")
    p.add_argument("--adapters", action="store_true", help="look NAME up among the backbone adapters")
    p.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    info = _registry(args).info(args.name)
    head = Table.grid(padding=(0, 2))
    head.add_row("class", f"{info.cls.__module__}.{info.cls.__qualname__}")
    head.add_row("needs", _needs(info.needs))
    head.add_row("distribution", f"{info.distribution} {info.version}")
    params = Table(title="parameters", title_justify="left")
    for column in ("name", "type", "default"):
        params.add_column(column)
    for pname, (ann, default) in info.parameters.items():
        params.add_row(pname, ann or "-", "(required)" if default is registry.REQUIRED else repr(default))
    console = _console()
    console.print(Panel(head, title=info.name, title_align="left"))
    for paragraph in filter(None, info.doc.split("\n\n")):  # reflow docstring paragraphs to the console width
        console.print(" ".join(paragraph.split()), markup=False)
    console.print(params)
    return 0


# fvlm demo ------------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="prune a built-in tiny model and print the trace (no download)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    # PLACEHOLDER (lead): run a pruned generate on fvlm.testing's tiny model and print the trace.
    _console().print("fvlm demo: not yet")
    return 2


COMMANDS: list[Callable] = [_add_list, _add_info, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvlm", description="Training-free visual-token pruning for VLMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fvlm`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FVLMError as exc:
        _console(stderr=True).print(Text(f"error: {exc}", style="red"), soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
