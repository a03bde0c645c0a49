"""Rows-only PIO-FVLM proxy (``proxy="rows"``) against the full-block reference (``proxy="block"``).

- ``BackboneAdapter.rows_forward`` equals the real decoder layer's output at the asked rows (every
  family, eager and SDPA: test_family_matrix.py), and ``SelectionContext.run_layer_rows`` equals ``run_layer`` gathered at every valid row inside a
  pruning session (pruned sequences, filler slots);
- ``project_qkv`` keys / values equal what the layer writes into the real KV cache;
- saliency, the whole gradient and the picks of ``proxy="rows"`` equal ``proxy="block"`` (every
  family, eager and SDPA, left padding, two stages; float64 to 1e-10; 20 random models);
- clear errors: sliding-window layers, ``head_rows="all"`` with the rows proxy, unknown ``proxy``.
"""
from __future__ import annotations

import pytest
import torch

import fvlm
from fvlm.adapters import adapter_for
from fvlm.selectors.pio_fvlm import PIOFVLM
from fvlm.testing import FAMILIES, tiny_inputs, tiny_model

IMPLS = ("eager", "sdpa")
SCHEDULE = dict(layers=[1, 2], keep_fraction=[0.5, 0.25])  # unequal budgets: filler slots at stage 2


class Recorder(PIOFVLM):
    """Records per stage: the gradient, saliency and picks, and the proxy block on every row both ways."""

    def __init__(self, *args, check_rows=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.check_rows = check_rows
        self.records = []

    def gradient(self, ctx):
        self._gradient = super().gradient(ctx)
        return self._gradient

    def saliency(self, ctx):
        self._saliency = super().saliency(ctx)
        return self._saliency

    def select(self, ctx):
        picks = super().select(ctx)
        rec = dict(gradient=self._gradient.detach().clone(), saliency=self._saliency.detach().clone(),
                   picks=picks.clone(), token_valid=ctx.token_valid.clone())
        if self.check_rows:
            block = ctx.layer if self.proxy_block == "next" else ctx.layer - 1
            with torch.no_grad():
                rec["block"] = ctx.run_layer(block, ctx.hidden)
                every = torch.arange(ctx.hidden.shape[1])[None].expand(ctx.hidden.shape[0], -1)
                rec["rows"] = ctx.run_layer_rows(block, ctx.hidden, every)
        self.records.append(rec)
        return picks


def _run(model, inputs, **kwargs):
    rec = Recorder(**kwargs)
    with fvlm.prune(model, rec), torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return rec.records


def _close(got, expected, rel=1e-5):
    torch.testing.assert_close(got, expected, atol=rel * float(expected.abs().max()), rtol=100 * rel)


def _layer_calls(model, inputs, **call):
    """Per decoder layer, its input and keyword arguments in one plain (unpruned) forward, and the output."""
    seen, handles = [], []

    def hook(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        keep = ("attention_mask", "position_embeddings", "position_ids")
        seen.append((hidden, {k: v for k, v in kwargs.items() if k in keep}))

    for layer in model.model.language_model.layers:
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(**inputs, **call)
    finally:
        for handle in handles:
            handle.remove()
    return seen, out


class WrappedLinear(torch.nn.Module):
    """A v_proj that is not a plain nn.Linear (as a quantised layer would be): value mixing needs its rows."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_value_mixing_needs_a_plain_linear_v_proj():
    model = tiny_model("llava", attn_implementation="eager")
    adapter = adapter_for(model)
    inputs = tiny_inputs(model, images_per_prompt=(1,))
    calls, _ = _layer_calls(model, inputs)
    hidden, kwargs = calls[1]
    valid = inputs["attention_mask"].bool()
    rows = torch.tensor([[3, 7, hidden.shape[1] - 1]])
    with torch.no_grad():
        expected = adapter.rows_forward(1, hidden, kwargs["position_embeddings"], valid, rows, value_mixing=True)
        attn = adapter.layers[1].self_attn
        attn.v_proj = WrappedLinear(attn.v_proj)
        # the default falls back to the values of all rows: same output
        _close(adapter.rows_forward(1, hidden, kwargs["position_embeddings"], valid, rows), expected)
        with pytest.raises(fvlm.errors.UnsupportedModelError, match="plain nn.Linear"):
            adapter.rows_forward(1, hidden, kwargs["position_embeddings"], valid, rows, value_mixing=True)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_projected_keys_and_values_equal_the_real_kv_cache(model_cache, family):
    model = model_cache(family, "sdpa")
    adapter = adapter_for(model)
    inputs = tiny_inputs(model, images_per_prompt=(2, 1), padding_side="left")
    calls, out = _layer_calls(model, inputs, use_cache=True)
    cache = out.past_key_values
    for index, (hidden, kwargs) in enumerate(calls):
        with torch.no_grad():
            proj = adapter.project_qkv(index, hidden, kwargs["position_embeddings"], values=True, queries=False)
            keys = adapter.key_states(index, hidden, kwargs["position_embeddings"])
        assert proj.queries is None
        _close(proj.keys, cache.layers[index].keys)
        _close(proj.values, cache.layers[index].values)
        assert torch.equal(keys, proj.keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_run_layer_rows_equals_run_layer_inside_a_pruning_session(model_cache, family):
    model = model_cache(family, "sdpa")
    fillers = False
    for images in ((1, 2), (2, 1), (1, 3)):  # the first batch layout whose stage 2 has filler slots
        inputs = tiny_inputs(model, images_per_prompt=images, padding_side="left")
        records = _run(model, inputs, check_rows=True, **SCHEDULE)
        unpadded = inputs["attention_mask"].bool().all(dim=1)
        fillers = bool(unpadded.any()) and not bool(records[1]["token_valid"][unpadded].all())
        if fillers:
            break
    assert fillers, "expected filler slots"
    for r in records:
        _close(r["rows"][r["token_valid"]], r["block"][r["token_valid"]])


# -------------------------------------------------------------- the selector: rows == block
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", IMPLS)
def test_rows_proxy_equals_block_proxy(model_cache, family, attn):
    model = model_cache(family, attn)
    inputs = tiny_inputs(model, images_per_prompt=(1, 2), padding_side="left")
    rows = _run(model, inputs, **SCHEDULE)
    block = _run(model, inputs, proxy="block", **SCHEDULE)
    assert len(rows) == len(block) == 2
    for r, b in zip(rows, block, strict=True):
        assert bool(b["saliency"].max() > 0)
        _close(r["saliency"], b["saliency"])
        _close(r["gradient"], b["gradient"])
        assert torch.equal(r["picks"], b["picks"])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family,proxy_block", list(zip(FAMILIES, ["next", "current", "current", "next"])))
def test_rows_proxy_equals_block_proxy_in_float64(family, proxy_block):
    model = tiny_model(family, "sdpa", dtype=torch.float64, num_layers=3)
    inputs = tiny_inputs(model, images_per_prompt=(2, 1), padding_side="left")
    rows = _run(model, inputs, proxy_block=proxy_block, **SCHEDULE)
    block = _run(model, inputs, proxy="block", proxy_block=proxy_block, **SCHEDULE)
    for r, b in zip(rows, block, strict=True):
        assert r["gradient"].dtype == torch.float64
        _close(r["gradient"], b["gradient"], rel=1e-10)
        assert torch.equal(r["picks"], b["picks"])


class BothProxies(PIOFVLM):
    """Selects with the rows proxy; at each stage also scores and picks with the block proxy (same context)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = PIOFVLM(proxy="block", **kwargs)
        self.pairs = []

    def select(self, ctx):
        from fvlm.selectors.algorithms import nms_fill

        runs = []
        for selector in (self, self.block):
            saliency = selector.saliency(ctx)
            picks = nms_fill(saliency, ctx.visual_hidden, ctx.visual_valid, ctx.budget, self.tau, self.nms)
            runs.append((saliency, picks))
        self.pairs.append(runs)
        return runs[0][1]


def test_rows_proxy_picks_equal_block_proxy_picks_on_20_random_models():
    families = ("llava", "qwen2_vl", "qwen2_5_vl")  # LLaVA-NeXT's long sequences are covered above
    for seed in range(20):
        family, attn = families[seed % 3], IMPLS[seed // 3 % 2]
        model = tiny_model(family, attn, seed=seed, num_layers=3)
        images = ((1, 2), (2, 1), (1,), (1, 1))[seed % 4]
        inputs = tiny_inputs(model, images_per_prompt=images, padding_side=("left", "right")[seed % 2], seed=seed)
        both = BothProxies(layers=[1, 2], keep_fraction=[0.6, 0.3], tau=(0.8, 0.5)[seed % 2], k_last=1 + seed % 5)
        with fvlm.prune(model, both), torch.no_grad():
            model(**inputs, use_cache=False)
        assert len(both.pairs) == 2
        for (rows_saliency, rows_picks), (block_saliency, block_picks) in both.pairs:
            assert torch.equal(rows_picks, block_picks), seed
            _close(rows_saliency, block_saliency)


# ------------------------------------------------------------------------------------- errors
def test_sliding_window_layer_is_rejected(monkeypatch):
    """At session start (the session refuses the architecture), and by the probes themselves."""
    model = tiny_model("qwen2_vl", "sdpa")
    monkeypatch.setattr(model.model.language_model.layers[1].self_attn, "sliding_window", 8)
    with pytest.raises(fvlm.FVLMError, match="sliding-window or chunked attention in decoder layers 1 "):
        fvlm.prune(model, "pio_fvlm", layers=[1], keep=[4])
    hidden = torch.zeros(1, 3, model.config.text_config.hidden_size)
    with pytest.raises(fvlm.FVLMError, match="layer 1 uses sliding-window attention"):
        adapter_for(model).rows_forward(1, hidden, None, torch.ones(1, 3, dtype=torch.bool), torch.tensor([[2]]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(proxy="full"), "`proxy` must be one of"),
    (dict(head_rows="all"), "use proxy='block' with head_rows='all'"),
])
def test_bad_proxy_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PIOFVLM(layers=[1], keep=[1], **kwargs)
    assert PIOFVLM(layers=[1], keep=[1]).proxy == "rows"
    assert PIOFVLM(layers=[1], keep=[1], proxy="block", head_rows="all").head_rows == "all"
