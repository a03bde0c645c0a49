"""One command-line convention for every ``fvlm`` command.

* An option may be spelled with dashes or underscores: ``--list-models`` = ``--list_models``,
  ``--retry-errors`` = ``--retry_errors``, ``--trainer.enable-progress-bar`` =
  ``--trainer.enable_progress_bar``.
* A boolean option may be given bare: ``--overwrite`` = ``--overwrite true``
  (``--overwrite false`` still works).
"""
from __future__ import annotations

import argparse
from typing import Collection, Iterable, Optional

TRUE = "true"


def _spellings(key: str) -> tuple[str, str]:
    """``key`` with every dash, then every underscore, of its name part (after ``--``)."""
    return "--" + key[2:].replace("_", "-"), "--" + key[2:].replace("-", "_")


def respell(args: Iterable[str], known: Collection[str], default: Optional[str] = None) -> list[str]:
    """``args`` with every ``--option`` (or ``--option=value``) spelled as in ``known``.

    An option that ``known`` lacks in every spelling is left alone, or with ``default="_"`` /
    ``"-"`` takes that separator (keys a parser resolves without declaring them, e.g. a
    selector's nested arguments). Nothing after a bare ``--`` changes.
    """
    out: list[str] = []
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg.partition("=")
            if key not in known:
                dashed, underscored = _spellings(key)
                key = next((k for k in (dashed, underscored) if k in known),
                           {"-": dashed, "_": underscored}.get(default or "", key))
            arg = key + eq + value
        out.append(arg)
    return out


def bare_booleans(args: Iterable[str], flags: Collection[str]) -> list[str]:
    """``args`` with ``true`` after each boolean option in ``flags`` given without a value."""
    args = list(args)
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in flags and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(TRUE)
    return out


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` parser that accepts the dash and the underscore spelling of its options.

    Subparsers made with ``add_subparsers`` are of this class too, so every subcommand
    respells its own options.
    """

    def parse_known_args(self, args=None, namespace=None):
        import sys

        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(respell(args, self._option_string_actions), namespace)
