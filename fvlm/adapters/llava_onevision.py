"""Adapter for LLaVA-OneVision: a SigLIP tower (no CLS token) and any-res tiles with newline tokens."""
from __future__ import annotations

import torch

from fvlm.adapters import tiny
from fvlm.adapters.llava import (
    CLIP_IMAGE,
    CLIP_PATCH,
    LLAVA_NEXT_PINPOINTS,
    LLAVA_NEXT_SIZES,
    LlavaNextAdapter,
    TinyLlavaNext,
    clip_processing,
)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: per image its base view (a ``side x side`` grid) first, then, for the only image
    of a prompt, the unpadded high-res grid with one newline token per row (``anyres_max_9`` may shrink
    it); an image among several is its base view plus one newline token. The grids are LLaVA-NeXT's."""

    family = "llava_onevision"
    model_types = ("llava_onevision",)
    vision_has_cls = False
    about = dict(name="LLaVA-OneVision", classes={"llava_onevision": "LlavaOnevisionForConditionalGeneration"},
                 checkpoints={"llava_onevision": "llava-hf/llava-onevision-qwen2-7b-ov-hf"},
                 vision="SigLIP has no CLS token: CLS-based vision selectors (VisionZip, PIO-FVLM w/ VE) do not apply")


class TinyLlavaOnevision(TinyLlavaNext):
    """A 32 px SigLIP tile of 4 x 4 patches; the only image of a prompt is any-res over
    ``LLAVA_NEXT_PINPOINTS`` (sizes cycle through ``LLAVA_NEXT_SIZES``), others are 16 + 1 tokens."""

    model_type, model_class = "llava_onevision", "LlavaOnevisionForConditionalGeneration"

    def config(self, num_layers=tiny.NUM_LAYERS):
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=CLIP_IMAGE, patch_size=CLIP_PATCH)
        return LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**tiny.text_config(num_layers)),
                                    image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, image_token_index=tiny.IMAGE_ID,
                                    video_token_index=tiny.VIDEO_ID, vision_feature_layer=-1,
                                    vision_feature_select_strategy="full", initializer_range=tiny.INIT_STD)

    def image(self, index, gen, images_in_prompt):
        if images_in_prompt == 1:
            return super().image(index, gen, images_in_prompt)
        size = LLAVA_NEXT_SIZES[index % len(LLAVA_NEXT_SIZES)]
        side = CLIP_IMAGE // CLIP_PATCH
        count = side * side + 1
        pixels = torch.randn(1, 3, CLIP_IMAGE, CLIP_IMAGE, generator=gen)
        return tiny.TinyImage([tiny.IMAGE_ID] * count, {"pixel_values": pixels, "image_sizes": size},
                              [(count, side, side)])

    def collate(self, prompts, dtype):
        return {**super().collate(prompts, dtype),
                "batch_num_images": torch.tensor([len(p) for p in prompts], dtype=torch.long)}

    def processor(self, tokenizer):
        from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

        from fvlm.processors import image_only_class

        image = LlavaOnevisionImageProcessorPil(**clip_processing(), image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
        return image_only_class(LlavaOnevisionProcessor)(
            image_processor=image, tokenizer=tokenizer, num_image_tokens=(CLIP_IMAGE // CLIP_PATCH) ** 2,
            vision_feature_select_strategy="full", chat_template=tiny.LLAVA_TEMPLATE)


LlavaOnevisionAdapter.tiny = {"llava_onevision": TinyLlavaOnevision()}
