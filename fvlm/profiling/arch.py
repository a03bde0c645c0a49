"""Real-scale architectures without weights: shipped configs, meta-device models, FLOP specs.

``fvlm/profiling/configs/<name>.json`` holds ``{"name", "description", "profile", "config"}``:
``config`` is a transformers config dict (``model_type`` + the usual fields), ``profile`` the
defaults a profile uses (``visual_tokens`` entering the LLM per sample, ``text_tokens``, ``images``
for the vision tower, ``kv_dtype``). A plain transformers ``config.json`` (with ``model_type`` at the
top) also loads; then the profile defaults are derived from the config where possible.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvlm.adapters import adapter_for
from fvlm.errors import FVLMError, UsageError
from fvlm.metrics.flops import TextArch, VisionArch
from fvlm.types import ModelInfo

CONFIG_DIR = Path(__file__).parent / "configs"


def shipped_models() -> list[str]:
    """Names of the architectures shipped with fvlm (``fvlm profile --model NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


@dataclass
class Architecture:
    """One VLM architecture: its transformers config and the specs the FLOP counts need."""

    name: str
    description: str
    hf_config: Any  # transformers PreTrainedConfig
    text: TextArch
    vision: VisionArch | None
    visual_tokens: int
    text_tokens: int
    images: list[dict] = field(default_factory=list)
    kv_dtype: str = "float16"
    notes: str = ""
    _info: ModelInfo | None = field(default=None, repr=False, compare=False)

    @property
    def model_type(self) -> str:
        return self.hf_config.model_type

    def info(self) -> ModelInfo:
        """The [`fvlm.adapters.base.ModelInfo`][fvlm.types.ModelInfo] selectors see, from the registered adapter."""
        return model_info(self)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "model_type": self.model_type,
            "text": self.text.to_dict(),
            "vision": self.vision.to_dict() if self.vision else None,
            "visual_tokens": self.visual_tokens,
            "text_tokens": self.text_tokens,
            "images": self.images,
            "kv_dtype": self.kv_dtype,
        }


def _read(name_or_path: str) -> tuple[str, dict]:
    path = Path(name_or_path)
    if not path.suffix == ".json" or not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise UsageError(
            f"unknown model {name_or_path!r}: not a shipped architecture ({', '.join(shipped_models())}) "
            "and not a path to a config .json"
        )
    return path.stem, json.loads(path.read_text())


def hf_config_from_dict(config: dict):
    """A transformers config object from a dict with ``model_type``."""
    from transformers import AutoConfig

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise FVLMError("a config dict needs a 'model_type'")
    return AutoConfig.for_model(model_type, **config)


def load_architecture(name_or_path: str) -> Architecture:
    """A shipped architecture by name (``llava-1.5-7b``, ...) or any config .json file."""
    stem, raw = _read(name_or_path)
    if "config" in raw:
        config, profile = raw["config"], raw.get("profile", {})
        name, description = raw.get("name", stem), raw.get("description", "")
    else:  # a bare transformers config.json
        config, profile, name, description = raw, {}, stem, ""
    hf = hf_config_from_dict(config)
    text = text_arch(hf)
    vision = vision_arch(hf)
    images = profile.get("images") or _default_images(hf)
    visual = profile.get("visual_tokens") or _default_visual_tokens(hf, images)
    return Architecture(
        name=name, description=description, hf_config=hf, text=text, vision=vision,
        visual_tokens=int(visual), text_tokens=int(profile.get("text_tokens", 0)), images=list(images),
        kv_dtype=profile.get("kv_dtype", "float16"), notes=profile.get("notes", ""),
    )


def text_arch(hf_config) -> TextArch:
    """[`TextArch`][fvlm.types.ModelInfo] of a VLM (or plain LM) transformers config (Llama / Qwen / Mistral decoder
    layers: gated MLP)."""
    return ModelInfo.from_config(hf_config, family=hf_config.model_type)


def vision_arch(hf_config) -> VisionArch | None:
    """[`VisionArch`][fvlm.metrics.flops.VisionArch] of a LLaVA / LLaVA-NeXT / LLaVA-OneVision / Qwen2-VL / Qwen2.5-VL / Qwen3-VL
    config (None otherwise)."""
    vc = getattr(hf_config, "vision_config", None)
    if vc is None:
        return None
    model_type = hf_config.model_type
    text_hidden = hf_config.get_text_config().hidden_size
    if model_type in CLIP_TILED:
        d = vc.hidden_size
        return VisionArch(
            kind="clip", num_layers=vc.num_hidden_layers, hidden_size=d, intermediate_size=vc.intermediate_size,
            num_heads=vc.num_attention_heads, patch_size=vc.patch_size, in_channels=vc.num_channels,
            image_size=vc.image_size, has_cls=vc.model_type != "siglip_vision_model",
            keep_cls=hf_config.vision_feature_select_strategy == "full",
            projector=((d, text_hidden), (text_hidden, text_hidden)),
        )
    if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        merge = vc.spatial_merge_size
        mergers = 1
        if model_type == "qwen2_vl":
            d, inter, gated, out = vc.embed_dim, int(vc.embed_dim * vc.mlp_ratio), False, vc.hidden_size
            window, full = 0, ()
        elif model_type == "qwen2_5_vl":
            d, inter, gated, out = vc.hidden_size, vc.intermediate_size, True, vc.out_hidden_size
            window, full = vc.window_size, tuple(vc.fullatt_block_indexes)
        else:  # Qwen3-VL: full attention everywhere, one more merger per DeepStack layer
            d, inter, gated, out = vc.hidden_size, vc.intermediate_size, False, vc.out_hidden_size
            window, full, mergers = 0, (), 1 + len(vc.deepstack_visual_indexes)
        wide = d * merge * merge
        return VisionArch(
            kind="qwen", num_layers=vc.depth, hidden_size=d, intermediate_size=inter, num_heads=vc.num_heads,
            patch_size=vc.patch_size, in_channels=vc.in_channels, gated_mlp=gated,
            temporal_patch_size=vc.temporal_patch_size, spatial_merge_size=merge, window_size=window,
            fullatt_layers=full, projector=((wide, wide), (wide, out)) * mergers,
        )
    return None


CLIP_TILED = ("llava", "llava_next", "llava_onevision")  # towers over fixed-size tiles


def _default_images(hf_config) -> list[dict]:
    if hf_config.model_type in CLIP_TILED:
        return [{"tiles": 1}]
    return []


def _default_visual_tokens(hf_config, images) -> int:
    if hf_config.model_type in CLIP_TILED:
        vc = hf_config.vision_config
        return sum(int(i.get("tiles", 1)) for i in images) * (vc.image_size // vc.patch_size) ** 2
    merge = getattr(getattr(hf_config, "vision_config", None), "spatial_merge_size", 2)
    return sum(t * h * w // merge**2 for t, h, w in (i["grid_thw"] for i in images))


def build_meta_model(arch: Architecture, attn_implementation: str = "sdpa"):
    """The real transformers model of ``arch`` on the meta device (shapes only, no memory, no weights)."""
    import torch
    import transformers

    config = arch.hf_config
    cls = transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    with torch.device("meta"):
        model = cls._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def model_info(arch: Architecture) -> ModelInfo:
    """ModelInfo for ``arch`` exactly as at run time: the registered adapter's ``info()`` on the
    meta-device model (built once per [`Architecture`][fvlm.profiling.arch.Architecture], well under a second for 7B)."""
    if arch._info is None:
        arch._info = adapter_for(build_meta_model(arch)).info()
    return arch._info
