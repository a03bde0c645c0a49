"""Name -> class registries backed by entry points (groups ``fvlm.selectors`` and ``fvlm.adapters``).

Built-in selectors and adapters register through the same entry-point groups as third-party
plugins. Discovery reads only package metadata (cached); a plugin module is imported the first
time one of its names is loaded (``get_class`` / ``create`` / ``info`` / ``broken``).

Policy: a plugin that fails to import is reported by name (``broken()``) and never hides the
others; a name claimed by two distributions is listed, but looking it up raises
[`DuplicateNameError`][fvlm.errors.DuplicateNameError] naming both (``fvlm list`` marks it as a conflict).
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.metadata as md
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fvlm.errors import (
    DuplicateNameError,
    InvalidParameterError,
    PluginLoadError,
    UnknownAdapterError,
    UnknownNameError,
    UnknownSelectorError,
)

if TYPE_CHECKING:
    from fvlm.selectors.base import TokenSelector

REQUIRED = inspect.Parameter.empty  # the "default" of a parameter that has none


def close_names(name: str, names: list[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``names`` that ``name`` probably meant: those it begins or is part of
    (``pio`` -> ``pio_fvlm``), then the closest spellings (``fastvv`` -> ``fastv``)."""
    key = name.lower().replace("-", "_")
    parts = [c for c in names if c.lower().startswith(key)] + [c for c in names if key in c.lower()]
    close = parts + difflib.get_close_matches(key, names, n=n, cutoff=0.6)
    return list(dict.fromkeys(close))[:n] if key else []


@dataclass(frozen=True)
class Registration:
    """One entry point as declared in a distribution's metadata (nothing imported)."""

    name: str
    value: str  # "module:attr"
    distribution: str
    version: str
    entry_point: md.EntryPoint

    @property
    def where(self) -> str:
        return f"{self.distribution} {self.version}"


@dataclass(frozen=True)
class PluginInfo:
    """What a registered class declares: its config parameters, needs and origin."""

    name: str
    cls: type
    needs: frozenset  # frozenset[Need]; empty for adapters
    parameters: dict[str, tuple[str, Any]]  # name -> (annotation, default or REQUIRED)
    distribution: str
    version: str
    summary: str  # first line of the class docstring
    doc: str = ""


SelectorInfo = PluginInfo


def _parameters(cls: type) -> dict[str, tuple[str, Any]]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    out = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        ann = p.annotation
        ann = "" if ann is p.empty else ann if isinstance(ann, str) else inspect.formatannotation(ann)
        out[p.name] = (ann, p.default)
    return out


class EntryPointRegistry:
    """Lazy, cached view of one entry-point group.

    ``kind`` names the things in it in messages ("selector"); ``base`` ("module:attr", resolved on
    first load) is the class every entry must subclass; ``unknown_error`` is raised for unknown names.
    """

    def __init__(self, group: str, kind: str, base: str | None = None,
                 unknown_error: type[UnknownNameError] = UnknownNameError):
        self.group, self.kind, self.base, self.unknown_error = group, kind, base, unknown_error
        self._entries: dict[str, list[Registration]] | None = None
        self._loaded: dict[str, type | tuple[str, BaseException]] = {}

    def clear_cache(self) -> None:
        """Forget discovered entry points and loaded classes (tests, freshly installed plugins)."""
        self._entries = None
        self._loaded.clear()
        importlib.invalidate_caches()

    # discovery: metadata only
    def _discover(self) -> dict[str, list[Registration]]:
        if self._entries is None:
            found: dict[str, list[Registration]] = {}
            for ep in md.entry_points(group=self.group):
                dist = getattr(ep, "dist", None)
                reg = Registration(ep.name, ep.value, dist.name if dist else "<unknown>",
                                   dist.version if dist else "?", ep)
                same = found.setdefault(ep.name, [])
                if not any(r.distribution == reg.distribution and r.value == reg.value for r in same):
                    same.append(reg)
            self._entries = found
        return self._entries

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names, optionally filtered by a glob (``"uni*"``). Imports nothing."""
        names = sorted(self._discover())
        return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]

    def registrations(self, name: str) -> list[Registration]:
        """Every distribution's claim on ``name`` (more than one means a conflict). Imports nothing."""
        regs = self._discover().get(name)
        if not regs:
            close = close_names(name, self.names())
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise self.unknown_error(f"unknown {self.kind} {name!r} (entry-point group {self.group!r}).{hint}"
                                     f" Available: {', '.join(self.names()) or '(none)'}")
        return regs

    def conflicts(self) -> dict[str, list[str]]:
        """``{name: ["dist version", ...]}`` for names claimed by several distributions."""
        return {n: [r.where for r in regs] for n, regs in self._discover().items() if len(regs) > 1}

    def _registration(self, name: str) -> Registration:
        regs = self.registrations(name)
        if len(regs) > 1:
            claims = "; ".join(f"{r.where} ({r.value})" for r in regs)
            raise DuplicateNameError(f"{self.kind} name {name!r} is registered by several distributions: "
                                     f"{claims}. Uninstall one of them.")
        return regs[0]

    # loading: imports the plugin module
    def get_class(self, name: str) -> type:
        """The class registered under ``name`` (imports its module on first use)."""
        reg = self._registration(name)
        cached = self._loaded.get(name)
        if cached is None:
            cached = self._loaded[name] = self._load(reg)
        if isinstance(cached, tuple):
            reason, cause = cached
            err = PluginLoadError(f"cannot load {self.kind} {name!r} = {reg.value!r} from distribution "
                                  f"{reg.where}: {reason}")
            err.entry_point, err.distribution, err.reason = name, reg.distribution, reason
            raise err from cause
        return cached

    def _load(self, reg: Registration) -> type | tuple[str, BaseException | None]:
        try:
            obj = reg.entry_point.load()
        except (Exception, SystemExit) as exc:  # a broken plugin (even one calling sys.exit) never breaks the registry
            return f"{type(exc).__name__}: {exc}", exc
        base = self._base()
        if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
            return f"{reg.value} is {obj!r}, not a subclass of {base.__module__}.{base.__qualname__}", None
        if inspect.isabstract(obj):
            missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
            return f"{obj.__qualname__} is abstract (does not implement {missing})", None
        return obj

    def _base(self) -> type | None:
        if self.base is None:
            return None
        module, _, attr = self.base.partition(":")
        return getattr(importlib.import_module(module), attr)

    def broken(self) -> dict[str, str]:
        """``{name: reason}`` for every non-conflicting name whose entry point fails to load."""
        out = {}
        for name in self.names():
            if len(self._discover()[name]) == 1:
                try:
                    self.get_class(name)
                except PluginLoadError as exc:
                    out[name] = str(exc)
        return out

    def info(self, name: str) -> PluginInfo:
        """Class, needs, ``__init__`` parameters and origin of ``name``."""
        cls, reg = self.get_class(name), self._registration(name)
        doc = inspect.cleandoc(cls.__doc__) if cls.__doc__ else ""
        return PluginInfo(name=name, cls=cls, needs=frozenset(getattr(cls, "needs", frozenset())),
                          parameters=_parameters(cls), distribution=reg.distribution, version=reg.version,
                          summary=doc.splitlines()[0] if doc else "", doc=doc)

    def create(self, name: str, **kwargs: Any) -> Any:
        """Instantiate ``name``; ``None`` kwargs are dropped so the class default applies."""
        cls = self.get_class(name)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        params = inspect.signature(cls).parameters
        named = [p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        where = f"{self.kind} {name!r} ({cls.__name__})"
        valid = f"valid parameters: {', '.join(named) or '(none)'}"
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            renamed = getattr(cls, "renamed_parameters", {})
            for key in kwargs:
                if key not in named and key not in renamed:  # the class names a renamed one itself
                    close = difflib.get_close_matches(key, named, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise InvalidParameterError(f"{where} got an unexpected parameter {key!r}{hint}; {valid}")
        missing = [n for n in named if params[n].default is REQUIRED and n not in kwargs]
        if missing:
            raise InvalidParameterError(f"{where} is missing required parameter(s) {', '.join(missing)}; {valid}")
        return cls(**kwargs)


SELECTORS = EntryPointRegistry("fvlm.selectors", "selector", base="fvlm.selectors.base:TokenSelector",
                               unknown_error=UnknownSelectorError)
ADAPTERS = EntryPointRegistry("fvlm.adapters", "adapter", base="fvlm.adapters.base:BackboneAdapter",
                              unknown_error=UnknownAdapterError)


def list_selectors(pattern: str | None = None) -> list[str]:
    """Registered selector names (sorted). Imports no plugin.

    Args:
        pattern: a glob (`"vscan*"`) the names must match; `None` lists all.
    """
    return SELECTORS.names(pattern)


def get_selector_class(name: str) -> type:
    """The ``TokenSelector`` subclass registered under ``name``."""
    return SELECTORS.get_class(name)


def create_selector(name: str, **kwargs: Any) -> TokenSelector:
    """Instantiate a registered selector.

    Args:
        name: a name from [`list_selectors`][fvlm.registry.list_selectors] (`fvlm list`).
        **kwargs: the selector's arguments (`fvlm info NAME` lists them); `None` values are dropped.

    Returns:
        The [`TokenSelector`][fvlm.selectors.base.TokenSelector], ready for [`fvlm.prune`][fvlm.session.prune].
    """
    return SELECTORS.create(name, **kwargs)


def selector_info(name: str) -> SelectorInfo:
    """Parameters, needs and origin of a registered selector (what `fvlm info NAME` prints).

    Args:
        name: a name from [`list_selectors`][fvlm.registry.list_selectors].

    Returns:
        Its `SelectorInfo`: class, summary and docstring, parameters
            with annotations and defaults, needs, distribution.
    """
    return SELECTORS.info(name)


def list_adapters(pattern: str | None = None) -> list[str]:
    """Registered adapter names (transformers ``model_type`` values), sorted."""
    return ADAPTERS.names(pattern)


def get_adapter_class(name: str) -> type:
    """The ``BackboneAdapter`` subclass registered for the model type ``name``."""
    return ADAPTERS.get_class(name)


def clear_cache() -> None:
    """Forget everything discovered or loaded by both registries."""
    for registry in (SELECTORS, ADAPTERS):
        registry.clear_cache()
