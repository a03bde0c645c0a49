"""Processors without their video processor.

transformers' Qwen video processors need torchvision, which fvlm does not install, and fvlm only
feeds images: a checkpoint's processor is loaded without its video processor when the full one
cannot be built ([`load_processor_without_video`][fvlm.processors.load_processor_without_video]).
"""
from __future__ import annotations


def image_only_class(base: type) -> type:
    """``base`` (a processor class) without its video processor.

    transformers' Qwen video processors need torchvision, which fvlm does not install, and fvlm
    only feeds images. ``ProcessorMixin`` takes its sub-processors from ``__init__``'s parameter
    names, so a subclass whose ``__init__`` drops ``video_processor`` loads and saves without it.
    The class is cached as the module attribute ``_ImageOnly<base name>`` (picklable).
    """
    name = f"_ImageOnly{base.__name__}"
    cls = globals().get(name)
    if cls is None:
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
        globals()[name] = cls
    return cls


def __getattr__(name: str):  # resolves pickled image-only processor classes
    if name.startswith("_ImageOnly"):
        import transformers

        return image_only_class(getattr(transformers, name[len("_ImageOnly"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_processor_without_video(path: str, **kwargs):
    """A checkpoint's processor loaded without its video processor, or ``None`` if it has none.

    The fallback of [`BackboneSpec`][fvlm.backbones.BackboneSpec] when ``AutoProcessor`` fails to
    build a video processor (Qwen-VL without torchvision).
    """
    import inspect
    import json

    from transformers.models.auto.processing_auto import processor_class_from_name
    from transformers.utils import cached_file

    name = None
    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        resolved = cached_file(path, fname, _raise_exceptions_for_missing_entries=False,
                               revision=kwargs.get("revision"))
        if resolved:
            with open(resolved, encoding="utf-8") as fh:
                name = json.load(fh).get("processor_class")
            if name:
                break
    cls = processor_class_from_name(name.removeprefix("_ImageOnly")) if name else None
    if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
        return None
    return image_only_class(cls).from_pretrained(path, **kwargs)
