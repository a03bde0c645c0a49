"""fvlm: training-free visual-token reduction for vision-language models."""
from __future__ import annotations

from fvlm.errors import (
    BudgetError,
    FVLMError,
    GradientUnavailableError,
    PluginLoadError,
    SelectionError,
    SelectorArgumentError,
    UnknownSelectorError,
    UnsupportedModelError,
    UsageError,
)
from fvlm.registry import create_selector, list_selectors, selector_info
from fvlm.selectors.base import Need, ScoreSelector, Selection, Stage, TokenSelector
from fvlm.session import PruningSession, prune
from fvlm.trace import Trace

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "FVLMError",
    "GradientUnavailableError",
    "Need",
    "PluginLoadError",
    "PruningSession",
    "ScoreSelector",
    "Selection",
    "SelectionError",
    "SelectorArgumentError",
    "Stage",
    "TokenSelector",
    "Trace",
    "UnknownSelectorError",
    "UnsupportedModelError",
    "UsageError",
    "create_selector",
    "list_selectors",
    "prune",
    "selector_info",
]
