"""Adapter for InternVL (InternVL3 and later): an image is one or more tiles of ``image_seq_length``
tokens each (a pixel-shuffled square grid), back to back between ``<img>`` and ``</img>``."""
from __future__ import annotations

import torch

from fvlm.adapters import tiny
from fvlm.adapters.base import BackboneAdapter, fixed_size_grids

INTERNVL_TILE, INTERNVL_PATCH = 32, 4  # tiny tiles: 8 x 8 patches, pixel-shuffled to 4 x 4 tokens
INTERNVL_TILES = [1, 3, 1, 2]  # tiles per image, cycled per image


class InternVLAdapter(BackboneAdapter):
    """InternVL: one [`ImageGrid`][fvlm.types.ImageGrid] per tile (``side x side`` tokens in raster order; a multi-tile
    image lists its crops, then its thumbnail, as the processor tiles it)."""

    family = "internvl"
    model_types = ("internvl",)
    about = dict(name="InternVL3", classes={"internvl": "InternVLForConditionalGeneration"},
                 checkpoints={"internvl": "OpenGVLab/InternVL3-8B-hf"},
                 vision="several tiles per image: vision-tower probes (VisionZip, PIO-FVLM w/ VE) do not apply")

    def image_grids(self, input_ids, top_kwargs, observed):
        return fixed_size_grids(self.visual_mask(input_ids), int(self.model.config.image_seq_length))


class TinyInternVL(tiny.TinySpec):
    """Tiles of 16 tokens (8 x 8 patches of 4 px, pixel shuffle 0.5); 1, 3, 1, 2 tiles per image."""

    model_type, model_class = "internvl", "InternVLForConditionalGeneration"

    def config(self, num_layers=tiny.NUM_LAYERS):
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

        vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=INTERNVL_TILE, patch_size=INTERNVL_PATCH, initializer_range=tiny.INIT_STD)
        per_tile = (INTERNVL_TILE // INTERNVL_PATCH // 2) ** 2
        return InternVLConfig(vision_config=vision, text_config=Qwen2Config(**tiny.text_config(num_layers)),
                              image_token_id=tiny.IMAGE_ID, image_seq_length=per_tile, vision_feature_layer=-1,
                              vision_feature_select_strategy="default")

    def image(self, index, gen, images_in_prompt):
        tiles = INTERNVL_TILES[index % len(INTERNVL_TILES)]
        side = INTERNVL_TILE // INTERNVL_PATCH // 2
        tokens = [tiny.VISION_START_ID, *[tiny.IMAGE_ID] * (side * side * tiles), tiny.VISION_END_ID]
        pixels = torch.randn(tiles, 3, INTERNVL_TILE, INTERNVL_TILE, generator=gen)
        return tiny.TinyImage(tokens, {"pixel_values": pixels}, [(side * side, side, side)] * tiles)

    def collate(self, prompts, dtype):
        return {"pixel_values": torch.cat([i.inputs["pixel_values"] for p in prompts for i in p]).to(dtype)}


InternVLAdapter.tiny = {"internvl": TinyInternVL()}
