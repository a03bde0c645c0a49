"""``pool`` against block means computed in plain loops, and the claim that the LLM then sees the grid
of a smaller image: with compact positions the pruned forward equals the plain model on the pooled
sequence."""
from __future__ import annotations

import pytest
import torch

import fvlm
from fvlm.testing import llm_input_embeddings
from helpers import record
from layouts import IMAGE, kept, llava15, llava15_inputs, llava_next, next_inputs, next_tokens, qwen25, qwen25_inputs


def pooled_grid(x, index, s):
    """(anchor, mean) per ``s x s`` block of a grid of positions ``index`` (a list of rows), row-major."""
    out = []
    rows, cols = len(index), len(index[0])
    for r in range(0, rows, s):
        for c in range(0, cols, s):
            cells = [index[i][j] for i in range(r, min(rows, r + s)) for j in range(c, min(cols, c + s))]
            out.append((index[r][c], sum(x[p].double() for p in cells) / len(cells)))
    return out


def check(selection, expected, b=0):
    expected = sorted(expected, key=lambda e: e[0])
    assert kept(selection, b) == [p for p, _ in expected]
    torch.testing.assert_close(selection.embeddings[b, : len(expected)].double(), torch.stack([m for _, m in expected]),
                               atol=1e-5, rtol=1e-5)


def same_as_plain_forward(model, inputs, selection, embeds, stride):
    """The compact-position pruned prefill equals the plain model on [text, pooled tokens, text]."""
    ids = inputs["input_ids"][0]
    visual = (ids == IMAGE).nonzero().flatten()
    pooled = [int(visual[p]) for p in kept(selection, 0)]
    keep = [i for i in range(len(ids)) if ids[i] != IMAGE or i in set(pooled)]
    rows = embeds.clone()
    rows[visual[kept(selection, 0)]] = selection.embeddings[0, : len(pooled)].to(rows.dtype)
    with torch.no_grad():
        plain = model(inputs_embeds=rows[keep][None], attention_mask=torch.ones(1, len(keep), dtype=torch.long)).logits
        with fvlm.prune(model, "pool", stride=stride, positions="compact"):
            pruned = model(**inputs).logits
    torch.testing.assert_close(pruned, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stride,count", [(2, 144), (3, 64), (5, 25)])
def test_llava15_blocks_and_the_smaller_grid(stride, count):
    model = llava15("sdpa", layers=2, vision_layers=2)
    inputs = llava15_inputs(seeds=(0,))
    embeds = llm_input_embeddings(model, inputs)[0]
    visual = embeds[inputs["input_ids"][0] == IMAGE]
    selector = fvlm.create_selector("pool", stride=stride)
    calls = record(selector)
    with fvlm.prune(model, selector, positions="compact") as session, torch.no_grad():
        model(**inputs)
    check(calls[0], pooled_grid(visual, [[r * 24 + c for c in range(24)] for r in range(24)], stride))
    assert session.trace.llm_input_visual == [count]
    same_as_plain_forward(model, inputs, calls[0], embeds, stride)


def test_llava_next_pools_base_and_high_resolution_grids_with_one_newline_per_row():
    model = llava_next("sdpa", hidden=64)
    inputs = next_inputs(sizes=((500, 700),))
    count, _, rows, cols = next_tokens(500, 700)
    embeds = llm_input_embeddings(model, inputs)[0]
    visual = embeds[inputs["input_ids"][0] == IMAGE]
    selector = fvlm.create_selector("pool", stride=2)
    calls = record(selector)
    with fvlm.prune(model, selector, positions="compact") as session, torch.no_grad():
        model(**inputs)
    table = [[576 + r * (cols + 1) + c for c in range(cols)] for r in range(rows)]
    expected = pooled_grid(visual, [[r * 24 + c for c in range(24)] for r in range(24)], 2) + pooled_grid(visual, table, 2)
    expected += [(576 + r * (cols + 1) + cols, visual[576 + r * (cols + 1) + cols].double())
                 for r in range(1, rows, 2)]  # the newline closing each block's last row
    check(calls[0], expected)
    assert session.trace.llm_input_visual == [144 + 17 * 24 + 17] and rows == 34 and cols == 48
    same_as_plain_forward(model, inputs, calls[0], embeds, 2)


def test_qwen25_pools_each_image_at_its_top_left_positions():
    model = qwen25("sdpa", layers=2)
    grids = ((10, 14), (7, 9))
    inputs = qwen25_inputs(grids=grids, seeds=(0, 1), after=(5, 9))
    selector = fvlm.create_selector("pool", stride=2)
    calls = record(selector)
    with fvlm.prune(model, selector) as session, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
    with torch.no_grad():
        merged = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    start = 0
    for b, (h, w) in enumerate(grids):
        check(calls[0], pooled_grid(merged[start: start + h * w], [[r * w + c for c in range(w)] for r in range(h)], 2), b)
        start += h * w
    assert session.trace.llm_input_visual == [5 * 7, 4 * 5]
