"""Adapter for Qwen2-VL and Qwen2.5-VL (3-D M-RoPE positions, 2x2 merged patches, no CLS token)."""
from __future__ import annotations

import sys

import torch

from fvlm.adapters.base import BackboneAdapter, ImageGrid, TokenGrid, View, VisualLayout, images_per_row
from fvlm.errors import UnsupportedModelError
from fvlm.selectors.base import Need

_ROW_CHUNK = 2**24  # attention entries per chunk when summing the columns of a vision attention map


class Qwen2VLAdapter(BackboneAdapter):
    """Qwen2-VL / Qwen2.5-VL: position ids are ``[3 or 4, B, S]``; grids come from ``image_grid_thw``.

    Views are image frames (``t`` per ``image_grid_thw`` row), each an ``h/2 x w/2`` grid of merged tokens.
    """

    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    mrope = True

    def info(self):
        info = super().info()
        return type(info)(**{**info.__dict__, "family": self.model.config.model_type})

    @property
    def _visual(self):
        return self.top.visual

    def vision_info(self) -> dict:
        depth = len(self._visual.blocks)
        full = tuple(getattr(self._visual, "fullatt_block_indexes", range(depth)))
        vc = self.model.config.vision_config
        width = vc.embed_dim if self.model.config.model_type == "qwen2_vl" else vc.hidden_size
        return dict(vision_layers=depth, vision_feature_layer=depth - 1, vision_full_attention=full, vision_hidden=width)

    def observe(self, store, needs, vision_layers=frozenset()):
        """``generate`` encodes images before the prefill call: record their grids from the vision tower
        (and, for vision-attention probes, the inputs of ``vision_layers``)."""

        def hook(module, args, kwargs):
            store["image_grid_thw"] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

        hooks = [self._visual.register_forward_pre_hook(hook, with_kwargs=True)]
        if Need.VISION_ATTENTION in needs:
            for index in sorted(vision_layers):
                def block_input(module, args, kwargs, index=index):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    store.setdefault("vision_inputs", {})[index] = (
                        hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"])

                hooks.append(self._visual.blocks[index].register_forward_pre_hook(block_input, with_kwargs=True))
        return hooks

    def _row_images(self, input_ids, top_kwargs) -> list[list[tuple[int, int, int, int]]]:
        """Per batch row, its images as ``(first frame's index among all encoded frames, t, h, w)``
        in merged tokens. ``generate`` encodes the images once and then repeats every prompt
        ``num_beams`` times: rows then share their group's images."""
        thw = top_kwargs.get("image_grid_thw")
        merge = self.model.config.vision_config.spatial_merge_size
        sizes = [] if thw is None else [(int(t), int(h) // merge, int(w) // merge) for t, h, w in thw.tolist()]
        rows = images_per_row([t * h * w for t, h, w in sizes], self.visual_mask(input_ids).sum(dim=1).tolist())
        first = [sum(t for t, _, _ in sizes[:i]) for i in range(len(sizes))]  # frame index of each image
        return [[(first[i], *sizes[i]) for i in images] for images in rows]

    def image_grids(self, input_ids, top_kwargs):
        grids = []
        for row in self._row_images(input_ids, top_kwargs):
            spans, offset = [], 0
            for _, t, h, w in row:
                spans.append(ImageGrid(offset, t * h * w, h, w))
                offset += t * h * w
            grids.append(spans)
        return grids

    def visual_layout(self, input_ids, top_kwargs, embeds=None, store=None):
        """One grid and one view per image frame (raster order of merged tokens)."""
        layouts = []
        for row in self._row_images(input_ids, top_kwargs):
            grids, views, offset = [], [], 0
            for image, (frame, t, h, w) in enumerate(row):
                for f in range(t):
                    index = torch.arange(offset, offset + h * w).view(h, w)
                    grids.append(TokenGrid(index))
                    views.append(View(frame + f, image, index))
                    offset += h * w
            layouts.append(VisualLayout(grids, views, offset))
        return layouts

    def vision_attention(self, store, layer):
        """Attention each merged token receives in vision block ``layer``, per head: the block's
        softmax (float32, rotary applied, keys of the same frame) averaged over the query rows, then
        over the ``spatial_merge_size**2`` patches of the merged token; ``[heads, h * w]`` per frame,
        raster order (un-doing Qwen2.5-VL's window permutation)."""
        inputs = store.get("vision_inputs", {})
        grid_thw = store.get("image_grid_thw")
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
