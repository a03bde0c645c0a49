"""Small random models with the papers' visual layouts (shared by the CDPruner, VScan and pool tests).

- ``llava15``: LLaVA-1.5's layout: CLIP at 336 px / patch 14 (577 tokens, 24 layers, features from
  layer index 22), 576 visual tokens after a 35-token prefix, an 18-layer Llama (stages after 16).
- ``llava_next``: LLaVA-NeXT's any-res layout at 336 px crops and the 7B pinpoints (5 crops for a
  672 x 672 tiling), a 2-layer tower and LLM.
- ``qwen25``: Qwen2.5-VL's layout: 2 x 2 merged patches, windowed vision attention with full
  attention at blocks 1 and 3 (of 4), 4 x 4 merged-token windows, a 28-layer LLM (stages after 14).

Widths are tiny (CLIP 32, LLM 64), weights random but sharpened (CLIP ``initializer_factor=10``,
LLM std 0.2) so that attention scores are not near-ties.
"""
from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.image_processing_utils import select_best_resolution

IMAGE, VSTART, VEND = 3, 5, 6
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
QWEN_PATCH = 4


def _text(layers: int, hidden: int = 64) -> dict:
    return dict(vocab_size=256, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=8192, initializer_range=0.2, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)


def _clip(layers: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                            image_size=336, patch_size=14, projection_dim=32, initializer_factor=10.0)


def _build(cls, config, attn: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls._from_config(config, attn_implementation=attn)
    model.eval()
    gen = model.generation_config
    gen.do_sample, gen.num_beams, gen.pad_token_id, gen.eos_token_id = False, 1, 0, None
    return model


def llava15(attn: str = "sdpa", layers: int = 18, hidden: int = 64, vision_layers: int = 24):
    """``hidden``: the LLM width, i.e. the dimension of the projector outputs (CDPruner's kernel has
    rank <= hidden: its tests use a width above the budget, and 2 vision layers, whose features are
    less alike than after 24 random layers)."""
    config = LlavaConfig(vision_config=_clip(vision_layers), text_config=LlamaConfig(**_text(layers, hidden)), image_token_index=IMAGE,
                         image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return _build(LlavaForConditionalGeneration, config, attn)


def llava_next(attn: str = "sdpa", hidden: int = 512):
    config = LlavaNextConfig(vision_config=_clip(2), text_config=LlamaConfig(**_text(2, hidden)), image_token_index=IMAGE,
                             image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=NEXT_PINPOINTS)
    return _build(LlavaNextForConditionalGeneration, config, attn)


def qwen25(attn: str = "sdpa", layers: int = 28, hidden: int = 64, vision_hidden: int = 32, full=(1, 3)):
    """``vision_hidden``: the merger's rank is at most ``4 * vision_hidden`` (CDPruner's tests widen it);
    ``full``: the full-attention blocks of the 4-block tower (the others use 4 x 4 merged-token windows)."""
    section = [hidden // 32, 3 * hidden // 64, 3 * hidden // 64]  # sums to head_dim / 2 (4 heads)
    text = dict(_text(layers, hidden), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "mrope_section": section})
    vision = dict(depth=4, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  out_hidden_size=hidden, patch_size=QWEN_PATCH, temporal_patch_size=2, spatial_merge_size=2,
                  window_size=4 * 2 * QWEN_PATCH, fullatt_block_indexes=list(full), initializer_range=0.2)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=4,
                              vision_start_token_id=VSTART, vision_end_token_id=VEND)
    return _build(Qwen2_5_VLForConditionalGeneration, config, attn)


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    return ids, mask


def _text_ids(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(8, 256, (n,), generator=gen).tolist()


def llava15_inputs(seeds=(0,), after=(20,)) -> dict:
    """One image per prompt: 35 text tokens, 576 image tokens, ``after[b]`` text tokens (left padding)."""
    rows, pixels = [], []
    for seed, n_after in zip(seeds, after):
        gen = torch.Generator().manual_seed(seed)
        rows.append([1] + _text_ids(34, gen) + [IMAGE] * 576 + _text_ids(n_after, gen))
        pixels.append(torch.randn(3, 336, 336, generator=gen))
    ids, mask = _pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack(pixels)}


def next_tokens(height: int, width: int) -> tuple[int, int, int, int]:
    """(visual tokens, crops, unpadded rows, unpadded cols) of one image (336 px crops, 24 x 24 patches)."""
    best_h, best_w = select_best_resolution((height, width), NEXT_PINPOINTS)
    rows, cols = 24 * best_h // 336, 24 * best_w // 336
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    return 576 + rows * (cols + 1), (best_h // 336) * (best_w // 336) + 1, rows, cols


def next_inputs(sizes=((500, 700),), seeds=(0,)) -> dict:
    rows, pixels = [], []
    for (h, w), seed in zip(sizes, seeds):
        gen = torch.Generator().manual_seed(seed)
        count, crops, _, _ = next_tokens(h, w)
        rows.append([1] + _text_ids(10, gen) + [IMAGE] * count + _text_ids(8, gen))
        pixels.append(torch.randn(crops, 3, 336, 336, generator=gen))
    ids, mask = _pad(rows)
    width = max(p.shape[0] for p in pixels)
    stacked = torch.zeros(len(pixels), width, 3, 336, 336)
    for i, p in enumerate(pixels):
        stacked[i, : p.shape[0]] = p
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": stacked,
            "image_sizes": torch.tensor(sizes, dtype=torch.long)}


def qwen25_inputs(grids=((36, 36),), seeds=(0,), after=(12,)) -> dict:
    """One image per prompt with a merged grid ``(h, w)`` (patches ``2h x 2w``), left padding."""
    rows, pixels, thw = [], [], []
    for (h, w), seed, n_after in zip(grids, seeds, after):
        gen = torch.Generator().manual_seed(seed)
        rows.append([1] + _text_ids(6, gen) + [VSTART] + [IMAGE] * (h * w) + [VEND] + _text_ids(n_after, gen))
        pixels.append(torch.randn(4 * h * w, 3 * 2 * QWEN_PATCH * QWEN_PATCH, generator=gen))
        thw.append([1, 2 * h, 2 * w])
    ids, mask = _pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels),
            "image_grid_thw": torch.tensor(thw), "mm_token_type_ids": (ids == IMAGE).long()}


def kept(selection, b: int) -> list[int]:
    index = selection if isinstance(selection, torch.Tensor) else selection.indices
    row = index[b]
    return row[row >= 0].tolist()
