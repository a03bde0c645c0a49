"""Auxiliary models: what a selector loads next to the backbone (e.g. CDPruner's CLIP text tower).

A selector declares them in [`auxiliary_models`][fvlm.selectors.base.TokenSelector.auxiliary_models] as
[`AuxiliarySpec`][fvlm.auxiliary.AuxiliarySpec] records: a name, a *source* (a hub id, a local folder, or a ``"tiny:..."``
name the loader builds without the hub) and a loader. The source is an ordinary selector argument,
so it is a recipe field like any other. A [`PruningSession`][fvlm.session.PruningSession] loads each model when it is
created, so a bad path fails before any generation; the model is loaded once per backbone instance
(later sessions on the same backbone reuse it), moved to the backbone's device, in float32 or the
backbone's dtype (``dtype``), in eval mode with gradients off. Selectors read it with
[`auxiliary`][fvlm.context.SelectionContext.auxiliary].
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fvlm.errors import AuxiliaryModelError

DTYPES = ("float32", "model")
_LOADED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class AuxiliarySpec:
    """One auxiliary model of a selector.

    ``loader(source, backbone)`` returns an ``nn.Module`` (on the CPU is fine); the backbone is
    passed so a loader can check that the two fit (or size a ``"tiny:..."`` model to it).
    ``dtype``: ``"float32"`` or ``"model"`` (the backbone's dtype).
    """

    name: str
    source: str
    loader: Callable[[str, nn.Module], nn.Module]
    dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"auxiliary model {self.name!r}: source must be a hub id or a folder, got {self.source!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"auxiliary model {self.name!r}: dtype must be one of {DTYPES}, got {self.dtype!r}")


def load_auxiliary(spec: AuxiliarySpec, backbone: nn.Module) -> nn.Module:
    """``spec``'s model for ``backbone``: loaded on first use, then cached per backbone instance."""
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = torch.float32 if spec.dtype == "float32" else getattr(backbone, "dtype", torch.float32)
    cache = _LOADED.setdefault(backbone, {})
    key = (spec.loader, spec.source, dtype)
    module = cache.get(key)
    if module is None:
        try:
            module = spec.loader(spec.source, backbone)
        except AuxiliaryModelError:
            raise
        except Exception as exc:
            raise AuxiliaryModelError(
                f"cannot load auxiliary model {spec.name!r} from {spec.source!r}: {type(exc).__name__}: {exc} "
                "(a hub id, a local folder, or a 'tiny:' name; offline runs need the files in the local cache)"
            ) from exc
        module.eval().requires_grad_(False)
        cache[key] = module
    return module.to(device=device, dtype=dtype)
