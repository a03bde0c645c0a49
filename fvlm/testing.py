"""Tiny, randomly initialised VLMs and matching inputs for fast CPU tests.

The models are real HF transformers ``*ForConditionalGeneration`` classes built from
config (no hub access). They share one token layout::

    0 pad | 1 bos | 2 eos | 3 image | 4 video | 5 vision_start | 6 vision_end | 8..255 text

Weights use ``initializer_range=0.2`` (HF default 0.02 gives near-uniform attention and
repetitive greedy outputs). ``lm_head`` rows of the special ids (< 8) are zeroed, so greedy
decoding does not emit them in practice. Generation is greedy and never stops early:
``generation_config.eos_token_id`` is ``None`` (the model config still names eos=2), so
``generate`` always produces ``max_new_tokens`` tokens and pruned/unpruned runs have equal
lengths.

Visual tokens per image (text: 4 decoder layers, hidden 64, 4 heads, 2 KV heads):

* ``llava``: always 16 (32 px CLIP image, patch 8, CLS dropped).
* ``llava_next``: depends on the image size (base tile + unpadded grid + one newline
  per row); sizes cycle through :data:`LLAVA_NEXT_SIZES`, giving 36, 70, 72, 88.
* ``qwen2_vl`` / ``qwen2_5_vl``: ``t*h*w/4``; grids cycle through :data:`QWEN_GRIDS`,
  giving 16, 8, 24, 12.

Image sizes/grids are assigned per image in batch order (image ``i`` of the whole
batch uses entry ``i % len(...)``), so samples in a batch get different counts.
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
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.image_processing_utils import select_best_resolution

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 3, 4, 5, 6
FIRST_TEXT_ID = 8
VOCAB_SIZE = 256
NUM_LAYERS = 4
INIT_STD = 0.2  # 10x the HF default: peaked attention and varied greedy outputs

CLIP_IMAGE, CLIP_PATCH = 32, 8
LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
LLAVA_NEXT_SIZES = [(32, 32), (48, 64), (64, 40), (64, 64)]  # (height, width)
QWEN_PATCH, QWEN_TEMPORAL_PATCH = 4, 2
QWEN_GRIDS = [(1, 8, 8), (1, 4, 8), (1, 8, 12), (1, 12, 4)]  # (t, h, w) in patches

_TEXT = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, initializer_range=INIT_STD,
)


def _clip_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=CLIP_IMAGE, patch_size=CLIP_PATCH, projection_dim=32, initializer_range=INIT_STD,
    )


def _config(family: str, num_layers: int = NUM_LAYERS):
    text = dict(_TEXT, num_hidden_layers=num_layers)
    llava_common = dict(
        image_token_index=IMAGE_ID, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(CLIP_IMAGE // CLIP_PATCH) ** 2,
    )
    qwen_text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [2, 3, 3]})  # sums to head_dim/2 = 8
    qwen_ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                    vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID)
    qwen_vision = dict(depth=2, num_heads=2, patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL_PATCH,
                       spatial_merge_size=2, initializer_range=INIT_STD)
    if family == "llava":
        return LlavaConfig(vision_config=_clip_config(), text_config=LlamaConfig(**text), **llava_common)
    if family == "llava_next":
        return LlavaNextConfig(vision_config=_clip_config(), text_config=LlamaConfig(**text),
                               image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, **llava_common)
    if family == "qwen2_vl":
        vision = dict(qwen_vision, embed_dim=32, hidden_size=_TEXT["hidden_size"], mlp_ratio=2)
        return Qwen2VLConfig(text_config=qwen_text, vision_config=vision, **qwen_ids)
    if family == "qwen2_5_vl":
        vision = dict(qwen_vision, hidden_size=32, intermediate_size=64, out_hidden_size=_TEXT["hidden_size"],
                      window_size=4 * QWEN_PATCH * 2, fullatt_block_indexes=[1])  # 4x4 merged windows
        return Qwen2_5_VLConfig(text_config=qwen_text, vision_config=vision, **qwen_ids)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32,
               num_layers: int = NUM_LAYERS):
    """Build a deterministic tiny ``*ForConditionalGeneration`` model of ``family`` in eval mode.

    ``num_layers`` sets the decoder depth (e.g. 16 for selectors whose default stages sit deeper).

    Weights depend only on ``seed`` (the global RNG state is left untouched), not on
    ``attn_implementation`` or the order of calls.
    """
    config = _config(family, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _CLASSES[family]._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    model.eval()
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if head is not embed:  # special ids get logit 0: greedy decoding (practically) never emits them
        with torch.no_grad():
            head[:FIRST_TEXT_ID] = 0
    gen = model.generation_config
    gen.do_sample, gen.num_beams = False, 1
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD_ID, BOS_ID, None
    return model


def family_of(model) -> str:
    """The family name of a model built by :func:`tiny_model` (or a real one of the same class)."""
    for family, cls in _CLASSES.items():
        if isinstance(model, cls):
            return family
    raise ValueError(f"unsupported model class {type(model).__name__}")


def image_token_id(model) -> int:
    """The image placeholder id (``image_token_index`` on LLaVA configs, ``image_token_id`` on Qwen)."""
    config = model.config
    value = getattr(config, "image_token_id", None)
    return int(value if value is not None else config.image_token_index)


def _llava_next_count(height: int, width: int) -> tuple[int, int]:
    """(visual tokens, number of 32 px tiles incl. the base tile) for one LLaVA-NeXT image."""
    side = CLIP_IMAGE // CLIP_PATCH
    best_h, best_w = select_best_resolution((height, width), LLAVA_NEXT_PINPOINTS)
    rows, cols = side * best_h // CLIP_IMAGE, side * best_w // CLIP_IMAGE
    if width / height > cols / rows:  # wider than the grid: rows are padded
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    tiles = (best_h // CLIP_IMAGE) * (best_w // CLIP_IMAGE) + 1
    return side * side + rows * cols + rows, tiles


def _image_span(family: str, n_tokens: int) -> list[int]:
    span = [IMAGE_ID] * n_tokens
    return [VISION_START_ID, *span, VISION_END_ID] if family.startswith("qwen") else span


def _split(total: int, parts: int, gen: torch.Generator) -> list[int]:
    """Split ``total`` into ``parts`` chunks of at least one token each."""
    if total < parts:
        raise ValueError(f"need at least {parts} text tokens, got {total}")
    cuts = sorted(torch.randperm(total - 1, generator=gen)[: parts - 1].add(1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def tiny_inputs(model, images_per_prompt=(1, 1), padding_side: str = "left", seed: int = 0,
                text_lengths=None) -> dict:
    """Padded batch for ``model(**inputs)`` / ``model.generate(**inputs)``.

    Sample ``b`` holds ``images_per_prompt[b]`` images, with text before, between and after
    the image spans (``text_lengths[b]`` text tokens in all; by default 6, 10, 14, ...).
    Keys: ``input_ids``, ``attention_mask``, and when the batch has images ``pixel_values``
    (+ ``image_sizes`` for LLaVA-NeXT, + ``image_grid_thw`` for Qwen). Qwen inputs always
    carry ``mm_token_type_ids`` (1 at image tokens).
    """
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    family = family_of(model)
    gen = torch.Generator().manual_seed(seed)
    batch = len(images_per_prompt)
    default_lengths = text_lengths is None
    if not default_lengths and len(text_lengths) != batch:
        raise ValueError("text_lengths needs one entry per prompt")
    if default_lengths:
        text_lengths = [6 + 4 * b for b in range(batch)]

    seqs, pixels, sizes, grids = [], [], [], []
    for b, n_images in enumerate(images_per_prompt):
        chunks = _split(text_lengths[b], n_images + 1, gen)
        seq = torch.randint(FIRST_TEXT_ID, VOCAB_SIZE, (chunks[0],), generator=gen).tolist()
        for chunk in chunks[1:]:
            i = len(pixels)  # global image index
            if family == "llava":
                n_tokens = (CLIP_IMAGE // CLIP_PATCH) ** 2
                pixels.append(torch.randn(3, CLIP_IMAGE, CLIP_IMAGE, generator=gen))
            elif family == "llava_next":
                size = LLAVA_NEXT_SIZES[i % len(LLAVA_NEXT_SIZES)]
                n_tokens, tiles = _llava_next_count(*size)
                pixels.append(torch.randn(tiles, 3, CLIP_IMAGE, CLIP_IMAGE, generator=gen))
                sizes.append(size)
            else:
                grid = QWEN_GRIDS[i % len(QWEN_GRIDS)]
                n_tokens = grid[0] * grid[1] * grid[2] // 4
                dim = 3 * QWEN_TEMPORAL_PATCH * QWEN_PATCH**2
                pixels.append(torch.randn(grid[0] * grid[1] * grid[2], dim, generator=gen))
                grids.append(grid)
            seq += _image_span(family, n_tokens)
            seq += torch.randint(FIRST_TEXT_ID, VOCAB_SIZE, (chunk,), generator=gen).tolist()
        seqs.append(seq)
    if default_lengths and batch > 1 and len({len(s) for s in seqs}) == 1:  # make sure there is padding
        seqs[-1] += torch.randint(FIRST_TEXT_ID, VOCAB_SIZE, (3,), generator=gen).tolist()

    width = max(len(s) for s in seqs)
    input_ids = torch.full((batch, width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for b, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        input_ids[b, cols] = torch.tensor(seq)
        attention_mask[b, cols] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}

    dtype = model.dtype
    if family.startswith("qwen"):
        inputs["mm_token_type_ids"] = (input_ids == IMAGE_ID).long()
    if pixels and family == "llava":
        inputs["pixel_values"] = torch.stack(pixels).to(dtype)
    elif pixels and family == "llava_next":
        max_tiles = max(p.shape[0] for p in pixels)
        padded = torch.zeros(len(pixels), max_tiles, 3, CLIP_IMAGE, CLIP_IMAGE)
        for i, p in enumerate(pixels):
            padded[i, : p.shape[0]] = p
        inputs["pixel_values"] = padded.to(dtype)
        inputs["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
    elif pixels:
        inputs["pixel_values"] = torch.cat(pixels).to(dtype)
        inputs["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return {k: v.to(model.device) for k, v in inputs.items()}


def visual_token_counts(model, inputs) -> list[int]:
    """Number of image placeholder tokens in each sample of ``inputs``."""
    return (inputs["input_ids"] == image_token_id(model)).sum(dim=-1).tolist()


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
    text = LlamaConfig(**dict(_TEXT, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
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
    """Sample ``b`` of a padded :func:`llava15_layout_inputs` batch alone, without its padding."""
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
