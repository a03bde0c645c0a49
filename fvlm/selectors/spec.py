"""The one way to name a selector outside Python: ``{name: ..., args: {...}}`` ([`SelectorSpec`][fvlm.selectors.spec.SelectorSpec]).

Recipes (``model.selector``), the lmms-eval model (``selector=`` / ``selector_args=``) and run
summaries use it; ``name`` is a registered name (``fvlm list``) or a dotted ``module.Class`` path.
[`selector_arguments`][fvlm.selectors.spec.selector_arguments] reads an instance's full arguments back (what a summary records).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

from fvlm.errors import UnknownSelectorError
from fvlm.selectors.base import TokenSelector


@dataclass
class SelectorSpec:
    """A selector by registered name (``fvlm list``) or dotted class path, with its arguments.

    In a recipe: ``selector: {name: random, args: {keep: 0.25, seed: 0}}``.
    """

    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def selector_class(self) -> type:
        return resolve_selector_class(self.name)

    def build(self) -> TokenSelector:
        from fvlm.registry import SELECTORS

        cls = self.selector_class()
        if self.name in SELECTORS.names():
            return SELECTORS.create(self.name, **self.args)
        return cls(**self.args)


def resolve_selector_class(name: str) -> type:
    """The selector class of a registered short name or a dotted ``module.Class`` path."""
    from fvlm.registry import SELECTORS

    if name in SELECTORS.names() or "." not in name:
        return SELECTORS.get_class(name)  # unknown names raise UnknownSelectorError with suggestions
    module, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownSelectorError(f"cannot import selector class {name!r}: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, TokenSelector)):
        raise UnknownSelectorError(f"{name!r} is not a TokenSelector subclass")
    return obj


def selector_label(selector: TokenSelector | None) -> str:
    """The registered name of a selector instance's class (else its class name); "none" for None."""
    if selector is None:
        return "none"
    from fvlm.registry import SELECTORS

    for name in SELECTORS.names():
        try:
            if SELECTORS.get_class(name) is type(selector):
                return name
        except Exception:  # a broken or conflicting plugin cannot be this selector
            continue
    return type(selector).__name__


def _plain(value):
    if isinstance(value, TokenSelector):
        return {"name": selector_label(value), "args": selector_arguments(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def selector_arguments(selector: TokenSelector | None) -> dict[str, Any]:
    """Every constructor argument of ``selector`` with the value it holds (its default where the
    instance keeps no attribute of that name), as plain JSON values; ``{}`` for None."""
    if selector is None:
        return {}
    out = {}
    for name, param in inspect.signature(type(selector).__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(selector, name):
            out[name] = _plain(getattr(selector, name))
        elif param.default is not param.empty:
            out[name] = _plain(param.default)
    return out
