"""Qwen3-VL's DeepStack under pruning: the vision rows it adds after decoder layers 0 and 1 follow
their visual tokens when a stage prunes before its last DeepStack layer.

Reference: the language model's own modules run by hand, layer by layer, on the sequence sliced
after layer 0, with DeepStack's rows of the kept visual tokens added after layers 0 and 1 as the
model's ``_deepstack_process`` does.
"""
from __future__ import annotations

import pytest
import torch

import fvlm
from fvlm import testing
from fvlm.adapters import adapter_for
from helpers import FixedSelector, generation_positions
from test_family_matrix import lm_inputs


def _causal(length: int, dtype) -> torch.Tensor:
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_deepstack_rows_follow_tokens_pruned_before_the_last_deepstack_layer(model_cache, attn):
    model = model_cache("qwen3_vl", attn)
    lm = adapter_for(model).language_model
    inputs = testing.tiny_inputs(model, images_per_prompt=(2,))
    ids = inputs["input_ids"]
    positions = generation_positions(model, ids, inputs["attention_mask"], inputs)
    seen = lm_inputs(model, inputs, positions)
    rows = seen["deepstack_visual_embeds"]
    assert len(rows) == 2 and len(lm.layers) == 4
    visual = (ids[0] == testing.IMAGE_ID).nonzero().flatten()
    picks = sorted(torch.randperm(len(visual), generator=torch.Generator().manual_seed(1))[:9].tolist())

    with fvlm.prune(model, FixedSelector([picks], where=1)) as session, torch.no_grad():
        pruned = model(**inputs, position_ids=positions).logits[0]
    assert session.trace.visual_per_layer == [[len(visual), 9, 9, 9]]

    keep = torch.tensor(sorted(set(range(ids.shape[1])) - set(visual.tolist()) | set(visual[picks].tolist())))
    is_visual = seen["visual_pos_masks"][0]
    row_of = torch.cumsum(is_visual.long(), 0) - 1
    pos = seen["position_ids"]
    text_pos, rope_pos = (pos[0], pos[1:]) if pos.shape[0] == 4 else (None, pos)
    with torch.no_grad():
        hidden = seen["inputs_embeds"]
        cos, sin = lm.rotary_emb(hidden, rope_pos)
        for i, layer in enumerate(lm.layers):
            if i == 1:  # the stage: keep the text and the picked visual tokens
                hidden, cos, sin, is_visual, row_of = (hidden[:, keep], cos[:, keep], sin[:, keep], is_visual[keep],
                                                       row_of[keep])
                text_pos = None if text_pos is None else text_pos[:, keep]
            mask = _causal(hidden.shape[1], hidden.dtype) if attn == "eager" else None
            out = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=text_pos)
            hidden = out[0] if isinstance(out, tuple) else out
            if i < len(rows):
                hidden = hidden.clone()
                hidden[0, is_visual] = hidden[0, is_visual] + rows[i][row_of[is_visual]]
        expected = model.lm_head(lm.norm(hidden))[0]
    torch.testing.assert_close(pruned, expected, atol=2e-4, rtol=1e-4)

