"""Backbone adapters, discovered through the ``fvlm.adapters`` entry-point group."""
from __future__ import annotations

from torch import nn

from fvlm.adapters.base import BackboneAdapter, ImageGrid, ModelInfo
from fvlm.errors import UnsupportedModelError


def adapter_for(model: nn.Module) -> BackboneAdapter:
    """The registered adapter that recognises ``model`` (a ``*ForConditionalGeneration``)."""
    from fvlm.registry import get_adapter_class, list_adapters

    names = list_adapters()
    for name in names:
        cls = get_adapter_class(name)
        if cls.matches(model):
            return cls(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise UnsupportedModelError(
        f"fvlm has no backbone adapter for {type(model).__name__} (model_type={model_type!r}); "
        f"supported families: {', '.join(names)}. See docs on adding a backbone family."
    )


__all__ = ["BackboneAdapter", "ImageGrid", "ModelInfo", "adapter_for"]
