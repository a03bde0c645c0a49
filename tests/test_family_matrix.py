"""The family matrix: every oracle on every registered backbone family, eager and SDPA.

``fvlm.testing.FAMILIES`` follows the adapter registry (each adapter provides the tiny model of its
families), so a new family is tested here with no test edit. Inputs are a padded batch whose second
prompt shows two images. The oracles:

- keep-all under a session reproduces unpruned ``generate`` token for token (stages at the LLM
  input and after layer 2, left and right padding);
- cached decoding after multi-stage pruning equals recomputing the pruned forward without a cache;
- pruning at the LLM input with fixed picks equals the plain language model on the sliced inputs
  (original positions; Qwen3-VL's DeepStack rows sliced with them);
- attention rows recomputed from a layer's q/k (its q/k norms included) equal the model's own eager
  attention probabilities;
- the rows-only layer proxy equals the full decoder layer at every valid row;
- the image grids the adapter reports equal the tiny spec's (the spatial layout selectors use).
"""
from __future__ import annotations

import re

import pytest
import torch

import fvlm
from fvlm import testing
from fvlm.adapters import adapter_for
from helpers import EveryOther, FixedSelector, generation_positions, greedy_without_cache

FAMILIES = testing.FAMILIES
ATTNS = ("eager", "sdpa")
IMAGES = (1, 2)


def _generate(model, inputs, steps=4, **kw):
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, **kw)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_reproduces_unpruned_generate(model_cache, family, attn):
    model = model_cache(family, attn)
    for side in ("left", "right"):
        inputs = testing.tiny_inputs(model, images_per_prompt=IMAGES, padding_side=side)
        reference = _generate(model, inputs)
        for where in ("input", 2):
            with fvlm.prune(model, "keep_all", layer=where) as session:
                pruned = _generate(model, inputs)
            assert torch.equal(pruned, reference), (side, where)
            assert session.trace.original_visual == session.trace.llm_input_visual


SCHEDULES = {"layer2": [(2, 5)], "multi": [("input", 10), (1, 6), (2, 3)]}  # multi: before DeepStack's last layer


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_recomputing_without_cache(model_cache, family, attn):
    model = model_cache(family, attn)
    inputs = testing.tiny_inputs(model, images_per_prompt=IMAGES, padding_side="left")
    for name, schedule in SCHEDULES.items():
        with fvlm.prune(model, EveryOther(schedule)) as session, torch.no_grad():
            cached = _generate(model, inputs, steps=5)
            trace = session.trace
            reference = greedy_without_cache(model, inputs, steps=5)
        assert torch.equal(cached, reference), name
        assert trace.decode_steps == 4


def lm_inputs(model, inputs, positions):
    """What the unpruned language model receives (embeddings after the image splice, extras)."""
    seen = {}
    handle = adapter_for(model).language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, position_ids=positions)
    finally:
        handle.remove()
    return seen


def sliced_lm_kwargs(seen, b, keep):
    """Sample ``b``'s language-model inputs at positions ``keep``: embeddings, positions (last axis)
    and DeepStack's per-visual-token rows (Qwen3-VL) of the kept visual positions."""
    kwargs = dict(inputs_embeds=seen["inputs_embeds"][b : b + 1, keep],
                  position_ids=seen["position_ids"][..., b : b + 1, :][..., keep],
                  attention_mask=torch.ones(1, len(keep), dtype=torch.long))
    where = seen.get("visual_pos_masks")
    if where is not None:
        row = torch.cumsum(where.flatten().long(), 0).view(where.shape) - 1  # each visual position's row
        kept = where[b, keep]
        kwargs["visual_pos_masks"] = kept[None]
        kwargs["deepstack_visual_embeds"] = [rows[row[b, keep][kept]] for rows in seen["deepstack_visual_embeds"]]
    return kwargs


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_input_pruning_equals_plain_model_on_sliced_inputs(model_cache, family, attn):
    """Fixed picks at the LLM input, original positions: the logits of slicing by hand."""
    model = model_cache(family, attn)
    adapter = adapter_for(model)
    inputs = testing.tiny_inputs(model, images_per_prompt=IMAGES, padding_side="left")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = generation_positions(model, ids, mask, inputs)
    visual = ids == testing.image_token_id(model)
    gen = torch.Generator().manual_seed(0)
    picks = [sorted(torch.randperm(int(visual[b].sum()), generator=gen)[:5].tolist()) for b in range(2)]
    seen = lm_inputs(model, inputs, positions)

    with fvlm.prune(model, FixedSelector(picks)), torch.no_grad():
        pruned = model(**inputs, position_ids=positions).logits

    for b in range(2):
        real = mask[b].nonzero().flatten()
        vis_pos = visual[b].nonzero().flatten()
        keep = torch.tensor(sorted(set(real.tolist()) - set(vis_pos.tolist()) | set(vis_pos[picks[b]].tolist())))
        with torch.no_grad():
            hidden = adapter.language_model(**sliced_lm_kwargs(seen, b, keep)).last_hidden_state
            expected = model.lm_head(hidden)[0]
        got = pruned[b, -len(keep):]  # left padding: the kept real tokens end the row
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def layer_calls(model, inputs):
    """Per decoder layer: its input and keyword arguments in one plain forward, and the output."""
    seen, handles = [], []

    def hook(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        keep = ("attention_mask", "position_embeddings", "position_ids")
        seen.append((hidden, {k: v for k, v in kwargs.items() if k in keep}))

    for layer in adapter_for(model).layers:
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=False, output_attentions=model.config._attn_implementation == "eager")
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_rows_equal_eager_probabilities(model_cache, family, attn):
    """Rows recomputed on the ``attn`` model equal the eager model's own ``output_attentions``."""
    model = model_cache(family, attn)
    adapter = adapter_for(model)
    inputs = testing.tiny_inputs(model, images_per_prompt=IMAGES, padding_side="left")
    valid = inputs["attention_mask"].bool()
    _, eager = layer_calls(model_cache(family, "eager"), inputs)
    calls, _ = layer_calls(model, inputs)
    every = torch.arange(valid.shape[1])[None].expand(valid.shape[0], -1)
    for index, (hidden, kwargs) in enumerate(calls):
        with torch.no_grad():
            rows = adapter.attention_rows(index, hidden, kwargs["position_embeddings"], valid, every)
        expected = eager.attentions[index]
        for b in range(valid.shape[0]):
            torch.testing.assert_close(rows[b][:, valid[b]], expected[b][:, valid[b]].float(), atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_rows_proxy_equals_the_full_block(model_cache, family, attn):
    """``rows_forward`` at every row (values mixed from the inputs or not) equals the decoder layer."""
    model = model_cache(family, attn)
    adapter = adapter_for(model)
    inputs = testing.tiny_inputs(model, images_per_prompt=IMAGES, padding_side="left")
    valid = inputs["attention_mask"].bool()
    calls, _ = layer_calls(model, inputs)
    every = torch.arange(valid.shape[1])[None].expand(valid.shape[0], -1)
    gen = torch.Generator().manual_seed(0)
    for index, (hidden, kwargs) in enumerate(calls):
        with torch.no_grad():
            out = adapter.layers[index](hidden, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            scale = float(out[valid].abs().max())
            # a few random valid rows per sample (repeats allowed)
            picks = torch.stack([row.nonzero().flatten()[torch.randint(int(row.sum()), (5,), generator=gen)]
                                 for row in valid])
            for rows, where in ((every, valid), (picks, torch.ones_like(picks, dtype=torch.bool))):
                expected = out.gather(1, rows[..., None].expand(-1, -1, out.shape[-1]))
                for mixing in (None, False, True):  # values as P v_proj(X) or as v_proj(P X)
                    got = adapter.rows_forward(index, hidden, kwargs["position_embeddings"], valid, rows,
                                               value_mixing=mixing)
                    torch.testing.assert_close(got[where], expected[where], atol=1e-5 * scale, rtol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_grids_are_the_layout_of_the_visual_tokens(model_cache, family):
    """Per sample, offsets / lengths / rows x cols of every grid equal what the tiny images hold,
    in prefill under ``generate`` (grids recorded from the vision tower where the prompt lacks them)."""
    model = model_cache(family, "sdpa")
    inputs, prompts = testing.tiny_batch(model, images_per_prompt=(2, 0, 1), padding_side="left")
    expected = []
    for images in prompts:
        grids, offset = [], 0
        for length, rows, cols in (g for image in images for g in image.grids):
            assert rows * cols <= length
            grids.append(fvlm.adapters.ImageGrid(offset, length, rows, cols))
            offset += length
        expected.append(grids)
    seen = []

    class Grids(fvlm.TokenSelector):
        needs = frozenset({fvlm.Need.GRID})

        def stages(self, info):
            return [fvlm.Stage("input", 1.0)]

        def select(self, ctx):
            seen.append(ctx.grids)
            return torch.stack([torch.arange(ctx.visual_index.shape[1])] * ctx.hidden.shape[0]).masked_fill(
                ~ctx.visual_valid, -1)

    with fvlm.prune(model, Grids()), torch.no_grad():
        _generate(model, inputs, steps=1)
    assert seen == [expected]
    assert [sum(g.length for g in row) for row in expected] == testing.visual_token_counts(model, inputs)


# ------------------------------------------------------------ architectures fvlm refuses
def _text(**changes):
    return dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, **changes)


def _gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    return Gemma3ForConditionalGeneration._from_config(
        Gemma3Config(text_config=_text(sliding_window=8), vision_config=vision, mm_tokens_per_image=4))


def _gemma4():
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16)
    return Gemma4ForConditionalGeneration._from_config(
        Gemma4Config(text_config=_text(sliding_window=8, global_head_dim=32), vision_config=vision))


def _qwen3_5():
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4)
    return Qwen3_5ForConditionalGeneration._from_config(Qwen3_5Config(text_config=_text(), vision_config=vision))


def _mistral3_with_a_window(model_cache):
    from fvlm.adapters.tiny import spec_for

    config = spec_for("mistral3").config()
    config.text_config.sliding_window = 8
    return type(model_cache("mistral3"))._from_config(config)


UNSUPPORTED = {
    "gemma3": (_gemma3, [r"Gemma3ForConditionalGeneration \(model_type='gemma3'\)",
                         r"sliding-window or chunked attention in decoder layers 0, 1, 2, 3 \(masks per layer type"]),
    "gemma4": (_gemma4, [r"Gemma4ForConditionalGeneration \(model_type='gemma4'\)", "sliding-window",
                         r"decoder layers of different shapes \(head_dim 16, .* head_dim 32"]),
    "qwen3_5": (_qwen3_5, [r"Qwen3_5ForConditionalGeneration \(model_type='qwen3_5'\)",
                           r"linear attention in decoder layers 0, 1, 2 \("]),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_architectures_are_refused_at_session_start(name):
    build, patterns = UNSUPPORTED[name]
    model = build()
    for selector in ("keep_all", "fastv", "pio_fvlm"):
        with pytest.raises(fvlm.UnsupportedModelError) as exc:
            fvlm.prune(model, selector)
        message = str(exc.value)
        assert message.startswith("fvlm cannot prune ") and "\n" not in message
        for pattern in patterns:
            assert re.search(pattern, message), (pattern, message)
    with pytest.raises(fvlm.UnsupportedModelError, match="could not be pruned anyway"):
        fvlm.adapters.adapter_class_for_config(model.config)  # before loading a checkpoint's weights


def test_a_supported_family_with_sliding_windows_is_refused(model_cache):
    model = _mistral3_with_a_window(model_cache)
    with pytest.raises(fvlm.UnsupportedModelError, match=r"Mistral3ForConditionalGeneration .*sliding-window or "
                                                          r"chunked attention in decoder layers 0, 1, 2, 3 "):
        fvlm.prune(model, "fastv")
    with pytest.raises(fvlm.UnsupportedModelError, match="cannot prune mistral3 checkpoints like this one"):
        fvlm.adapters.adapter_class_for_config(model.config)
