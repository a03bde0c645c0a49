"""Tests for the tiny models and inputs in fvlm.testing."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fvlm.adapters.tiny import spec_for  # noqa: E402
from fvlm.testing import (  # noqa: E402
    FAMILIES,
    FIRST_TEXT_ID,
    PAD_ID,
    image_token_id,
    tiny_batch,
    tiny_inputs,
    tiny_model,
    visual_token_counts,
)

ATTNS = ("eager", "sdpa")
MIXED = [(1, 1), (2, 0), (0, 2), (0, 0), (1, 2, 0)]
# visual tokens per image, in batch order (sizes/grids cycle per image), worked out by hand for some
PER_IMAGE = {
    "llava": [16, 16, 16, 16],
    "llava_next": [36, 70, 72, 88],
    "qwen2_vl": [16, 8, 24, 12],
    "qwen2_5_vl": [16, 8, 24, 12],
}

_cache = {}


def model_for(family, attn="sdpa"):
    if (family, attn) not in _cache:
        _cache[family, attn] = tiny_model(family, attn)
    return _cache[family, attn]


def _real(inputs, b):
    """Sample ``b`` of a padded batch, unpadded, as a batch of one."""
    keep = inputs["attention_mask"][b].bool()
    keys = [k for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs]
    return {k: inputs[k][b : b + 1, keep] for k in keys}


@pytest.mark.parametrize("family", FAMILIES)
def test_config_shape(family):
    model = model_for(family)
    text = model.config.get_text_config()
    assert text.num_hidden_layers == 4
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (64, 4, 2)
    assert image_token_id(model) == 3
    assert not model.training
    assert model.generation_config.do_sample is False


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_mixed_batches(family, attn, side):
    model = model_for(family, attn)
    for images in MIXED:
        inputs = tiny_inputs(model, images, padding_side=side)
        mask = inputs["attention_mask"]
        assert (mask == 0).any(), "prompts should have different lengths"
        pad_col = 0 if side == "left" else -1
        assert (mask[:, pad_col] == 0).any() and (inputs["input_ids"][mask == 0] == PAD_ID).all()
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        length = inputs["input_ids"].shape[1]
        assert out.shape == (len(images), length + 4)
        assert torch.equal(out[:, :length], inputs["input_ids"])
        assert (out[:, length:] >= FIRST_TEXT_ID).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_visual_token_counts(family):
    model = model_for(family)
    for images in MIXED + [(1, 1, 1, 1)]:
        inputs, prompts = tiny_batch(model, images)
        expected = [sum(image.visual for image in prompt) for prompt in prompts]
        if family in PER_IMAGE:
            per_image = PER_IMAGE[family]
            assert expected == [sum(per_image[sum(images[:b]) : sum(images[: b + 1])]) for b in range(len(images))]
        assert visual_token_counts(model, inputs) == expected
        with torch.no_grad():
            model(**inputs)  # the model checks placeholder count == feature count
    if family != "llava":
        assert len(set(visual_token_counts(model, tiny_inputs(model, (1, 1))))) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_layout(family):
    model = model_for(family)
    inputs = tiny_inputs(model, (2, 0, 1), text_lengths=[5, 7, 3])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    img = image_token_id(model)
    for b, n_text in enumerate([5, 7, 3]):
        real = ids[b][mask[b].bool()]
        assert (real >= FIRST_TEXT_ID).sum() == n_text
        assert real[0] >= FIRST_TEXT_ID and real[-1] >= FIRST_TEXT_ID  # text before and after images
    if family.startswith("qwen"):
        assert torch.equal(inputs["mm_token_type_ids"], (ids == img).long())
        assert inputs["image_grid_thw"].shape == (3, 3)
    if family == "llava_next":
        assert inputs["image_sizes"].shape == (3, 2)
    assert inputs["pixel_values"].dtype == model.dtype
    text_only = tiny_inputs(model, (0, 0))
    assert "pixel_values" not in text_only
    same = [tiny_inputs(model, (1, 2), seed=3)["input_ids"] for _ in range(2)]
    assert torch.equal(*same)


@pytest.mark.parametrize("family", FAMILIES)
def test_determinism(family):
    inputs = tiny_inputs(model_for(family), (1, 2))
    with torch.no_grad():
        ref = model_for(family, "sdpa")(**inputs).logits
        again = tiny_model(family, "sdpa", seed=0)(**inputs).logits
        eager = model_for(family, "eager")(**inputs).logits
        other = tiny_model(family, "sdpa", seed=1)(**inputs).logits
    assert torch.equal(ref, again)
    real = inputs["attention_mask"].bool()  # fully masked (pad) rows differ between backends
    torch.testing.assert_close(ref[real], eager[real], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ref, other)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_matches_unpadded(family, attn):
    """Left-padded generate and right-padded prefill agree with each sample run alone."""
    model = model_for(family, attn)
    images = (1, 0) if family == "llava" else (2, 1)
    left = tiny_inputs(model, images, padding_side="left")
    right = tiny_inputs(model, images, padding_side="right")
    batched = model.generate(**left, max_new_tokens=4)[:, -4:]
    with torch.no_grad():
        right_logits = model(**right).logits
    spec = spec_for(family)
    prompts = tiny_batch(model, images, padding_side="left")[1]
    for b, n in enumerate(images):
        single = _real(left, b)
        if n:
            single.update(spec.collate([prompts[b]], model.dtype))
        assert torch.equal(model.generate(**single, max_new_tokens=4)[:, -4:], batched[b : b + 1])
        with torch.no_grad():
            alone = model(**single).logits[0]
        real = right["attention_mask"][b].bool()
        torch.testing.assert_close(right_logits[b, real], alone, rtol=1e-4, atol=1e-4)
