"""Adapter for Qwen2-VL and Qwen2.5-VL (3-D M-RoPE positions, 2x2 merged patches, no CLS token)."""
from __future__ import annotations

import torch

from fvlm.adapters import tiny
from fvlm.adapters.base import BackboneAdapter, grids_from_sizes

QWEN_PATCH, QWEN_TEMPORAL_PATCH = 4, 2
QWEN_GRIDS = [(1, 8, 8), (1, 4, 8), (1, 8, 12), (1, 12, 4)]  # (t, h, w) in patches, cycled per image


class Qwen2VLAdapter(BackboneAdapter):
    """Qwen2-VL / Qwen2.5-VL: position ids are ``[3 or 4, B, S]``; grids come from ``image_grid_thw``."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    mrope = True
    about = dict(name="Qwen2-VL / Qwen2.5-VL",
                 classes={"qwen2_vl": "Qwen2VLForConditionalGeneration",
                          "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"},
                 checkpoints={"qwen2_vl": "Qwen/Qwen2-VL-7B-Instruct", "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct"},
                 vision="no CLS token: CLS-based vision selectors do not apply")

    def info(self):
        return super().info().replace(family=self.model.config.model_type)

    def observe(self, store, needs):
        """``generate`` encodes images before the prefill call: record their grids from the vision tower."""

        def hook(module, args, kwargs):
            store.image_grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

        return [self.top.visual.register_forward_pre_hook(hook, with_kwargs=True)]

    def image_grids(self, input_ids, top_kwargs, observed):
        thw = top_kwargs.get("image_grid_thw")
        thw = observed.image_grid_thw if thw is None else thw
        merge = self.model.config.vision_config.spatial_merge_size
        sizes = [] if thw is None else [(int(t), int(h) // merge, int(w) // merge) for t, h, w in thw.tolist()]
        return grids_from_sizes(sizes, self.visual_mask(input_ids))


# -- tiny models ------------------------------------------------------------------------------
class TinyQwen2VL(tiny.TinySpec):
    """``t*h*w/4`` visual tokens per image; grids cycle through ``QWEN_GRIDS`` (16, 8, 24, 12 tokens)."""

    model_type, model_class = "qwen2_vl", "Qwen2VLForConditionalGeneration"
    ids = dict(image_token_id=tiny.IMAGE_ID, video_token_id=tiny.VIDEO_ID,
               vision_start_token_id=tiny.VISION_START_ID, vision_end_token_id=tiny.VISION_END_ID)
    vision = dict(depth=2, num_heads=2, patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL_PATCH,
                  spatial_merge_size=2, initializer_range=tiny.INIT_STD)

    def config(self, num_layers=tiny.NUM_LAYERS):
        from transformers import Qwen2VLConfig

        vision = dict(self.vision, embed_dim=32, hidden_size=tiny.TEXT["hidden_size"], mlp_ratio=2)
        return Qwen2VLConfig(text_config=tiny.mrope_text(num_layers), vision_config=vision, **self.ids)

    def image(self, index, gen, images_in_prompt):
        t, h, w = QWEN_GRIDS[index % len(QWEN_GRIDS)]
        n = t * h * w // 4
        pixels = torch.randn(t * h * w, 3 * QWEN_TEMPORAL_PATCH * QWEN_PATCH**2, generator=gen)
        return tiny.TinyImage([tiny.VISION_START_ID, *[tiny.IMAGE_ID] * n, tiny.VISION_END_ID],
                              {"pixel_values": pixels, "image_grid_thw": (t, h, w)}, [(n, h // 2, w // 2)])

    def collate(self, prompts, dtype):
        images = [i for p in prompts for i in p]
        return {"pixel_values": torch.cat([i.inputs["pixel_values"] for i in images]).to(dtype),
                "image_grid_thw": torch.tensor([i.inputs["image_grid_thw"] for i in images], dtype=torch.long)}

    def extra_inputs(self, input_ids):
        return {"mm_token_type_ids": (input_ids == tiny.IMAGE_ID).long()}

    def processor(self, tokenizer):
        from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

        return self._processor(Qwen2VLProcessor, Qwen2VLImageProcessorPil, tokenizer)

    @staticmethod
    def _processor(cls, image_cls, tokenizer):
        from fvlm.processors import image_only_class

        factor = QWEN_PATCH * 2
        image = image_cls(patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL_PATCH, merge_size=2,
                          size={"shortest_edge": 4 * factor * factor, "longest_edge": 12 * factor * factor})
        return image_only_class(cls)(image_processor=image, tokenizer=tokenizer, chat_template=tiny.QWEN_TEMPLATE)


class TinyQwen25VL(TinyQwen2VL):
    """As Qwen2-VL, with a windowed-attention vision tower (4x4 merged windows)."""

    model_type, model_class = "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"

    def config(self, num_layers=tiny.NUM_LAYERS):
        from transformers import Qwen2_5_VLConfig

        vision = dict(self.vision, hidden_size=32, intermediate_size=64, out_hidden_size=tiny.TEXT["hidden_size"],
                      window_size=4 * QWEN_PATCH * 2, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=tiny.mrope_text(num_layers), vision_config=vision, **self.ids)

    def processor(self, tokenizer):
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

        return self._processor(Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, tokenizer)


Qwen2VLAdapter.tiny = {"qwen2_vl": TinyQwen2VL(), "qwen2_5_vl": TinyQwen25VL()}
