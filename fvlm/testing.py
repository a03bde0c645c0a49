"""Test fixtures: tiny, randomly initialised VLMs of every registered family and matching inputs
(re-exported from [`fvlm.adapters.tiny`][fvlm.adapters.tiny], where each adapter's tiny model lives), and a mid-size
random LLaVA for benchmarks.

The models are real HF transformers ``*ForConditionalGeneration`` classes built from config (no hub
access), one per model type whose backbone adapter provides a tiny spec: [`FAMILIES`][fvlm.testing.FAMILIES] follows
the adapter registry, so a new family is tested by every test parametrised over it. They share one
token layout::

    0 pad | 1 bos | 2 eos | 3 image | 4 video | 5 vision_start | 6 vision_end | 8..255 text

Weights use ``initializer_range=0.2``; ``lm_head`` rows of the special ids (< 8) are zeroed and
``generation_config.eos_token_id`` is ``None``, so greedy ``generate`` always produces
``max_new_tokens`` text tokens and pruned/unpruned runs have equal lengths.

Image sizes / grids are assigned per image in batch order (image ``i`` of the whole batch uses entry
``i % len(...)`` of its family's list), so samples in a batch get different counts (e.g. LLaVA: 16
per image; LLaVA-NeXT: 36, 70, 72, 88; the Qwen families: 16, 8, 24, 12).
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from fvlm.adapters import tiny
from fvlm.adapters.llava import CLIP_IMAGE, CLIP_PATCH, LLAVA_NEXT_PINPOINTS, LLAVA_NEXT_SIZES  # noqa: F401
from fvlm.adapters.qwen2_vl import QWEN_GRIDS, QWEN_PATCH, QWEN_TEMPORAL_PATCH  # noqa: F401
from fvlm.adapters.tiny import (  # noqa: F401
    BOS_ID,
    EOS_ID,
    FIRST_TEXT_ID,
    IMAGE_ID,
    INIT_STD,
    NUM_LAYERS,
    PAD_ID,
    VIDEO_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
    family_of,
    image_token_id,
    tiny_batch,
    tiny_inputs,
    tiny_model,
    visual_token_counts,
)

FAMILIES: tuple[str, ...] = tuple(tiny.specs())


# -- mid-size random LLaVA for benchmarks ---------------------------------------------------------
def sized_llava(
    hidden: int = 1024,
    layers: int = 16,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 32000,
    image_size: int = 336,
    patch: int = 14,
    vision_hidden: int = 64,
    vision_layers: int = 1,
    attn_implementation: str = "sdpa",
    dtype=torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
):
    """A random ``LlavaForConditionalGeneration`` of a chosen size (benchmarks, not tests), built on
    ``device`` (random init on a GPU takes seconds at the 7B shape, minutes on the CPU).

    The LLM is Llama-shaped (``heads`` default ``hidden // 64``, ``kv_heads`` default ``heads``,
    ``intermediate`` default ``round(2.6875 * hidden)`` rounded to 64, the Vicuna-7B ratio); the
    vision tower is a tiny CLIP (``vision_layers`` x ``vision_hidden``) at ``image_size`` / ``patch``
    so it yields LLaVA-1.5's ``(336 / 14)^2 = 576`` visual tokens at almost no cost. Token ids follow
    this module's layout (image id 3, text ids from 8); weights use the HF default init (std 0.02).
    """
    heads = heads or max(1, hidden // 64)
    intermediate = intermediate or int(round(2.6875 * hidden / 64)) * 64
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=4096,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden // 32), image_size=image_size, patch_size=patch,
        projection_dim=vision_hidden,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                         vision_feature_layer=-1 if vision_layers == 1 else -2,
                         vision_feature_select_strategy="default", image_seq_length=(image_size // patch) ** 2)
    device = torch.device(device)
    cuda = [torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), device:
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.eval()
    gen = model.generation_config
    gen.do_sample, gen.num_beams = False, 1
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD_ID, BOS_ID, None
    return model


def sized_llava_inputs(model, text_tokens: int = 64, batch: int = 1, seed: int = 0, images: int = 1) -> dict:
    """``images`` images per prompt (their placeholder spans back to back, e.g. 5 x 576 = LLaVA-NeXT's
    2,880 visual tokens) between ``text_tokens`` random text tokens (a quarter before the images, the
    rest after); ``batch`` identical-length rows, no padding."""
    config = model.config
    n_visual = int(config.image_seq_length) * images
    size = config.vision_config.image_size
    gen = torch.Generator().manual_seed(seed)
    vocab = config.get_text_config().vocab_size
    before = max(1, text_tokens // 4)
    rows = []
    for _ in range(batch):
        text = torch.randint(FIRST_TEXT_ID, vocab, (text_tokens,), generator=gen).tolist()
        rows.append([BOS_ID, *text[: before - 1], *([IMAGE_ID] * n_visual), *text[before - 1:]])
    input_ids = torch.tensor(rows, dtype=torch.long)
    pixels = torch.randn(batch * images, 3, size, size, generator=gen).to(model.dtype)
    return {k: v.to(model.device) for k, v in dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels).items()}


# -- LLaVA-1.5 prompt layout for faithfulness tests -----------------------------------------------
LLAVA15_OFFSET = 35  # LLaVA-1.5's system prompt puts the 576 image tokens at positions 35..610


def llava15_layout_model(num_layers: int = 17, attn_implementation: str = "sdpa", seed: int = 0, hidden: int = 128,
                         heads: int = 16):
    """A small random ``LlavaForConditionalGeneration`` with LLaVA-1.5's token layout: a 336 px / 14 px
    CLIP (2 layers, 32 wide, CLS + 576 patches, features from layer -2) and a Llama LLM of
    ``num_layers`` layers (17 fit SparseVLM's last stage after 16 layers), ``heads`` heads without
    GQA (16 > SparseVLM+'s 14 priority heads), ``hidden`` wide. Weights depend only on ``seed``."""
    text = LlamaConfig(**dict(tiny.TEXT, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                              num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                              initializer_range=0.1))
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=32, initializer_range=INIT_STD)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=576)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    model.eval()
    model.lm_head.weight.data[:FIRST_TEXT_ID] = 0
    gen = model.generation_config
    gen.do_sample, gen.num_beams = False, 1
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD_ID, BOS_ID, None
    return model


def llava15_layout_inputs(layouts=((LLAVA15_OFFSET, 40),), seed: int = 0) -> dict:
    """A left-padded batch with one image per prompt: per sample ``(offset, text_after)`` = BOS and
    ``offset - 1`` random text tokens, 576 image tokens, ``text_after`` random text tokens.
    ``position_ids`` count from each sample's first real token, as ``generate`` numbers them (a
    plain forward would start every row at 0, padding included)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for offset, after in layouts:
        text = torch.randint(FIRST_TEXT_ID, VOCAB_SIZE, (offset - 1 + after,), generator=gen).tolist()
        rows.append([BOS_ID, *text[: offset - 1], *([IMAGE_ID] * 576), *text[offset - 1:]])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, row in enumerate(rows):
        input_ids[b, width - len(row):] = torch.tensor(row)
        attention_mask[b, width - len(row):] = 1
    pixels = torch.randn(len(rows), 3, 336, 336, generator=gen)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "pixel_values": pixels}


def sample_inputs(batch: dict, b: int) -> dict:
    """Sample ``b`` of a padded [`llava15_layout_inputs`][fvlm.testing.llava15_layout_inputs] batch alone, without its padding."""
    keep = batch["attention_mask"][b].bool()
    single = {k: batch[k][b:b + 1, keep] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    single["pixel_values"] = batch["pixel_values"][b:b + 1]
    return single


def llm_input_embeddings(model, inputs: dict) -> torch.Tensor:
    """``[B, S, D]``: the embeddings ``model``'s language model receives for ``inputs`` (no pruning)."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]
