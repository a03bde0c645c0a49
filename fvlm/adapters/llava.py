"""Adapters for LLaVA-1.5 and LLaVA-NeXT (CLIP-style vision tower with a CLS token)."""
from __future__ import annotations

from fvlm.adapters.base import BackboneAdapter, ImageGrid, _run_lengths


class LlavaAdapter(BackboneAdapter):
    """LLaVA-1.5 style: every image is one square grid of ``image_seq_length`` tokens."""

    family = "llava"
    model_types = ("llava",)
    vision_has_cls = True

    def image_grids(self, input_ids, top_kwargs):
        per_image = int(self.model.config.image_seq_length)
        side = int(round(per_image**0.5))
        grids = []
        for row in self.visual_mask(input_ids).cpu():
            total = int(row.sum())
            grids.append([ImageGrid(o, per_image, side, side) for o in range(0, total, per_image)])
        return grids


class LlavaNextAdapter(BackboneAdapter):
    """LLaVA-NeXT (any-res): per image a base tile grid, then the high-res tiles with newline tokens."""

    family = "llava_next"
    model_types = ("llava_next",)
    vision_has_cls = True

    def image_grids(self, input_ids, top_kwargs):
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        grids = []
        for row in self.visual_mask(input_ids).cpu():
            spans, offset = [], 0
            for length in _run_lengths(row):
                spans.append(ImageGrid(offset, length, side, side))
                offset += length
            grids.append(spans)
        return grids
