"""Backbone adapters, discovered through the ``fvlm.adapters`` entry-point group."""
from __future__ import annotations

from typing import Any

from torch import nn

from fvlm.adapters.base import BackboneAdapter, ImageGrid, ModelInfo, unsupported_message
from fvlm.errors import UnsupportedModelError


def adapter_for(model: nn.Module) -> BackboneAdapter:
    """The registered adapter that recognises ``model`` (a ``*ForConditionalGeneration``)."""
    from fvlm.registry import get_adapter_class, list_adapters

    for name in list_adapters():
        cls = get_adapter_class(name)
        if cls.matches(model):
            return cls(model)
    problems = _problems(model)
    if problems:
        raise UnsupportedModelError(unsupported_message(model, problems) + "; no fvlm backbone adapter handles it")
    raise _no_adapter(type(model).__name__, getattr(model, "config", None))


def adapter_class_for_config(config: Any) -> type[BackboneAdapter]:
    """The registered adapter class for a model of ``config`` (a transformers config), before the
    model is loaded: a checkpoint fvlm cannot prune fails before its weights are read."""
    from fvlm.registry import get_adapter_class, list_adapters

    from fvlm.adapters import layer_math

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    problems = layer_math.architecture_problems(None, text)
    for name in list_adapters():
        cls = get_adapter_class(name)
        if cls.matches_config(config):
            if problems:
                raise UnsupportedModelError(f"fvlm cannot prune {cls.family} checkpoints like this one "
                                            f"(model_type={config.model_type!r}): {'; '.join(problems)}")
            return cls
    error = _no_adapter(type(config).__name__, config)
    if problems:
        error = UnsupportedModelError(f"{error} It could not be pruned anyway: {'; '.join(problems)}")
    raise error


def _problems(model: nn.Module) -> list[str]:
    """Why a model no adapter handles could not be pruned anyway, read through the common layout
    (``model.model.language_model.layers``); empty when that layout is not there."""
    from fvlm.adapters import layer_math

    try:
        probe = BackboneAdapter(model)
        return layer_math.architecture_problems(probe.layers, probe.text_config)
    except (AttributeError, TypeError):
        return []


def _no_adapter(what: str, config: Any) -> UnsupportedModelError:
    from fvlm.registry import list_adapters

    return UnsupportedModelError(
        f"fvlm has no backbone adapter for {what} (model_type={getattr(config, 'model_type', None)!r}); "
        f"supported families: {', '.join(list_adapters())}. See docs on adding a backbone family."
    )


__all__ = ["BackboneAdapter", "ImageGrid", "ModelInfo", "adapter_class_for_config", "adapter_for"]
