"""Adapter for Mistral 3 (Pixtral vision tower): an image is ``rows`` rows of ``cols`` merged-patch
tokens, each row closed by ``[IMG_BREAK]`` (the last by ``[IMG_END]``); the image sizes give the grid."""
from __future__ import annotations

import torch

from fvlm.adapters import tiny
from fvlm.adapters.base import BackboneAdapter, grids_from_sizes

PIXTRAL_PATCH, PIXTRAL_MERGE = 4, 2
PIXTRAL_SIZES = [(32, 32), (24, 40), (40, 16), (16, 48)]  # (height, width) in px, cycled per image


class Mistral3Adapter(BackboneAdapter):
    """Mistral 3: per image a ``height / (patch * merge)`` x ``width / (patch * merge)`` grid of visual
    tokens (the break tokens between its rows are text positions)."""

    family = "mistral3"
    model_types = ("mistral3",)
    about = dict(name="Mistral 3 / Pixtral", classes={"mistral3": "Mistral3ForConditionalGeneration"},
                 checkpoints={"mistral3": "mistralai/Mistral-Small-3.1-24B-Instruct-2503"},
                 vision="Pixtral has no CLS token: CLS-based vision selectors do not apply")

    def observe(self, store, needs):
        """``generate`` encodes images before the prefill call: record their sizes from the vision tower."""

        def hook(module, args, kwargs):
            store.image_sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)

        return [self.top.vision_tower.register_forward_pre_hook(hook, with_kwargs=True)]

    def image_grids(self, input_ids, top_kwargs, observed):
        sizes = top_kwargs.get("image_sizes")
        sizes = observed.image_sizes if sizes is None else sizes
        step = self.model.config.vision_config.patch_size * self.model.config.spatial_merge_size
        grid = [] if sizes is None else [(1, int(h) // step, int(w) // step) for h, w in sizes.tolist()]
        return grids_from_sizes(grid, self.visual_mask(input_ids))


class TinyMistral3(tiny.TinySpec):
    """Patches of 4 px merged 2 x 2; sizes cycle through ``PIXTRAL_SIZES`` (16, 15, 10, 12 tokens);
    ``[IMG_BREAK]`` is id 5 and ``[IMG_END]`` id 6."""

    model_type, model_class = "mistral3", "Mistral3ForConditionalGeneration"

    def config(self, num_layers=tiny.NUM_LAYERS):
        from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

        vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     head_dim=16, image_size=64, patch_size=PIXTRAL_PATCH, initializer_range=tiny.INIT_STD)
        text = MistralConfig(**tiny.text_config(num_layers, sliding_window=None))
        return Mistral3Config(vision_config=vision, text_config=text, image_token_index=tiny.IMAGE_ID,
                              spatial_merge_size=PIXTRAL_MERGE, vision_feature_layer=-1)

    def image(self, index, gen, images_in_prompt):
        height, width = PIXTRAL_SIZES[index % len(PIXTRAL_SIZES)]
        step = PIXTRAL_PATCH * PIXTRAL_MERGE
        rows, cols = height // step, width // step
        tokens = []
        for r in range(rows):
            tokens += [tiny.IMAGE_ID] * cols + [tiny.VISION_END_ID if r == rows - 1 else tiny.VISION_START_ID]
        pixels = torch.randn(3, height, width, generator=gen)
        return tiny.TinyImage(tokens, {"pixel_values": pixels, "image_sizes": (height, width)}, [(rows * cols, rows, cols)])

    def collate(self, prompts, dtype):
        images = [i for p in prompts for i in p]
        height = max(i.inputs["image_sizes"][0] for i in images)
        width = max(i.inputs["image_sizes"][1] for i in images)
        pixels = torch.zeros(len(images), 3, height, width)
        for n, image in enumerate(images):
            h, w = image.inputs["image_sizes"]
            pixels[n, :, :h, :w] = image.inputs["pixel_values"]
        return {"pixel_values": pixels.to(dtype),
                "image_sizes": torch.tensor([i.inputs["image_sizes"] for i in images], dtype=torch.long)}


Mistral3Adapter.tiny = {"mistral3": TinyMistral3()}
