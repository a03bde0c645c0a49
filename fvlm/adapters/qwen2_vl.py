"""Adapter for Qwen2-VL and Qwen2.5-VL (3-D M-RoPE positions, 2x2 merged patches, no CLS token)."""
from __future__ import annotations

from fvlm.adapters.base import BackboneAdapter, ImageGrid, images_per_row


class Qwen2VLAdapter(BackboneAdapter):
    """Qwen2-VL / Qwen2.5-VL: position ids are ``[3 or 4, B, S]``; grids come from ``image_grid_thw``."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    mrope = True

    def info(self):
        info = super().info()
        return type(info)(**{**info.__dict__, "family": self.model.config.model_type})

    def observe(self, store, needs):
        """``generate`` encodes images before the prefill call: record their grids from the vision tower."""

        def hook(module, args, kwargs):
            store["image_grid_thw"] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

        return [self.top.visual.register_forward_pre_hook(hook, with_kwargs=True)]

    def image_grids(self, input_ids, top_kwargs):
        thw = top_kwargs.get("image_grid_thw")
        merge = self.model.config.vision_config.spatial_merge_size
        sizes = [] if thw is None else [(int(t), int(h) // merge, int(w) // merge) for t, h, w in thw.tolist()]
        rows = images_per_row([t * h * w for t, h, w in sizes], self.visual_mask(input_ids).sum(dim=1).tolist())
        grids = []
        for images in rows:
            spans, offset = [], 0
            for t, h, w in (sizes[i] for i in images):
                spans.append(ImageGrid(offset, t * h * w, h, w))
                offset += t * h * w
            grids.append(spans)
        return grids
