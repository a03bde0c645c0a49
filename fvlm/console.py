"""The console every command prints through."""
from __future__ import annotations

from rich.console import Console


def console(stderr: bool = False) -> Console:
    """A rich console (width follows ``COLUMNS`` when not a terminal), without syntax highlighting."""
    return Console(stderr=stderr, highlight=False)
