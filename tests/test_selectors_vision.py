"""VisionZip, DivPrune and Compose against references computed independently in the test."""
from __future__ import annotations

import pytest
import torch

import fvlm
from fvlm.selectors.algorithms import max_min_diversity
from fvlm.testing import tiny_inputs, tiny_model
from helpers import lm_input as _lm_input
from helpers import record as _record


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_visionzip_matches_eager_attention_maps(attn):
    dominant, contextual = 5, 3
    eager = tiny_model("llava", attn_implementation="eager")
    model = tiny_model("llava", attn_implementation=attn)  # same weights (same seed)
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    layer = eager.config.vision_config.num_hidden_layers + eager.config.vision_feature_layer
    with torch.no_grad():
        vis = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    cls_attn = vis.attentions[layer][:, :, 0, 1:].sum(dim=1)  # [images, 16]
    feats = vis.hidden_states[eager.config.vision_feature_layer][:, 1:]  # pre-projector, CLS dropped
    block = eager.model.vision_tower.encoder.layers[layer]
    keys = block.self_attn.k_proj(block.layer_norm1(vis.hidden_states[layer]))
    keys = keys.view(*keys.shape[:2], block.self_attn.num_heads, -1).mean(dim=2)[:, 1:]
    embeds = _lm_input(eager, inputs)

    selector = fvlm.create_selector("visionzip", dominant=dominant, contextual=contextual)
    calls = _record(selector)
    with fvlm.prune(model, selector), torch.no_grad():
        model(**inputs)
    got = calls[0]
    images = [[0], [1, 2]]
    visual = inputs["input_ids"] == model.config.image_token_index
    for b, imgs in enumerate(images):
        scores = torch.cat([cls_attn[i] for i in imgs])
        sample_feats = torch.cat([feats[i] for i in imgs])
        sample_keys = torch.nn.functional.normalize(torch.cat([keys[i] for i in imgs]).float(), dim=-1)
        dom = set(scores.topk(dominant).indices.tolist())
        rest = [i for i in range(len(scores)) if i not in dom]
        stride = max(1, len(rest) // contextual)
        targets = rest[::stride][:contextual]
        assert sorted(got.indices[b].tolist()) == sorted(dom | set(targets))
        # merged tokens: target + mean of the tokens whose keys are closest to it, then the projector
        members = {t: [] for t in targets}
        for i in rest:
            if i not in targets:
                members[targets[int((sample_keys[targets] @ sample_keys[i]).argmax())]].append(i)
        rows = got.indices[b].tolist()
        for t in targets:
            merged = sample_feats[t] + (sample_feats[members[t]].mean(0) if members[t] else 0)
            expected = eager.model.multi_modal_projector(merged)
            torch.testing.assert_close(got.embeddings[b, rows.index(t)], expected, atol=1e-4, rtol=1e-4)
        positions = visual[b].nonzero().flatten()
        for d in dom:
            torch.testing.assert_close(got.embeddings[b, rows.index(d)], embeds[b, positions[d]], atol=1e-5, rtol=1e-5)


def test_visionzip_is_rejected_where_unsupported():
    with pytest.raises(fvlm.UnsupportedModelError, match="qwen2_vl is not supported"):
        fvlm.prune(tiny_model("qwen2_vl"), "visionzip")


def test_divprune_picks_max_min_diverse_input_tokens(model_cache):
    model = model_cache("llava_next", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    embeds = _lm_input(model, inputs)
    selector = fvlm.create_selector("divprune", keep=7)
    calls = _record(selector)
    with fvlm.prune(model, selector), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
    visual = inputs["input_ids"] == model.config.image_token_index
    for b in range(2):
        x = torch.nn.functional.normalize(embeds[b, visual[b]].float(), dim=-1)
        dist = 1 - x @ x.T
        first = int(dist.fill_diagonal_(float("inf")).min(dim=1).values.argmax())
        dist.fill_diagonal_(0)
        picks = [first]
        while len(picks) < 7:  # plain greedy max-min, recomputed from scratch each step
            picks.append(int(dist[:, picks].min(dim=1).values.masked_fill(torch.isin(torch.arange(len(x)), torch.tensor(picks)), -1).argmax()))
        assert calls[0][b][calls[0][b] >= 0].tolist() == sorted(picks)
    torch.testing.assert_close(calls[0], max_min_diversity(
        torch.nn.utils.rnn.pad_sequence([embeds[b, visual[b]] for b in range(2)], batch_first=True),
        torch.nn.utils.rnn.pad_sequence([torch.ones(int(visual[b].sum()), dtype=torch.bool) for b in range(2)], batch_first=True),
        torch.tensor([7, 7])))


def test_compose_runs_parts_in_one_schedule(model_cache):
    model = model_cache("llava", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    composed = fvlm.create_selector("compose", selectors=[
        {"name": "visionzip", "args": {"dominant": 6, "contextual": 2}},
        {"name": "random", "args": {"keep": 4, "layer": 2}},
    ])
    assert composed.needs == {fvlm.Need.VISION_ATTENTION}
    with fvlm.prune(model, composed) as session, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
    trace = session.trace
    assert [s.where for s in trace.stages] == ["vision", 2]
    assert trace.visual_per_layer == [[8, 8, 4, 4], [8, 8, 4, 4]]
    with pytest.raises(fvlm.FVLMError, match="both prune at 'input'"):
        fvlm.prune(model, "compose", selectors=["random", "divprune"])
