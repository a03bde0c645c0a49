"""Loading a backbone: a VLM and its processor, from a folder, a hub id, ``builtin`` or ``tiny:<family>``.

[`BackboneSpec`][fvlm.backbones.BackboneSpec] is the one place that turns a name into ``(model, processor)``: every entry
point (``fvlm run``, the lmms-eval model, ``fvlm visualize``, the benchmarks) loads through it.
A loaded backbone is in eval mode with frozen weights, its tokenizer pads on the left (batched
generation appends on the right) and its generation config has a pad token.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from jsonargparse.typing import path_type

from fvlm.errors import UsageError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Path_any = path_type("")  # a path or a name, no checks: relative paths in a recipe remember its folder


def _locate(path) -> tuple[str, list[str]]:
    """``(folder or name, places looked in)``: a relative folder next to the recipe that named it
    first, then in the working directory; anything else is returned as given (a hub id, ``builtin``)."""
    relative = os.fspath(getattr(path, "relative", path))
    if os.path.isabs(relative):
        return relative, [relative]
    places = [os.path.abspath(relative)]
    if isinstance(path, Path_any):
        places.insert(0, os.fspath(path.absolute))
    places = list(dict.fromkeys(places))
    return next((p for p in places if os.path.isdir(p)), relative), places


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@dataclass
class BackboneSpec:
    """Which VLM to load and how.

    ``path``: a local checkpoint folder, a hub id, ``"builtin"`` (the trained model shipped with
    fvlm, [`fvlm.builtin`][fvlm.builtin]), or ``"tiny:llava"`` / ``"tiny:llava_next"`` / ``"tiny:qwen2_vl"`` /
    ``"tiny:qwen2_5_vl"`` (built-in random tiny model + processor, no download). In a recipe, a
    relative folder is looked up next to the recipe file first, then in the working directory (as
    ``data.path``); a name that is neither is a hub id. [`check`][fvlm.backbones.BackboneSpec.check] reads the checkpoint's config
    before anything is loaded.
    ``dtype``: ``auto`` (the checkpoint's; float32 for tiny models), ``float32``,
    ``float16`` or ``bfloat16``. ``attn_implementation``: ``sdpa``, ``eager``,
    ``flash_attention_2``, ... (``None``: transformers' default). ``processor_path`` defaults to
    ``path``. ``model_kwargs`` / ``processor_kwargs`` go to ``from_pretrained``. ``seed`` and
    ``num_layers`` apply to tiny models only.
    """

    path: Union[Path_any, str]
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    attn_implementation: Optional[str] = "sdpa"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    processor_path: Optional[Union[Path_any, str]] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    num_layers: Optional[int] = None

    def __post_init__(self):
        self.path, self._looked_in = _locate(self.path)
        if self.processor_path is not None:
            self.processor_path = _locate(self.processor_path)[0]

    @property
    def tiny_family(self) -> str | None:
        """The family of a ``tiny:<family>`` path (checked), else None."""
        from fvlm.tiny_backbones import parse_tiny

        return parse_tiny(self.path)

    def check(self):
        """Read the checkpoint's config and check that fvlm can prune it, before loading any weights.

        Raises [`UsageError`][fvlm.errors.UsageError] for a folder that does not exist (naming where it
        was looked for) or a hub id that can be read neither from the local cache nor the hub, and
        [`UnsupportedModelError`][fvlm.errors.UnsupportedModelError] for a model family without a backbone adapter.
        Returns the config (``None`` for ``builtin`` and ``tiny:`` backbones).
        """
        from fvlm.adapters import adapter_class_for_config

        if self.path == "builtin" or self.tiny_family is not None:
            return None
        config = self._read_config()
        adapter_class_for_config(config)
        return config

    def _read_config(self):
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.utils import HFValidationError, validate_repo_id
        from transformers import AutoConfig

        kwargs = dict(revision=self.revision, trust_remote_code=self.trust_remote_code)
        missing = f"no such checkpoint folder: {self.path} (looked in {', '.join(self._looked_in)})"
        if os.path.isdir(self.path):
            try:
                return AutoConfig.from_pretrained(self.path, **kwargs)
            except (OSError, ValueError) as exc:
                raise UsageError(f"checkpoint folder {self.path}: cannot read its config: {_first_line(exc)}") from None
        try:
            validate_repo_id(self.path)
        except HFValidationError:
            raise UsageError(missing) from None
        cached = isinstance(try_to_load_from_cache(self.path, "config.json", revision=self.revision), str)
        if not cached and _offline():
            raise UsageError(f"{missing}; nor is {self.path!r} a hub model in the local cache (HF_HUB_OFFLINE is set)")
        try:
            return AutoConfig.from_pretrained(self.path, local_files_only=cached, **kwargs)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{missing}; as a hub id: {_first_line(exc)}") from None

    def load(self):
        """``(model, processor)``; the model is in eval mode with gradients off for its weights."""
        self.check()
        dtype = DTYPES.get(self.dtype)
        attn = self.attn_implementation or "sdpa"
        family = self.tiny_family
        if self.path == "builtin":
            from fvlm import builtin

            model, processor = builtin.load(dtype=dtype or torch.float32, attn_implementation=attn)
        elif family is not None:
            from fvlm.tiny_backbones import tiny_backbone

            kwargs = {} if self.num_layers is None else {"num_layers": self.num_layers}
            model, processor = tiny_backbone(family, attn_implementation=attn, dtype=dtype or torch.float32,
                                             seed=self.seed, **kwargs)
        else:
            from transformers import AutoModelForImageTextToText

            kwargs = dict(self.model_kwargs)
            if self.attn_implementation is not None:
                kwargs["attn_implementation"] = self.attn_implementation
            model = AutoModelForImageTextToText.from_pretrained(
                self.path, dtype=dtype or "auto", revision=self.revision,
                trust_remote_code=self.trust_remote_code, **kwargs)
            processor = self._load_processor()
        prepare(model, processor)
        return model, processor

    def _load_processor(self):
        from transformers import AutoProcessor

        path = self.processor_path or self.path
        kwargs = dict(revision=self.revision, trust_remote_code=self.trust_remote_code, **self.processor_kwargs)
        try:
            return AutoProcessor.from_pretrained(path, **kwargs)
        except (ImportError, OSError):  # e.g. Qwen-VL's video processor without torchvision
            from fvlm.processors import load_processor_without_video

            processor = load_processor_without_video(path, **kwargs)
            if processor is None:
                raise
            return processor


def prepare(model, processor) -> None:
    """Eval mode, frozen weights, left padding, a pad token for ``generate``: what answering assumes."""
    model.eval().requires_grad_(False)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
