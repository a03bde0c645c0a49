"""Adapters for LLaVA-1.5 and LLaVA-NeXT (CLIP-style vision tower with a CLS token)."""
from __future__ import annotations

import torch

from fvlm.adapters import tiny
from fvlm.adapters.base import BackboneAdapter, ImageGrid, VisionProbe, fixed_size_grids, run_lengths
from fvlm.types import Need

CLIP_IMAGE, CLIP_PATCH = 32, 8  # tiny CLIP tiles: 4 x 4 patches
LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
LLAVA_NEXT_SIZES = [(32, 32), (48, 64), (64, 40), (64, 64)]  # (height, width), cycled per image


class LlavaAdapter(BackboneAdapter):
    """LLaVA-1.5 style: every image is one square grid of ``image_seq_length`` tokens."""

    family = "llava"
    model_types = ("llava",)
    vision_has_cls = True
    about = dict(name="LLaVA-1.5", classes={"llava": "LlavaForConditionalGeneration"},
                 checkpoints={"llava": "llava-hf/llava-1.5-7b-hf"},
                 vision="CLIP with a CLS token: vision-side selectors (VisionZip, PIO-FVLM w/ VE) apply")

    def image_grids(self, input_ids, top_kwargs, observed):
        return fixed_size_grids(self.visual_mask(input_ids), int(self.model.config.image_seq_length))

    def _feature_layer(self):
        tower = self.top.vision_tower
        encoder_layers = getattr(tower, "vision_model", tower).encoder.layers
        index = self.model.config.vision_feature_layer
        if not isinstance(index, int):
            raise ValueError("vision probes need a single vision_feature_layer")
        return encoder_layers[index if index < 0 else index - 1] if index != 0 else None

    def observe(self, store, needs):
        if Need.VISION_ATTENTION not in needs:
            return []

        def layer_input(module, args, kwargs):
            store.layer_input = args[0] if args else kwargs["hidden_states"]

        def layer_output(module, args, output):
            store.layer_cls = (output[0] if isinstance(output, tuple) else output)[:, 0]

        def projector_input(module, args):
            store.projector_input = args[0]

        layer = self._feature_layer()
        return [
            layer.register_forward_pre_hook(layer_input, with_kwargs=True),
            layer.register_forward_hook(layer_output),
            self.top.multi_modal_projector.register_forward_pre_hook(projector_input),
        ]

    def vision_probe(self, store):
        layer = self._feature_layer()
        attn = layer.self_attn
        x = store.layer_input
        normed = layer.layer_norm1(x)
        n, t, _ = normed.shape
        heads, hd = attn.num_heads, attn.head_dim
        q = attn.q_proj(normed[:, :1]).view(n, 1, heads, hd).transpose(1, 2)
        k = attn.k_proj(normed).view(n, t, heads, hd).transpose(1, 2)
        probs = (torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scale).softmax(dim=-1)
        features = store.projector_input
        patches = features.shape[1]  # CLS dropped by the "default" feature strategy
        if patches != t - 1:
            raise ValueError(f"vision probes expect {t - 1} patch features per image, got {patches}")
        return VisionProbe(
            features=features,
            cls_attention=probs[:, :, 0, 1:].sum(dim=1),
            keys=k[:, :, 1:].mean(dim=1),
            cls_features=store.layer_cls,
        )

    def project(self, features):
        return self.top.multi_modal_projector(features)


class LlavaNextAdapter(BackboneAdapter):
    """LLaVA-NeXT (any-res): per image a base tile grid, then the high-res tiles with newline tokens."""

    family = "llava_next"
    model_types = ("llava_next",)
    vision_has_cls = True
    about = dict(name="LLaVA-NeXT", classes={"llava_next": "LlavaNextForConditionalGeneration"},
                 checkpoints={"llava_next": "llava-hf/llava-v1.6-vicuna-7b-hf"},
                 vision="CLIP with a CLS token, several tiles per image: VisionZip and vision probes do not apply")

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
