"""Adapter for Qwen2-VL and Qwen2.5-VL (3-D M-RoPE positions, 2x2 merged patches, no CLS token)."""
from __future__ import annotations

import sys

import torch

from fvlm.adapters import tiny
from fvlm.adapters.base import (
    BackboneAdapter,
    TokenGrid,
    View,
    VisionObservation,
    VisualLayout,
    grids_from_sizes,
    images_per_row,
)
from fvlm.errors import UnsupportedModelError
from fvlm.types import Need

_ROW_CHUNK = 2**24  # attention entries per chunk when summing the columns of a vision attention map

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

    @property
    def _visual(self):
        return self.top.visual

    def vision_info(self) -> dict:
        depth = len(self._visual.blocks)
        full = tuple(getattr(self._visual, "fullatt_block_indexes", range(depth)))
        vc = self.model.config.vision_config
        width = vc.embed_dim if self.model.config.model_type == "qwen2_vl" else vc.hidden_size
        return dict(vision_layers=depth, vision_feature_layer=depth - 1, vision_full_attention=full, vision_hidden=width)

    def observe(self, store, needs):
        """``generate`` encodes images before the prefill call: record their grids from the vision tower."""

        def hook(module, args, kwargs):
            store.image_grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

        return [self._visual.register_forward_pre_hook(hook, with_kwargs=True)]

    def observe_layers(self, store, layers):
        def block_input(module, args, kwargs, index):
            store.vision_inputs = store.vision_inputs or {}
            store.vision_inputs[index] = (args[0] if args else kwargs["hidden_states"], kwargs["cu_seqlens"],
                                          kwargs["position_embeddings"])

        return [self._visual.blocks[i].register_forward_pre_hook(
            lambda m, a, k, i=i: block_input(m, a, k, i), with_kwargs=True) for i in sorted(layers)]

    def _sizes(self, top_kwargs, observed) -> list[tuple[int, int, int]]:
        """``(t, h, w)`` in merged tokens of every encoded image."""
        thw = top_kwargs.get("image_grid_thw")
        thw = observed.image_grid_thw if thw is None and observed is not None else thw
        merge = self.model.config.vision_config.spatial_merge_size
        return [] if thw is None else [(int(t), int(h) // merge, int(w) // merge) for t, h, w in thw.tolist()]

    def image_grids(self, input_ids, top_kwargs, observed):
        return grids_from_sizes(self._sizes(top_kwargs, observed), self.visual_mask(input_ids))

    def visual_layout(self, input_ids, top_kwargs, embeds=None, store=None):
        """One grid and one view per image frame (raster order of merged tokens); a view's source is
        the frame's index among every encoded frame (``generate``'s repeated rows share them)."""
        sizes = self._sizes(top_kwargs, store)
        first = [sum(t for t, _, _ in sizes[:i]) for i in range(len(sizes))]  # frame index of each image
        layouts = []
        for images in images_per_row([t * h * w for t, h, w in sizes], self.visual_mask(input_ids).sum(dim=1).tolist()):
            grids, views, offset = [], [], 0
            for image, i in enumerate(images):
                t, h, w = sizes[i]
                for f in range(t):
                    index = torch.arange(offset, offset + h * w).view(h, w)
                    grids.append(TokenGrid(index))
                    views.append(View(first[i] + f, image, index))
                    offset += h * w
            layouts.append(VisualLayout(grids, views, offset))
        return layouts

    def vision_attention(self, store, layer):
        """Attention each merged token receives in vision block ``layer``, per head: the block's
        softmax (float32, rotary applied, keys of the same frame) averaged over the query rows, then
        over the ``spatial_merge_size**2`` patches of the merged token; ``[heads, h * w]`` per frame,
        raster order (un-doing Qwen2.5-VL's window permutation)."""
        inputs = store.vision_inputs or {}
        grid_thw = store.image_grid_thw
        if layer not in inputs or grid_thw is None:
            raise UnsupportedModelError(f"{self.family}: the input of vision block {layer} was not recorded "
                                        "(declare it in the selector's vision_layers)")
        hidden, cu_seqlens, (cos, sin) = inputs[layer]
        block, visual = self._visual.blocks[layer], self._visual
        attn = block.attn
        patches = hidden.shape[0]
        qkv = attn.qkv(block.norm1(hidden)).reshape(patches, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        q, k = rotary(qkv[0].float(), qkv[1].float(), cos, sin)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # [heads, P, hd]
        received = torch.zeros(attn.num_heads, patches, device=hidden.device)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            keys = k[:, start:end]
            step = max(1, _ROW_CHUNK // max(1, attn.num_heads * (end - start)))
            for row in range(start, end, step):
                probs = (torch.matmul(q[:, row:min(end, row + step)], keys.transpose(1, 2)) * attn.scaling).softmax(-1)
                received[:, start:end] += probs.sum(dim=1)
            received[:, start:end] /= end - start
        unit = visual.spatial_merge_size**2
        merged = received.view(attn.num_heads, patches // unit, unit).mean(dim=-1)
        if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: merged tokens are window-permuted
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(grid_thw.cpu(), visual.spatial_merge_size, visual.window_size,
                                                      visual.patch_size)
            merged = merged[:, torch.argsort(window_index).to(merged.device)]
        sizes = [int(h) * int(w) // unit for t, h, w in grid_thw.tolist() for _ in range(int(t))]
        return list(merged.split(sizes, dim=1))


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
