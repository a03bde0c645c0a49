"""Tiny random models of every backbone family, built from config (no hub).

Each adapter provides a [`TinySpec`][fvlm.adapters.tiny.TinySpec] per model type it handles (``BackboneAdapter.tiny``): the
config of a tiny model and, per image, the placeholder ids a prompt holds for it and the pixel
inputs its vision tower takes; [`tiny_batch`][fvlm.adapters.tiny.tiny_batch] builds padded prompt batches from them. The test
suite (`fvlm.testing`), the family matrix, ``fvlm demo`` and the ``tiny:<family>`` backbones of
the run path (`fvlm.tiny_backbones`) are all driven by this.

Every tiny model shares one token layout::

    0 pad | 1 bos | 2 eos | 3 image | 4 video | 5 vision_start | 6 vision_end | 7 unk | 8..255 text

(families whose prompts delimit images or tiles use 5 and 6 as the delimiters, 7 as tile-position
markers), a 4-layer text
model of hidden size 64 with 4 heads and 2 KV heads, and weights with ``initializer_range=0.2``
(HF's 0.02 gives near-uniform attention and repetitive greedy outputs). ``lm_head`` rows of the
special ids are zeroed and ``generation_config.eos_token_id`` is ``None``: greedy ``generate``
always produces ``max_new_tokens`` text tokens.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fvlm.registry import get_adapter_class, list_adapters
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 3, 4, 5, 6
MARKER_ID = 7  # the tokenizer's unk; tile-position markers of the tiled families
FIRST_TEXT_ID = 8
VOCAB_SIZE = 256
NUM_LAYERS = 4
INIT_STD = 0.2  # 10x the HF default: peaked attention and varied greedy outputs

TEXT = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, initializer_range=INIT_STD,
)


@dataclass
class TinyImage:
    """One image of a tiny prompt: the ids standing for it in the prompt, its pixel inputs (collated
    by the spec), and the grids (``(length, rows, cols)``, in order) its visual tokens form."""

    tokens: list[int]
    inputs: dict = field(default_factory=dict)
    grids: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def visual(self) -> int:
        return sum(1 for t in self.tokens if t == IMAGE_ID)


class TinySpec:
    """How to build a tiny random model of one model type and image inputs for it.

    Subclasses set ``model_type`` and ``model_class`` (the transformers ``*ForConditionalGeneration``
    class name) and implement `config`, [`image`][fvlm.adapters.tiny.TinySpec.image] and [`collate`][fvlm.adapters.tiny.TinySpec.collate].
    """

    model_type: ClassVar[str]
    model_class: ClassVar[str]

    def config(self, num_layers: int = NUM_LAYERS) -> Any:
        raise NotImplementedError

    def image(self, index: int, gen: torch.Generator, images_in_prompt: int) -> TinyImage:
        """Image ``index`` of a batch (sizes cycle with the index) in a prompt of ``images_in_prompt``."""
        raise NotImplementedError

    def collate(self, prompts: list[list[TinyImage]], dtype: torch.dtype) -> dict:
        """The model's pixel keyword arguments for a batch whose prompt ``b`` shows ``prompts[b]``
        (called only when the batch has an image)."""
        raise NotImplementedError

    def extra_inputs(self, input_ids: torch.Tensor) -> dict:
        """Further keyword arguments the model needs next to ``input_ids`` (with or without images)."""
        return {}

    def processor(self, tokenizer) -> Any:
        """A processor around ``tokenizer`` whose placeholder counts match this tiny model (built
        without the hub), for the ``tiny:<family>`` backbones of the run path."""
        raise NotImplementedError(f"no tiny processor for {self.model_type}")

    @property
    def has_processor(self) -> bool:
        return type(self).processor is not TinySpec.processor

    def build(self, attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32,
              num_layers: int = NUM_LAYERS):
        """The deterministic tiny model in eval mode (weights depend only on ``seed``)."""
        import transformers

        cls = getattr(transformers, self.model_class)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls._from_config(self.config(num_layers), attn_implementation=attn_implementation, dtype=dtype)
        model.eval()
        head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        if head is not embed:  # special ids get logit 0: greedy decoding (practically) never emits them
            with torch.no_grad():
                head[:FIRST_TEXT_ID] = 0
        gen = model.generation_config
        gen.do_sample, gen.num_beams = False, 1
        gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD_ID, BOS_ID, None
        return model


def text_config(num_layers: int, **changes) -> dict:
    """The shared tiny text config (a dict any decoder config class accepts) with ``changes``."""
    return dict(TEXT, num_hidden_layers=num_layers, **changes)


def mrope_text(num_layers: int, **changes) -> dict:
    """Text config of the M-RoPE families: ``mrope_section`` must sum to ``head_dim / 2`` = 8."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    return text_config(num_layers, rope_parameters=rope, **changes)


def specs() -> dict[str, TinySpec]:
    """``{model type: spec}`` of every registered adapter that provides one (registry order)."""
    found = {}
    for name in list_adapters():
        spec = get_adapter_class(name).tiny.get(name)
        if spec is not None:
            found[name] = spec
    return found


def spec_for(family: str) -> TinySpec:
    found = specs()
    if family not in found:
        raise ValueError(f"no tiny model for {family!r}; families with one: {', '.join(found)}")
    return found[family]


def family_of(model) -> str:
    """The registered model type of ``model``'s config, if it has a tiny spec."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in specs():
        raise ValueError(f"unsupported model class {type(model).__name__}")
    return model_type


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32,
               num_layers: int = NUM_LAYERS):
    """A deterministic tiny ``*ForConditionalGeneration`` model of ``family`` in eval mode."""
    return spec_for(family).build(attn_implementation, seed, dtype, num_layers)


# -- batches of prompts for a tiny model --------------------------------------------------------
def image_token_id(model) -> int:
    """The image placeholder id (``image_token_index`` on LLaVA configs, ``image_token_id`` on Qwen)."""
    config = model.config
    value = getattr(config, "image_token_id", None)
    return int(value if value is not None else config.image_token_index)


def _split(total: int, parts: int, gen: torch.Generator) -> list[int]:
    """Split ``total`` into ``parts`` chunks of at least one token each."""
    if total < parts:
        raise ValueError(f"need at least {parts} text tokens, got {total}")
    cuts = sorted(torch.randperm(total - 1, generator=gen)[: parts - 1].add(1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def tiny_batch(model, images_per_prompt=(1, 1), padding_side: str = "left", seed: int = 0,
               text_lengths=None) -> tuple[dict, list[list[TinyImage]]]:
    """[`tiny_inputs`][fvlm.adapters.tiny.tiny_inputs] and, per prompt, its [`TinyImage`][fvlm.adapters.tiny.TinyImage] records."""
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    spec = spec_for(family_of(model))
    gen = torch.Generator().manual_seed(seed)
    batch = len(images_per_prompt)
    default_lengths = text_lengths is None
    if not default_lengths and len(text_lengths) != batch:
        raise ValueError("text_lengths needs one entry per prompt")
    if default_lengths:
        text_lengths = [6 + 4 * b for b in range(batch)]

    seqs, prompts, count = [], [], 0
    for b, n_images in enumerate(images_per_prompt):
        chunks = _split(text_lengths[b], n_images + 1, gen)
        seq = torch.randint(FIRST_TEXT_ID, VOCAB_SIZE, (chunks[0],), generator=gen).tolist()
        images = []
        for chunk in chunks[1:]:
            image = spec.image(count, gen, n_images)
            count += 1
            images.append(image)
            seq += image.tokens
            seq += torch.randint(FIRST_TEXT_ID, VOCAB_SIZE, (chunk,), generator=gen).tolist()
        seqs.append(seq)
        prompts.append(images)
    if default_lengths and batch > 1 and len({len(s) for s in seqs}) == 1:  # make sure there is padding
        seqs[-1] += torch.randint(FIRST_TEXT_ID, VOCAB_SIZE, (3,), generator=gen).tolist()

    width = max(len(s) for s in seqs)
    input_ids = torch.full((batch, width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for b, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        input_ids[b, cols] = torch.tensor(seq)
        attention_mask[b, cols] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **spec.extra_inputs(input_ids)}
    if count:
        inputs.update(spec.collate(prompts, model.dtype))
    return {k: v.to(model.device) for k, v in inputs.items()}, prompts


def tiny_inputs(model, images_per_prompt=(1, 1), padding_side: str = "left", seed: int = 0,
                text_lengths=None) -> dict:
    """Padded batch for ``model(**inputs)`` / ``model.generate(**inputs)``.

    Sample ``b`` holds ``images_per_prompt[b]`` images, with text before, between and after
    the image spans (``text_lengths[b]`` text tokens in all; by default 6, 10, 14, ...).
    Keys: ``input_ids``, ``attention_mask``, the family's pixel inputs when the batch has images
    (``pixel_values``, + ``image_sizes`` / ``image_grid_thw`` / ...), and what the family always needs
    (Qwen: ``mm_token_type_ids``, 1 at image tokens).
    """
    return tiny_batch(model, images_per_prompt, padding_side, seed, text_lengths)[0]


def visual_token_counts(model, inputs) -> list[int]:
    """Number of image placeholder tokens in each sample of ``inputs``."""
    return (inputs["input_ids"] == image_token_id(model)).sum(dim=-1).tolist()


# -- tokenizer and chat templates of the tiny processors -----------------------------------------
_SPECIAL = {
    "llava": ["<pad>", "<s>", "</s>", "<image>", "<video>", "<vision_start>", "<vision_end>", "<unk>"],
    "qwen": ["<pad>", "<s>", "</s>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<unk>"],
}
# Role markers of the chat templates below; plain vocabulary entries (ids >= FIRST_TEXT_ID).
_ROLE_TOKENS = ["<|im_start|>", "<|im_end|>", "USER:", "ASSISTANT:"]
# Filler words for the ids no character uses: random models emit them, and readable words make
# the gibberish easier to look at. They start with a space so decoded text stays word-separated.
_FILLER = "yes no a b c d red blue green one two three cat dog man car the of in on it is".split() + [
    c + v for c in "bdfgklmnprstvz" for v in "aeiou"
]

LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(family: str):
    """A character-level ``PreTrainedTokenizerFast`` over the tiny models' 256-token vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = _SPECIAL["qwen" if family.startswith("qwen") else "llava"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]  # 97 characters incl. space, \t, \n
    words = list(_ROLE_TOKENS) + chars
    vocab = {tok: i for i, tok in enumerate(special)}
    for tok in words:
        vocab.setdefault(tok, len(vocab))
    for word in _FILLER:
        if len(vocab) < VOCAB_SIZE:
            vocab.setdefault(f" {word}", len(vocab))
    while len(vocab) < VOCAB_SIZE:
        vocab[f"<t{len(vocab)}>"] = len(vocab)
    assert len(vocab) == VOCAB_SIZE and vocab[special[3]] == IMAGE_ID

    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    model.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=special[3:7] + _ROLE_TOKENS, padding_side="left",
        model_max_length=512,
    )
    return tok


def tiny_clip(vision_width: int, seed: int = 0):
    """``(CLIPModel, tokenizer)``: a random tiny CLIP whose image projection takes ``vision_width``-wide
    patch features (a backbone's vision tower width), with a character-level tokenizer that adds
    ``<|startoftext|>`` / ``<|endoftext|>`` (the largest id, so the text tower pools at EOS under
    transformers' legacy rule for ``eos_token_id=2`` configs, as for the OpenAI checkpoints). No hub;
    CDPruner's auxiliary model in tests (``text_model: "tiny:clip"``)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {c: i for i, c in enumerate(dict.fromkeys(chars))}
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos], vocab[eos] = len(vocab), len(vocab) + 1
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eos))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]),
                                                                                                   (eos, vocab[eos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token=eos,
                                        model_max_length=77)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=2,
                         bos_token_id=vocab[bos], pad_token_id=0),
        vision_config=dict(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model.eval(), tokenizer
