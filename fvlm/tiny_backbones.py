"""Built-in tiny backbones: a random tiny model from :mod:`fvlm.testing` plus a real processor.

``tiny_processor(family)`` builds, without the hub, the same processor classes the real
checkpoints use (``LlavaProcessor``, ``LlavaNextProcessor``, and for Qwen ``Qwen2VLProcessor`` /
``Qwen2_5_VLProcessor`` subclassed only to leave out their video processor, which needs
torchvision) around a character-level tokenizer whose special ids follow
:mod:`fvlm.testing` (0 pad, 1 bos, 2 eos, 3 image, 4 video, 5 vision start, 6 vision end) and
image processors configured to the tiny vision towers (32 px CLIP tiles with 8 px patches;
Qwen patches of 4 px merged 2x2). The placeholder counts the processor writes are exactly the
counts the tiny model's vision tower produces, so ``generate`` runs on real images.

In recipes, ``backbone.path: "tiny:<family>"`` selects one of these (no download); generated
text is gibberish (random weights) but every code path of a real run is exercised.
"""
from __future__ import annotations

import string

from fvlm import testing

TINY_PREFIX = "tiny:"

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

_LLAVA_TEMPLATE = (
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
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def parse_tiny(path: str) -> str | None:
    """The family of a ``"tiny:<family>"`` backbone path, or ``None`` for any other path."""
    if not path.startswith(TINY_PREFIX):
        return None
    family = path[len(TINY_PREFIX):]
    if family not in testing.FAMILIES:
        raise ValueError(f"unknown tiny backbone {path!r}; expected one of "
                         f"{', '.join(TINY_PREFIX + f for f in testing.FAMILIES)}")
    return family


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
        if len(vocab) < testing.VOCAB_SIZE:
            vocab.setdefault(f" {word}", len(vocab))
    while len(vocab) < testing.VOCAB_SIZE:
        vocab[f"<t{len(vocab)}>"] = len(vocab)
    assert len(vocab) == testing.VOCAB_SIZE and vocab[special[3]] == testing.IMAGE_ID

    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    model.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=special[3:7] + _ROLE_TOKENS, padding_side="left",
        model_max_length=512,
    )
    return tok


def tiny_processor(family: str):
    """The processor matching ``fvlm.testing.tiny_model(family)``, built without the hub."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
        Qwen2VLImageProcessorPil,
    )

    if family not in testing.FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {testing.FAMILIES}")
    tokenizer = tiny_tokenizer(family)
    side = testing.CLIP_IMAGE
    clip = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                do_center_crop=True)
    llava = dict(patch_size=testing.CLIP_PATCH, vision_feature_select_strategy="default",
                 num_additional_image_tokens=1, chat_template=_LLAVA_TEMPLATE)
    if family == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(**clip), tokenizer=tokenizer, **llava)
    if family == "llava_next":
        image = LlavaNextImageProcessorPil(**clip, image_grid_pinpoints=testing.LLAVA_NEXT_PINPOINTS)
        return LlavaNextProcessor(image_processor=image, tokenizer=tokenizer, **llava)
    factor = testing.QWEN_PATCH * 2
    image = Qwen2VLImageProcessorPil(
        patch_size=testing.QWEN_PATCH, temporal_patch_size=testing.QWEN_TEMPORAL_PATCH, merge_size=2,
        size={"shortest_edge": 4 * factor * factor, "longest_edge": 12 * factor * factor},
    )
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    cls = image_only_class(Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor)
    return cls(image_processor=image, tokenizer=tokenizer, chat_template=_QWEN_TEMPLATE)


def image_only_class(base: type) -> type:
    """``base`` (a processor class) without its video processor.

    transformers' Qwen video processors need torchvision, which fvlm does not install, and fvlm
    only feeds images. ``ProcessorMixin`` takes its sub-processors from ``__init__``'s parameter
    names, so a subclass whose ``__init__`` drops ``video_processor`` loads and saves without it.
    The class is cached as the module attribute ``_ImageOnly<base name>`` (picklable).
    """
    name = f"_ImageOnly{base.__name__}"
    cls = globals().get(name)
    if cls is None:
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
        globals()[name] = cls
    return cls


def __getattr__(name: str):  # resolves pickled image-only processor classes
    if name.startswith("_ImageOnly"):
        import transformers

        return image_only_class(getattr(transformers, name[len("_ImageOnly"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_processor_without_video(path: str, **kwargs):
    """A checkpoint's processor loaded without its video processor, or ``None`` if it has none.

    The fallback of :class:`~fvlm.lightning.module.BackboneSpec` when ``AutoProcessor`` fails to
    build a video processor (Qwen-VL without torchvision).
    """
    import inspect
    import json

    from transformers.models.auto.processing_auto import processor_class_from_name
    from transformers.utils import cached_file

    name = None
    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        resolved = cached_file(path, fname, _raise_exceptions_for_missing_entries=False,
                               revision=kwargs.get("revision"))
        if resolved:
            with open(resolved, encoding="utf-8") as fh:
                name = json.load(fh).get("processor_class")
            if name:
                break
    cls = processor_class_from_name(name.removeprefix("_ImageOnly")) if name else None
    if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
        return None
    return image_only_class(cls).from_pretrained(path, **kwargs)


def tiny_backbone(family: str, attn_implementation: str = "sdpa", dtype=None, seed: int = 0,
                  num_layers: int = testing.NUM_LAYERS):
    """``(model, processor)`` for a built-in tiny backbone."""
    import torch

    model = testing.tiny_model(family, attn_implementation=attn_implementation, seed=seed,
                               dtype=dtype or torch.float32, num_layers=num_layers)
    return model, tiny_processor(family)


def tiny_clip(vision_width: int, seed: int = 0):
    """``(CLIPModel, tokenizer)``: a random tiny CLIP whose image projection takes ``vision_width``-wide
    patch features (a backbone's vision tower width), with a character-level tokenizer that adds
    ``<|startoftext|>`` / ``<|endoftext|>`` (the largest id, so the text tower pools at EOS under
    transformers' legacy rule for ``eos_token_id=2`` configs, as for the OpenAI checkpoints). No hub;
    CDPruner's auxiliary model in tests (``text_model: "tiny:clip"``)."""
    import torch
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
