"""The short ``fvlm run --help``: what a prediction run needs, one line per option.

The recipe parser accepts every ``lightning.Trainer`` argument, most of them training-only; this
help lists the run options, every ``model`` and ``data`` key (help from their docstrings) and the
Trainer keys a prediction run uses. ``fvlm run --help-all`` prints the parser's full help.
"""
from __future__ import annotations

import argparse
import shutil
import textwrap
import typing
from typing import Any, Iterator, Optional

from fvlm.commands.docstrings import first_sentence

USAGE = "usage: fvlm run -c RECIPE.yaml [-c MORE.yaml ...] [--KEY VALUE ...]"
DESCRIPTION = ("Run a recipe over a data set (predict or test) with Lightning: answers, scores, fidelity to the "
               "unpruned model and efficiency, in <output>/predictions.jsonl and summary.json.")
# The Trainer arguments that matter when predicting, in a prediction run's words.
TRAINER_KEYS = {
    "accelerator": "cpu, gpu, ... (default: auto)",
    "devices": "devices per node, e.g. 8 (default: auto)",
    "strategy": "ddp spreads the samples over the devices (default: auto)",
    "num_nodes": "machines in a multi-node run (default: 1)",
    "precision": "Lightning's; the model's dtype: model.backbone.dtype",
    "callbacks": "extra callbacks (fvlm adds writer, timer, SIGTERM)",
    "logger": "loggers for --mode test (default: false)",
    "enable_progress_bar": "the progress bar (default: true)",
    "limit_predict_batches": "predict batches per device (int) or a fraction",
    "limit_test_batches": "test batches per device (int) or a fraction",
    "inference_mode": "(default: true; false for gradient selectors)",
}
CONFIG_HELP = "recipe YAML file(s); later ones override earlier ones"
GROUP_NOTES = {"trainer": " (lightning.Trainer: the keys a prediction run uses)"}
EXTRA_FLAGS = (
    ("--print-config", "print the resolved, validated recipe and exit"),
    ("--help-all", "every accepted key, with the remaining lightning.Trainer arguments"),
)
FOOTER = (
    "Every key can also be set in the recipe YAML (sections model, data, trainer). Options take dashes or "
    "underscores (--retry-errors = --retry_errors); a boolean may be bare (--overwrite = --overwrite true). "
    "A selector's arguments: fvlm info NAME. Other lightning.Trainer arguments are accepted too "
    "(training-only ones do nothing here): fvlm run --help-all."
)


def _metavar(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is bool or args == [bool]:
        return "[BOOL]"
    if typing.get_origin(hint) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(hint))) + "}"
    if any(getattr(a, "__name__", "").startswith("Path") for a in args):
        return "PATH"
    if len(args) == 1:
        return _metavar(args[0])
    if typing.get_origin(hint) is dict:
        return "YAML"
    return {int: "N", float: "X", str: "TEXT"}.get(hint, "VALUE")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "(required)"
    value = action.default
    if value is None or value == argparse.SUPPRESS or value in ({}, [], ""):
        return ""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"(default: {text if len(text) <= 24 else text[:21] + '...'})"


def rows(parser) -> Iterator[tuple[str, str, str]]:
    """``(group, option, help)`` for the options the short help lists; ``group`` is ``run`` or a
    recipe section such as ``model.backbone``, whose options are its keys."""
    for action in parser._actions:
        dest = action.dest
        if (not action.option_strings or action.help == argparse.SUPPRESS or dest in ("help", "config")
                or dest.endswith(".help") or type(action).__name__ == "_ActionConfigLoad"):
            continue  # help, per-class help, "load this section from a file"; -c is listed below
        group, _, key = dest.rpartition(".")
        hint = getattr(action, "_typehint", None)
        if group == "trainer":
            if key in TRAINER_KEYS:
                yield group, f"--{dest} {_metavar(hint)}", TRAINER_KEYS[key]
            continue
        text = " ".join(filter(None, (first_sentence(action.help or ""), _default(action))))
        if not group:
            yield "run", f"--{key.replace('_', '-')} {_metavar(hint)}", text
        else:
            yield group, f"--{dest} {_metavar(hint)}", text
    for option, text in EXTRA_FLAGS:
        yield "run", option, text


def format_help(parser, width: Optional[int] = None) -> str:
    """The short help text (``width``: the terminal's, at most 120 columns)."""
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 120)
    column = 42
    lines = [USAGE, "", *textwrap.wrap(DESCRIPTION, width)]
    groups: dict[str, list[tuple[str, str]]] = {"run": [("-c, --config FILE", CONFIG_HELP)]}
    for group, option, text in rows(parser):
        groups.setdefault(group, []).append((option, text))
    for group, entries in groups.items():
        title = "run options:" if group == "run" else f"{group}{GROUP_NOTES.get(group, '')}:"
        lines += ["", title]
        for option, text in entries:
            wrapped = textwrap.wrap(text, max(width - column, 30)) or [""]
            if len(option) + 3 <= column:
                lines.append(f"  {option:<{column - 2}}{wrapped[0]}".rstrip())
            else:
                lines += [f"  {option}", (" " * column + wrapped[0]).rstrip()]
            lines += [" " * column + more for more in wrapped[1:]]
    lines += ["", *textwrap.wrap(FOOTER, width)]
    return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1])) + "\n"
