"""Exceptions raised by fvlm. Every one derives from [`FVLMError`][fvlm.errors.FVLMError]."""
from __future__ import annotations


class FVLMError(Exception):
    """Base class of all fvlm errors."""


class UsageError(FVLMError):
    """Bad input to a command (an argument, a recipe, its data): reported before any work starts."""


class SelectorArgumentError(FVLMError, ValueError, TypeError):
    """A selector argument outside its allowed values; the message names the parameter and the range.

    Raised by the selector's constructor, so a recipe fails when it is parsed. ``parameter`` names
    the argument where the check knows it."""

    parameter: str | None = None


class UnknownNameError(FVLMError, KeyError):
    """A registry name that no installed distribution provides."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class UnknownSelectorError(UnknownNameError):
    """No selector is registered under this name."""


class UnsupportedModelError(FVLMError, ValueError):
    """The model family has no backbone adapter, or the model lacks what an adapter needs."""


class UnknownAdapterError(UnknownNameError, UnsupportedModelError):
    """No backbone adapter is registered under this name (model type)."""


class PluginLoadError(FVLMError, ImportError):
    """An entry point could not be imported, or resolved to an object of the wrong kind.

    Attributes set by the registry: ``entry_point`` (the registered name), ``distribution`` and
    ``reason`` (the original error, one line); the original exception is ``__cause__``.
    """

    entry_point: str = ""
    distribution: str = ""
    reason: str = ""


class DuplicateNameError(FVLMError):
    """Two distributions register the same name in one entry-point group."""


class InvalidParameterError(FVLMError, TypeError):
    """A selector was created with a keyword its ``__init__`` does not accept (or lacks a required one)."""


class BudgetError(FVLMError, ValueError):
    """A token budget that cannot be honoured (negative, larger than available, inconsistent stages)."""


class GradientUnavailableError(FVLMError, RuntimeError):
    """A gradient-based selector ran where autograd is disabled (e.g. under ``torch.inference_mode``)."""


class SelectionError(FVLMError, ValueError):
    """A selector returned indices that break the contract (shape, count, range, duplicates)."""


class AuxiliaryModelError(FVLMError, RuntimeError):
    """A selector's auxiliary model (e.g. CDPruner's CLIP text tower) cannot be loaded or does not fit the backbone."""
