"""Adapter for Idefics3 and SmolVLM: an image is split into tiles plus a global view, each a
separately delimited run of ``image_seq_len`` tokens (a pixel-shuffled square grid); the language
model is ``text_model``."""
from __future__ import annotations

import torch

from fvlm.adapters import tiny
from fvlm.adapters.base import BackboneAdapter
from fvlm.adapters.llava import stack_tiles

IDEFICS_TILE, IDEFICS_PATCH, IDEFICS_SCALE = 32, 4, 2  # tiny tiles: 8 x 8 patches, shuffled to 4 x 4 tokens
IDEFICS_SPLITS = [(0, 0), (1, 2), (0, 0), (2, 1)]  # (rows, cols) of tiles per image (0: global view only)


class Idefics3Adapter(BackboneAdapter):
    """Idefics3 / SmolVLM: one [`ImageGrid`][fvlm.types.ImageGrid] per tile and per global view (square grids: the base
    adapter's runs of visual tokens)."""

    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    about = dict(name="Idefics3 / SmolVLM",
                 classes={"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"},
                 checkpoints={"idefics3": "HuggingFaceM4/Idefics3-8B-Llama3",
                              "smolvlm": "HuggingFaceTB/SmolVLM2-2.2B-Instruct"},
                 vision="SigLIP tiles without a CLS token: CLS-based vision selectors do not apply")

    def info(self):
        return super().info().replace(family=self.model.config.model_type)

    @property
    def language_model(self):
        return self.top.text_model


class TinyIdefics3(tiny.TinySpec):
    """Tiles of 16 tokens (8 x 8 patches of 4 px, pixel shuffle 2); per image 1, 3, 1, 3 tiles
    (``IDEFICS_SPLITS`` + the global view); ``<fake_token_around_image>`` is id 5, the tile-position
    and ``<global-img>`` tokens are text ids."""

    model_type, model_class = "idefics3", "Idefics3ForConditionalGeneration"

    def config(self, num_layers=tiny.NUM_LAYERS):
        from transformers import Idefics3Config, LlamaConfig

        return Idefics3Config(**self._parts(num_layers, LlamaConfig))

    @staticmethod
    def _parts(num_layers, text_cls) -> dict:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=IDEFICS_TILE, patch_size=IDEFICS_PATCH, initializer_range=tiny.INIT_STD)
        return dict(vision_config=vision, text_config=text_cls(**tiny.text_config(num_layers)).to_dict(),
                    image_token_id=tiny.IMAGE_ID, scale_factor=IDEFICS_SCALE, pad_token_id=tiny.PAD_ID)

    def image(self, index, gen, images_in_prompt):
        rows, cols = IDEFICS_SPLITS[index % len(IDEFICS_SPLITS)]
        per_tile = (IDEFICS_TILE // IDEFICS_PATCH // IDEFICS_SCALE) ** 2
        side = int(per_tile**0.5)
        fake, marker = tiny.VISION_START_ID, tiny.MARKER_ID
        tokens = []
        for _ in range(rows):
            for _ in range(cols):
                tokens += [fake, marker, *[tiny.IMAGE_ID] * per_tile]
            tokens.append(marker)  # the newline closing a row of tiles
        tokens += [fake, marker, *[tiny.IMAGE_ID] * per_tile, fake]
        tiles = rows * cols + 1
        pixels = torch.randn(tiles, 3, IDEFICS_TILE, IDEFICS_TILE, generator=gen)
        return tiny.TinyImage(tokens, {"pixel_values": pixels}, [(per_tile, side, side)] * tiles)

    def collate(self, prompts, dtype):
        # [prompts, tiles, C, H, W]: a prompt's tiles one after another, all-zero tiles as padding (skipped)
        per_prompt = [torch.cat([i.inputs["pixel_values"] for i in p]) if p else torch.zeros(0, 3, IDEFICS_TILE, IDEFICS_TILE)
                      for p in prompts]
        pixels = stack_tiles(per_prompt)
        return {"pixel_values": pixels.to(dtype),
                "pixel_attention_mask": torch.ones(*pixels.shape[:2], IDEFICS_TILE, IDEFICS_TILE, dtype=torch.bool)}


class TinySmolVLM(TinyIdefics3):
    """As Idefics3, with SmolVLM's classes."""

    model_type, model_class = "smolvlm", "SmolVLMForConditionalGeneration"

    def config(self, num_layers=tiny.NUM_LAYERS):
        from transformers import LlamaConfig, SmolVLMConfig

        return SmolVLMConfig(**self._parts(num_layers, LlamaConfig))


Idefics3Adapter.tiny = {"idefics3": TinyIdefics3(), "smolvlm": TinySmolVLM()}
