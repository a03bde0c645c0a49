"""VisionZip, DivPrune and Compose against references computed independently in the test."""
from __future__ import annotations

import pytest
import torch

import fvlm
from fvlm.selectors.algorithms import max_min_diversity
from fvlm.testing import llm_input_embeddings, tiny_inputs, tiny_model
from helpers import record as _record


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_visionzip_matches_eager_attention_maps(attn):
    """Per image: CLS + the top dominant-1 patches, contextual targets over the rest, and the LLM input
    [proj(CLS), dominant (spatial order), contextual (target order)], as the authors' code builds it."""
    dominant, contextual = 5, 3
    eager = tiny_model("llava", attn_implementation="eager")
    model = tiny_model("llava", attn_implementation=attn)  # same weights (same seed)
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    layer = eager.config.vision_config.num_hidden_layers + eager.config.vision_feature_layer
    with torch.no_grad():
        vis = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    cls_attn = vis.attentions[layer][:, :, 0, 1:].sum(dim=1)  # [images, 16]
    feats = vis.hidden_states[eager.config.vision_feature_layer]  # pre-projector, CLS at 0
    block = eager.model.vision_tower.encoder.layers[layer]
    keys = block.self_attn.k_proj(block.layer_norm1(vis.hidden_states[layer]))
    keys = keys.view(*keys.shape[:2], block.self_attn.num_heads, -1).mean(dim=2)[:, 1:]
    embeds = llm_input_embeddings(eager, inputs)
    project = eager.model.multi_modal_projector

    selector = fvlm.create_selector("visionzip", dominant=dominant, contextual=contextual)
    calls = _record(selector)
    with fvlm.prune(model, selector) as session, torch.no_grad():
        model(**inputs)
    assert session.positions == "compact"
    got = calls[0]
    visual = inputs["input_ids"] == model.config.image_token_index
    for b, imgs in enumerate([[0], [1, 2]]):
        rows = got.indices[b].tolist()
        assert len([i for i in rows if i >= 0]) == len(imgs) * (dominant + contextual)
        positions = visual[b].nonzero().flatten()
        for n, i in enumerate(imgs):
            scores = cls_attn[i]
            dom = sorted(scores.topk(dominant - 1).indices.tolist())  # + the CLS token: `dominant` tokens
            rest = [j for j in range(16) if j not in dom]
            stride = max(1, len(rest) // contextual)
            targets = rest[::stride][:contextual]
            unit = torch.nn.functional.normalize(keys[i].float(), dim=-1)
            members = {t: [] for t in targets}
            for j in rest:
                if j not in targets:
                    members[targets[int((unit[targets] @ unit[j]).argmax())]].append(j)
            block_rows = rows[n * 8:(n + 1) * 8]
            assert block_rows[1:] == [16 * n + j for j in dom + targets]  # carriers: dominant, then targets
            emb = got.embeddings[b, n * 8:(n + 1) * 8]
            torch.testing.assert_close(emb[0], project(feats[i, 0]), atol=1e-4, rtol=1e-4)  # the CLS token
            for m, d in enumerate(dom):
                torch.testing.assert_close(emb[1 + m], embeds[b, positions[16 * n + d]], atol=1e-5, rtol=1e-5)
            for m, t in enumerate(targets):
                merged = feats[i, 1 + t] + (feats[i, [1 + j for j in members[t]]].mean(0) if members[t] else 0)
                torch.testing.assert_close(emb[dominant + m], project(merged), atol=1e-4, rtol=1e-4)


def test_visionzip_is_rejected_where_unsupported():
    with pytest.raises(fvlm.UnsupportedModelError, match="qwen2_vl is not supported"):
        fvlm.prune(tiny_model("qwen2_vl"), "visionzip")


def test_divprune_picks_max_min_diverse_input_tokens(model_cache):
    model = model_cache("llava_next", "sdpa")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    embeds = llm_input_embeddings(model, inputs)
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
    assert composed.needs == {fvlm.Need.VISION_ATTENTION, fvlm.Need.GRID}
    assert composed.positions == "original"  # visionzip is compact, random original: they differ
    with fvlm.prune(model, composed) as session, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
    trace = session.trace
    assert [s.where for s in trace.stages] == ["vision", 2]
    assert trace.visual_per_layer == [[8, 8, 4, 4], [16, 16, 4, 4]]  # visionzip keeps 6 + 2 per image
    with pytest.raises(fvlm.FVLMError, match="both prune at 'input'"):
        fvlm.prune(model, "compose", selectors=["random", "divprune"])
