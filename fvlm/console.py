"""What the ``fvlm`` commands print, and what they keep their libraries from printing."""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

from rich.console import Console

# To a file or a pipe a line may be this wide: tables keep their natural width (no column is cut
# to fit 80 characters) and long lines are not wrapped.
UNWRAPPED = 10_000

# Lightning's INFO lines ("GPU available: ...", "TPU available: ...", the litlogger / litmodels
# tips, "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES ...") go through these loggers; warnings still show.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
# ...except the one line per process of a distributed run ("Initializing distributed: GLOBAL_RANK: 1,
# MEMBER: 2/2"), which tells the user that every process started.
KEPT_LOGGERS = ("lightning.fabric.utilities.distributed",)
# Deprecation warnings raised inside libraries about their own use of other libraries.
LIBRARY_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # Lightning's _pytree on torch >= 2.10
)


def console(stderr: bool = False) -> Console:
    """A rich console without syntax highlighting: as wide as the terminal, or unwrapped when the
    output goes to a file or a pipe (``fvlm profile > out.txt`` keeps every column)."""
    stream = sys.stderr if stderr else sys.stdout
    tty = getattr(stream, "isatty", lambda: False)()
    return Console(stderr=stderr, highlight=False, width=None if tty else UNWRAPPED)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block: no Lightning INFO lines, no transformers "Loading weights" progress bar and
    no known library deprecation warnings. Everything is restored afterwards."""
    from transformers.utils import logging as hf_logging

    levels = {name: logging.getLogger(name).level for name in (*LIGHTNING_LOGGERS, *KEPT_LOGGERS)}
    bars = hf_logging.is_progress_bar_enabled()
    try:
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        for name in KEPT_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
        hf_logging.disable_progress_bar()
        with warnings.catch_warnings():
            for category, message in LIBRARY_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
