"""Adapters for LLaVA-1.5 and LLaVA-NeXT (CLIP-style vision tower with a CLS token)."""
from __future__ import annotations

import torch

from fvlm.adapters import tiny
from fvlm.adapters.base import (
    BackboneAdapter,
    ImageGrid,
    TokenGrid,
    View,
    VisionObservation,
    VisionProbe,
    VisualLayout,
    fixed_size_grids,
    run_lengths,
)
from fvlm.errors import UnsupportedModelError
from fvlm.types import Need

CLIP_IMAGE, CLIP_PATCH = 32, 8  # tiny CLIP tiles: 4 x 4 patches
LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
LLAVA_NEXT_SIZES = [(32, 32), (48, 64), (64, 40), (64, 64)]  # (height, width), cycled per image


class ClipTowerAdapter(BackboneAdapter):
    """Shared by the LLaVA families: a CLIP vision tower (CLS + square patch grid) and a projector.

    Views are the tower's input images (LLaVA-1.5) or crops (LLaVA-NeXT), in the tower's batch order.
    """

    vision_has_cls = True

    @property
    def _tower(self):
        tower = self.top.vision_tower
        return getattr(tower, "vision_model", tower)

    def _feature_index(self) -> int | None:
        index = self.model.config.vision_feature_layer
        if not isinstance(index, int):
            raise UnsupportedModelError("vision probes need a single vision_feature_layer")
        if index == 0:
            return None
        return (index if index > 0 else len(self._tower.encoder.layers) + 1 + index) - 1

    def vision_info(self) -> dict:
        depth = len(self._tower.encoder.layers)
        vc = self.model.config.vision_config
        return dict(vision_layers=depth, vision_feature_layer=self._feature_index(),
                    vision_full_attention=tuple(range(depth)), view_tokens=(vc.image_size // vc.patch_size) ** 2,
                    vision_hidden=vc.hidden_size)

    def observe(self, store, needs):
        """Vision probes (``VISION_ATTENTION``): the feature layer's input and CLS output; both kinds of
        vision-side selectors (``VISION_FEATURES`` too): the projector's input and output."""
        wants_attention = Need.VISION_ATTENTION in needs
        if not (wants_attention or Need.VISION_FEATURES in needs):
            return []

        def projector_io(module, args, output):
            store.projector_input, store.projector_output = args[0], output

        hooks = [self.top.multi_modal_projector.register_forward_hook(projector_io)]
        feature = self._feature_index()
        if wants_attention and feature is not None:
            def layer_input(module, args, kwargs):
                store.layer_input = args[0] if args else kwargs["hidden_states"]

            def layer_output(module, args, output):
                store.layer_cls = (output[0] if isinstance(output, tuple) else output)[:, 0]

            layer = self._tower.encoder.layers[feature]
            hooks += [layer.register_forward_pre_hook(layer_input, with_kwargs=True), layer.register_forward_hook(layer_output)]
        return hooks

    def observe_layers(self, store, layers):
        def layer_input(module, args, kwargs, index):
            store.vision_inputs = store.vision_inputs or {}
            store.vision_inputs[index] = args[0] if args else kwargs["hidden_states"]

        return [self._tower.encoder.layers[i].register_forward_pre_hook(
            lambda m, a, k, i=i: layer_input(m, a, k, i), with_kwargs=True) for i in sorted(layers)]

    def _cls_rows(self, x: torch.Tensor | None, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS-query attention probabilities ``[V, heads, 1 + N]`` (float32) of vision layer ``index``
        and its keys ``[V, heads, 1 + N, hd]``, recomputed from the layer's input ``x`` (any attention kernel)."""
        if x is None:
            raise UnsupportedModelError(f"{self.family}: the input of vision layer {index} was not recorded "
                                        "(declare it in the selector's vision_layers)")
        layer = self._tower.encoder.layers[index]
        attn = layer.self_attn
        normed = layer.layer_norm1(x)
        views, tokens, _ = normed.shape
        heads, hd = attn.num_heads, attn.head_dim
        q = attn.q_proj(normed[:, :1]).view(views, 1, heads, hd).transpose(1, 2)
        k = attn.k_proj(normed).view(views, tokens, heads, hd).transpose(1, 2)
        probs = (torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scale).softmax(dim=-1)
        return probs[:, :, 0], k

    def vision_probe(self, store):
        feature = self._feature_index()
        if feature is None:
            raise UnsupportedModelError(f"{self.family}: vision probes need a vision_feature_layer other than 0")
        probs, k = self._cls_rows(store.layer_input, feature)
        features = store.projector_input
        patches = features.shape[1]  # CLS dropped by the "default" feature strategy
        if patches != probs.shape[-1] - 1:
            raise ValueError(f"vision probes expect {probs.shape[-1] - 1} patch features per image, got {patches}")
        return VisionProbe(features=features, cls_attention=probs[:, :, 1:].sum(dim=1), keys=k[:, :, 1:].mean(dim=1),
                           cls_features=store.layer_cls)

    def vision_attention(self, store, layer):
        """CLS-query attention to every patch, per head (softmax over CLS + patches; the CLS column
        is dropped and the rest is not renormalised): ``[heads, N]`` per view."""
        return list(self._cls_rows((store.vision_inputs or {}).get(layer), layer)[0][:, :, 1:])

    def _projector(self, store: VisionObservation, key: str, view: View) -> torch.Tensor:
        recorded = getattr(store, key)
        if recorded is None:
            raise UnsupportedModelError(f"{self.family}: projector features were not recorded (Need.VISION_FEATURES)")
        out = recorded[view.source]
        if out.shape[0] != view.rows * view.cols:
            raise UnsupportedModelError(
                f"{self.family}: {out.shape[0]} projector rows for a {view.rows} x {view.cols} view; "
                "view features need vision_feature_select_strategy='default'")
        return out

    def view_features(self, store, view, visual_hidden):
        return self._projector(store, "projector_output", view)

    def view_vision_features(self, store, view):
        return self._projector(store, "projector_input", view)

    @property
    def vision_post_norm(self):
        return self._tower.post_layernorm

    def project(self, features):
        return self.top.multi_modal_projector(features)


def _reproduces(crop: torch.Tensor, tokens: torch.Tensor, index: torch.Tensor) -> bool:
    """Whether a crop's patch features (``[N, D]``) equal the LLM input tokens they map to (``-1``: cut)."""
    kept = index >= 0
    return torch.equal(crop[kept.to(crop.device)], tokens[index[kept].to(tokens.device)])


class LlavaAdapter(ClipTowerAdapter):
    """LLaVA-1.5 style: every image is one square grid of ``image_seq_length`` tokens."""

    family = "llava"
    model_types = ("llava",)
    about = dict(name="LLaVA-1.5", classes={"llava": "LlavaForConditionalGeneration"},
                 checkpoints={"llava": "llava-hf/llava-1.5-7b-hf"},
                 vision="CLIP with a CLS token: vision-side selectors (VisionZip, VScan, CDPruner, PIO-FVLM w/ VE) apply")

    def image_grids(self, input_ids, top_kwargs, observed):
        return fixed_size_grids(self.visual_mask(input_ids), int(self.model.config.image_seq_length))

    def visual_layout(self, input_ids, top_kwargs, embeds=None, store=None):
        """One grid and one view per image; a view's source is the recorded projector output that
        equals the image's LLM input (so ``generate``'s beam expansion maps to the encoded image)."""
        layouts = super().visual_layout(input_ids, top_kwargs, embeds, store)
        crops = None if store is None else store.projector_output
        if crops is None or embeds is None:
            return layouts
        flat = crops.flatten(1)
        for b, (layout, row) in enumerate(zip(layouts, self.visual_mask(input_ids))):
            tokens = embeds[b, row.nonzero().flatten()]
            for i, view in enumerate(layout.views):
                match = (flat == tokens[view.index.flatten().to(tokens.device)].flatten()).all(dim=1).nonzero().flatten()
                if not len(match):
                    raise UnsupportedModelError("llava: an image's tokens match no recorded projector output")
                layout.views[i] = View(int(match[0]), view.image, view.index)
        return layouts


class LlavaNextAdapter(ClipTowerAdapter):
    """LLaVA-NeXT (any-res): per image a base tile grid, then the high-res tiles with newline tokens."""

    family = "llava_next"
    model_types = ("llava_next",)
    about = dict(name="LLaVA-NeXT", classes={"llava_next": "LlavaNextForConditionalGeneration"},
                 checkpoints={"llava_next": "llava-hf/llava-v1.6-vicuna-7b-hf"},
                 vision="CLIP with a CLS token, several tiles per image: VScan and CDPruner apply per crop; "
                        "VisionZip does not")

    def image_grids(self, input_ids, top_kwargs, observed):
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        grids = []
        for row in self.visual_mask(input_ids).cpu():
            spans, offset = [], 0
            for length in run_lengths(row):
                spans.append(ImageGrid(offset, length, side, side))
                offset += length
            grids.append(spans)
        return grids

    def visual_layout(self, input_ids, top_kwargs, embeds=None, store=None):
        """Grids and crops of every image, read from what the language model receives.

        ``generate`` encodes the images before the prefill call (the image sizes never reach the
        model's forward), so the layout is decoded from the LLM input: per image, the base tile's
        ``side**2`` tokens, then ``rows`` rows of ``cols`` tokens each closed by the model's
        ``image_newline`` vector (a single-crop image has one newline after its base tile). Crops come
        from the tiling (one of the config's pinpoints) and unpadding offsets that reproduce the
        recorded projector outputs exactly; without them (selectors that need no views) only the grids
        are known.
        """
        if embeds is None:
            raise UnsupportedModelError("llava_next: the visual layout needs the LLM input embeddings")
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        newline = self.top.image_newline.to(embeds.device, embeds.dtype)
        crops = None if store is None else store.projector_output
        layouts = []
        for b, row in enumerate(self.visual_mask(input_ids)):
            positions = row.nonzero().flatten()
            tokens = embeds[b, positions]
            is_newline = (tokens == newline).all(dim=-1).cpu()
            grids, views, i, image = [], [], 0, 0
            while i < len(positions):
                base = torch.arange(i, i + side * side)
                grids.append(TokenGrid(base.view(side, side)))
                i += side * side
                if i < len(positions) and bool(is_newline[i]):  # a single crop: base tile + one newline
                    tiles, i = None, i + 1
                else:
                    cols = int(is_newline[i:].long().argmax()) if bool(is_newline[i:].any()) else 0
                    rows = 0
                    while cols and i + (rows + 1) * (cols + 1) <= len(positions) and bool(
                            is_newline[i + rows * (cols + 1) + cols]) and not bool(
                            is_newline[i + rows * (cols + 1): i + rows * (cols + 1) + cols].any()):
                        rows += 1
                    if not rows:
                        raise UnsupportedModelError("llava_next: cannot read the image layout from the LLM input "
                                                    "(expected base tile, then rows closed by the image newline)")
                    table = torch.arange(i, i + rows * (cols + 1)).view(rows, cols + 1)
                    grids.append(TokenGrid(table[:, :cols], table[:, cols]))
                    tiles, i = table[:, :cols], i + rows * (cols + 1)
                if crops is not None:
                    views += self._crop_views(crops, tokens, base, tiles, side, image)
                image += 1
            layouts.append(VisualLayout(grids, views, len(positions)))
        return layouts

    def _crop_views(self, crops, tokens, base, tiles, side, image) -> list[View]:
        """The views of one image: its base crop and tiles located in the recorded projector outputs
        (``crops [C, side**2, D]``), checked to reproduce the LLM input exactly."""
        flat = crops.flatten(1)
        first = (flat == tokens[base].flatten()).all(dim=1).nonzero().flatten()
        if not len(first):
            raise UnsupportedModelError("llava_next: an image's base tile matches no recorded crop "
                                        "(view features need vision_feature_select_strategy='default')")
        start = int(first[0])
        views = [View(start, image, base.view(side, side))]
        if tiles is None:
            return views
        rows, cols = tiles.shape
        image_size = self.model.config.vision_config.image_size
        for height, width in self.model.config.image_grid_pinpoints:
            nph, npw = height // image_size, width // image_size
            full_r, full_c = nph * side, npw * side
            if not ((cols == full_c and rows <= full_r and (full_r - rows) % 2 == 0)
                    or (rows == full_r and cols <= full_c and (full_c - cols) % 2 == 0)):
                continue
            if start + 1 + nph * npw > len(crops):
                continue
            top, left = (full_r - rows) // 2, (full_c - cols) // 2
            index = torch.full((full_r, full_c), -1, dtype=torch.long)
            index[top: top + rows, left: left + cols] = tiles
            per_tile = index.view(nph, side, npw, side).permute(0, 2, 1, 3).reshape(nph * npw, side, side)
            cand = [View(start + 1 + t, image, per_tile[t]) for t in range(nph * npw)]
            if all(_reproduces(crops[v.source], tokens, v.index.flatten()) for v in cand):
                return views + cand
        raise UnsupportedModelError("llava_next: no tiling of the config's image_grid_pinpoints reproduces an "
                                    "image's tokens from the recorded crops")


# -- tiny models ------------------------------------------------------------------------------
def clip_config(**changes):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=CLIP_IMAGE,
        patch_size=CLIP_PATCH, projection_dim=32, initializer_range=tiny.INIT_STD), **changes)


def anyres_count(height: int, width: int, pinpoints, side: int, tile: int) -> tuple[int, int, int]:
    """LLaVA-NeXT / OneVision any-res arithmetic for one image: (rows, cols) of its unpadded high-res
    grid of ``side``-patch tiles of ``tile`` px, and the number of tiles incl. the base tile."""
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution((height, width), pinpoints)
    rows, cols = side * best_h // tile, side * best_w // tile
    if width / height > cols / rows:  # wider than the grid: rows are padded
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    return rows, cols, (best_h // tile) * (best_w // tile) + 1


class TinyLlava(tiny.TinySpec):
    """16 visual tokens per image (a 32 px CLIP tile, patch 8, CLS dropped)."""

    model_type, model_class = "llava", "LlavaForConditionalGeneration"

    def config(self, num_layers=tiny.NUM_LAYERS):
        from transformers import LlamaConfig, LlavaConfig

        return LlavaConfig(vision_config=clip_config(), text_config=LlamaConfig(**tiny.text_config(num_layers)),
                           image_token_index=tiny.IMAGE_ID, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", image_seq_length=(CLIP_IMAGE // CLIP_PATCH) ** 2)

    def image(self, index, gen, images_in_prompt):
        side = CLIP_IMAGE // CLIP_PATCH
        return tiny.TinyImage([tiny.IMAGE_ID] * side * side,
                              {"pixel_values": torch.randn(3, CLIP_IMAGE, CLIP_IMAGE, generator=gen)}, [(side * side, side, side)])

    def collate(self, prompts, dtype):
        return {"pixel_values": torch.stack([i.inputs["pixel_values"] for p in prompts for i in p]).to(dtype)}

    def processor(self, tokenizer):
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        return LlavaProcessor(image_processor=CLIPImageProcessorPil(**clip_processing()), tokenizer=tokenizer,
                              **llava_processing())


class TinyLlavaNext(TinyLlava):
    """Any-res: base tile + unpadded grid + one newline per row; sizes cycle through
    ``LLAVA_NEXT_SIZES``, giving 36, 70, 72, 88 visual tokens."""

    model_type, model_class = "llava_next", "LlavaNextForConditionalGeneration"

    def config(self, num_layers=tiny.NUM_LAYERS):
        from transformers import LlamaConfig, LlavaNextConfig

        return LlavaNextConfig(vision_config=clip_config(), text_config=LlamaConfig(**tiny.text_config(num_layers)),
                               image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, image_token_index=tiny.IMAGE_ID,
                               vision_feature_layer=-2, vision_feature_select_strategy="default",
                               image_seq_length=(CLIP_IMAGE // CLIP_PATCH) ** 2)

    def image(self, index, gen, images_in_prompt):
        size = LLAVA_NEXT_SIZES[index % len(LLAVA_NEXT_SIZES)]
        side = CLIP_IMAGE // CLIP_PATCH
        rows, cols, tiles = anyres_count(*size, LLAVA_NEXT_PINPOINTS, side, CLIP_IMAGE)
        count = side * side + rows * cols + rows
        pixels = torch.randn(tiles, 3, CLIP_IMAGE, CLIP_IMAGE, generator=gen)
        return tiny.TinyImage([tiny.IMAGE_ID] * count, {"pixel_values": pixels, "image_sizes": size},
                              [(count, side, side)])

    def collate(self, prompts, dtype):
        images = [i for p in prompts for i in p]
        return {"pixel_values": stack_tiles([i.inputs["pixel_values"] for i in images]).to(dtype),
                "image_sizes": torch.tensor([i.inputs["image_sizes"] for i in images], dtype=torch.long)}

    def processor(self, tokenizer):
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        image = LlavaNextImageProcessorPil(**clip_processing(), image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
        return LlavaNextProcessor(image_processor=image, tokenizer=tokenizer, **llava_processing())


def stack_tiles(pixels: list[torch.Tensor]) -> torch.Tensor:
    """``[images, max tiles, C, H, W]`` from per-image ``[tiles, C, H, W]``, zero padded."""
    out = torch.zeros(len(pixels), max(p.shape[0] for p in pixels), *pixels[0].shape[1:])
    for i, p in enumerate(pixels):
        out[i, : p.shape[0]] = p
    return out


def clip_processing() -> dict:
    return dict(size={"shortest_edge": CLIP_IMAGE}, crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE},
                do_center_crop=True)


def llava_processing() -> dict:
    return dict(patch_size=CLIP_PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                chat_template=tiny.LLAVA_TEMPLATE)


LlavaAdapter.tiny = {"llava": TinyLlava()}
LlavaNextAdapter.tiny = {"llava_next": TinyLlavaNext()}
