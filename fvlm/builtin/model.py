"""Architecture, tokenizer, processor and chat template of the built-in LLaVA model.

The model is a real `LlavaForConditionalGeneration` with LLaVA-1.5's visual
layout: a CLIP vision tower on 336 px images with 14 px patches (576 patch tokens plus a CLS token),
``vision_feature_layer=-2`` and the ``"default"`` strategy (CLS dropped), a two-layer GELU projector
and a Llama language model, all small enough to train on a CPU. The tokenizer is a word-level
``tokenizers`` model over the synthetic task's vocabulary, wrapped in a
`PreTrainedTokenizerFast`; the processor is a `LlavaProcessor`
with the torchvision-free ``CLIPImageProcessorPil``.
"""
from __future__ import annotations

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from fvlm.builtin import synthetic

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIALS = (PAD, BOS, EOS, UNK, IMAGE)
IMAGE_SIZE, PATCH_SIZE = synthetic.IMAGE_SIZE, synthetic.PATCH
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576

#: LLaVA-1.5's conversation format: ``USER: <image>\n{question} ASSISTANT: {answer}</s>``.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in parts %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

#: Sizes of the shipped checkpoint (see [`build_config`][fvlm.builtin.model.build_config]).
DEFAULT_SIZES = dict(
    vision_hidden=64, vision_intermediate=192, vision_layers=3, vision_heads=4,
    text_hidden=128, text_intermediate=384, text_layers=4, text_heads=4, text_kv_heads=4, rope_theta=10000.0, text_init=0.08,
)
#: Sizes of the relational checkpoint: twice the decoder layers, so that looks at the image that
#: depend on earlier looks can happen late in the language model.
RELATIONAL_SIZES = {**DEFAULT_SIZES, "text_layers": 8}
#: A tiny variant for smoke tests of the training script (same token layout, same 576 patches).
SMOKE_SIZES = dict(
    vision_hidden=16, vision_intermediate=32, vision_layers=2, vision_heads=2,
    text_hidden=32, text_intermediate=64, text_layers=4, text_heads=2, text_kv_heads=2, rope_theta=10000.0, text_init=0.08,
)


def prompt(question: str) -> str:
    """The single-turn prompt the chat template renders for one image and ``question`` (BOS excluded)."""
    return f"USER: {IMAGE}\n{question} ASSISTANT:"


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``words`` (default [`fvlm.builtin.synthetic.vocabulary`][fvlm.builtin.synthetic.vocabulary]; ids 0-4
    are the specials)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate([*SPECIALS, *(words or synthetic.vocabulary())])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Two-word region names ("top left") are single tokens: matched before the whitespace split.
    core.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in vocab if " " in w])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                        special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, padding_side="left", model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """LLaVA-1.5-style processor: 336 px CLIP preprocessing, 576 ``<image>`` placeholders per image."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(), patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast | None = None, **sizes) -> LlavaConfig:
    """The LLaVA config of the built-in model (``sizes`` overrides [`DEFAULT_SIZES`][fvlm.builtin.model.DEFAULT_SIZES])."""
    tokenizer = tokenizer or build_tokenizer()
    s = {**DEFAULT_SIZES, **sizes}
    vision = CLIPVisionConfig(
        hidden_size=s["vision_hidden"], intermediate_size=s["vision_intermediate"],
        num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=s["vision_hidden"], hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s["text_hidden"], intermediate_size=s["text_intermediate"],
        num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
        num_key_value_heads=s["text_kv_heads"], max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(s["rope_theta"])},
        initializer_range=float(s["text_init"]),
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=NUM_PATCHES, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", pad_token_id=tokenizer.pad_token_id,
    )


def build_model(config: LlavaConfig, seed: int = 0, attn_implementation: str = "sdpa") -> LlavaForConditionalGeneration:
    """A freshly initialised model for ``config`` (weights depend only on ``seed``)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    set_generation_defaults(model)
    return model


def set_generation_defaults(model) -> None:
    """Greedy decoding, stop at ``</s>``, short answers."""
    gen = model.generation_config
    text = model.config.text_config
    gen.do_sample, gen.num_beams, gen.max_new_tokens = False, 1, 4
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = text.pad_token_id, text.bos_token_id, text.eos_token_id
