"""Efficiency metrics: every formula against hand-computed values, the full convention against
torch's FLOP formulas on real tiny models, KV bytes against the real cache, timers and memory."""
from __future__ import annotations

import time

import pytest
import torch

import fvlm
from fvlm.metrics import (
    MIB,
    TextArch,
    VisionArch,
    decoder_layer_flops,
    dtype_bytes,
    full_flops,
    kv_bytes,
    kv_bytes_per_token,
    kv_cache_bytes,
    layer_average,
    llm_decode_flops,
    llm_prefill_flops,
    paper_flops,
    paper_layer_flops,
    proxy_flops,
    selector_overhead_flops,
    stage_count,
    value_mixing_pays,
    vision_flops,
    visual_counts,
)
from fvlm.metrics.flops import (
    attention_flops,
    attention_rows_flops,
    key_states_flops,
    linear_flops,
    lm_head_flops,
    qwen_windows,
    similarity_flops,
    vit_layer_flops,
)
from fvlm.profiling.analytic import in_llm_overhead_flops
from fvlm.profiling.arch import text_arch, vision_arch
from fvlm.profiling.flop_counter import measure_flops
from fvlm.profiling.timing import PeakMemory, StepClock, measure_generate, time_prefill
from fvlm.selectors.base import Stage
from fvlm.adapters.llava import CLIP_IMAGE, CLIP_PATCH, LLAVA_NEXT_PINPOINTS, anyres_count
from fvlm.testing import tiny_inputs


# A small architecture whose numbers are easy to check by hand.
TINY = TextArch(num_layers=2, hidden_size=4, intermediate_size=6, num_heads=2, num_kv_heads=1, head_dim=2,
                vocab_size=10, gated_mlp=True)
VICUNA = dict(hidden=4096, intermediate=11008)


# -- paper convention -----------------------------------------------------------------------------
def test_paper_layer_flops_by_hand():
    # n=2, d=3, m=5: 4*2*9 + 2*4*3 + 2*2*3*5 = 72 + 24 + 60
    assert paper_layer_flops(2, 3, 5) == 156
    assert paper_layer_flops(2, 3, 5, mlp_matrices=3) == 72 + 24 + 90  # SparseVLM's gated count
    assert paper_layer_flops(0, 3, 5) == 0


def test_paper_flops_reproduces_the_papers_columns():
    # 576 visual tokens, Vicuna-7B: per layer 4*576*4096^2 + 2*576^2*4096 + 2*576*4096*11008
    per_layer = 38_654_705_664 + 2_717_908_992 + 51_942_260_736
    assert paper_flops([576] * 32, **VICUNA) == 32 * per_layer == 2_986_076_012_544
    assert f"{paper_flops([576] * 32, **VICUNA) / 1e12:.3f}" == "2.986"
    assert f"{paper_flops([2880] * 32, **VICUNA) / 1e12:.2f}" == "16.67"
    # a schedule sums its per-layer counts: PIO-FVLM's average-64 schedule
    sched = [576] + [92] * 9 + [54] * 5 + [22] * 17
    assert paper_flops(sched, **VICUNA) == sum(paper_layer_flops(n, **VICUNA) for n in sched)


# -- full convention: building blocks --------------------------------------------------------------
def test_full_convention_blocks_by_hand():
    assert linear_flops(3, 4, 5) == 120
    assert attention_flops(3, 5, 2, 2) == 2 * (2 * 3 * 5 * 2 * 2)  # QK^T and PV
    # q 2*3*4*4=96, k+v 2*(2*3*4*2)=96, o 96, attention 240, gated MLP 3*(2*3*4*6)=432
    assert decoder_layer_flops(3, 5, TINY) == 96 + 96 + 96 + 240 + 432
    plain = TextArch(**{**TINY.to_dict(), "gated_mlp": False})
    assert decoder_layer_flops(3, 5, plain) == 96 + 96 + 96 + 240 + 288
    assert lm_head_flops(2, TINY) == 2 * 2 * 4 * 10
    assert llm_prefill_flops([3, 2], TINY) == decoder_layer_flops(3, 3, TINY) + decoder_layer_flops(2, 2, TINY)
    assert llm_decode_flops([4, 3], TINY) == decoder_layer_flops(1, 4, TINY) + decoder_layer_flops(1, 3, TINY) + 80
    with pytest.raises(ValueError, match="one value per decoder layer"):
        llm_prefill_flops([3], TINY)


def test_vision_flops_by_hand():
    clip = VisionArch(kind="clip", num_layers=1, hidden_size=4, intermediate_size=8, num_heads=2, patch_size=2,
                      image_size=4, projector=((4, 6), (6, 6)))
    # 4 patches + CLS = 5 tokens; patch embedding 2*4*(3*2*2)*4
    assert vit_layer_flops(5, clip) == 4 * (2 * 5 * 4 * 4) + 4 * 5 * 5 * 4 + 2 * (2 * 5 * 4 * 8)
    out = vision_flops(clip, [{"tiles": 1}])
    assert out == {"embed": 384, "encoder": 640 + 400 + 640, "projector": 2 * 4 * 4 * 6 + 2 * 4 * 6 * 6}
    assert vision_flops(clip, [{"tiles": 5}])["encoder"] == 5 * out["encoder"]
    qwen = VisionArch(kind="qwen", num_layers=2, hidden_size=4, intermediate_size=8, num_heads=2, patch_size=14,
                      spatial_merge_size=2, window_size=112, fullatt_layers=(1,), gated_mlp=True)
    # 12 x 8 patches -> 6 x 4 merged units, windows of 4 x 4 merged units: 16 x 4 and 8 x 4 patches
    assert qwen_windows(12, 8, qwen) == [64, 32]
    enc = vision_flops(qwen, [{"grid_thw": [1, 12, 8]}])["encoder"]
    assert enc == vit_layer_flops(96, qwen, [64, 32]) + vit_layer_flops(96, qwen, [96])


def test_selector_overhead_by_hand():
    # rows proxy, seq 5, K=2 rows, values of all rows (2 heads x 2 rows < 5 would mix: forced off here):
    # k,v on 5 rows, q/o/MLP/head on 2 rows; backward: linear x1, attention matmuls x2
    linear = 2 * (2 * 5 * 4 * 2) + 2 * 2 * 4 * 4 + 2 * 2 * 4 * 4 + 3 * (2 * 2 * 4 * 6)
    attn = 4 * 2 * 5 * 2 * 2
    head = 2 * 2 * 4 * 10
    assert proxy_flops(5, TINY, loss_rows=2, mode="rows", value_mixing=False) == 2 * (linear + head) + 3 * attn
    assert proxy_flops(5, TINY, loss_rows=2, mode="rows", value_mixing=False, backward=False) == linear + attn + head
    # value mixing: P X = 2 * 4 * 5 * 4 for heads x rows = 4 mixed inputs instead of P V, then each
    # through its head's head_dim = 2 rows of v_proj (2 * 4 * 4 * 2) instead of v_proj on all 5 rows
    mixed_linear = linear - 2 * 5 * 4 * 2 + 2 * 4 * 4 * 2
    mixed_attn = 2 * 2 * 5 * 2 * 2 + 2 * 4 * 5 * 4
    assert proxy_flops(5, TINY, loss_rows=2, mode="rows", value_mixing=True) == 2 * (mixed_linear + head) + 3 * mixed_attn
    # the default mixes when that is cheaper: never on TINY (4 mixed inputs x 4 wide > 5 rows x 2 wide values),
    # always at Vicuna-7B's shape, not for Qwen2.5-7B's 4 kv heads on a 10-token sequence
    assert not value_mixing_pays(5, 2, 4, 2, 1, 2)
    assert proxy_flops(5, TINY, loss_rows=2, mode="rows") == proxy_flops(5, TINY, loss_rows=2, value_mixing=False)
    assert value_mixing_pays(169, 4, 4096, 32, 32, 128) and value_mixing_pays(2921, 4, 4096, 32, 32, 128)
    assert not value_mixing_pays(10, 4, 3584, 28, 4, 128) and value_mixing_pays(600, 4, 3584, 28, 4, 128)
    block_linear = 2 * (2 * 5 * 4 * 2) + 2 * (2 * 5 * 4 * 4) + 3 * (2 * 5 * 4 * 6)
    block_attn = 4 * 5 * 5 * 2 * 2
    assert proxy_flops(5, TINY, loss_rows=2, mode="block") == 2 * (block_linear + head) + 3.5 * block_attn
    assert proxy_flops(5, TINY, loss_rows=2, mode="block", head_rows="all") == (
        2 * (block_linear + 2 * 5 * 4 * 10) + 3.5 * block_attn)
    assert similarity_flops(3, 4) == 72
    assert attention_rows_flops(5, TINY) == 2 * 1 * 4 * 4 + 2 * 5 * 4 * 2 + 2 * 5 * 2 * 2
    assert key_states_flops(5, TINY) == 2 * 5 * 4 * 2
    assert selector_overhead_flops([fvlm.Need.ATTENTION], 5, TINY) == attention_rows_flops(5, TINY)
    assert selector_overhead_flops(["keys"], 5, TINY) == key_states_flops(5, TINY)
    assert selector_overhead_flops(["gradient"], 5, TINY, n_visual=3, nms=True, loss_rows=2) == (
        proxy_flops(5, TINY, loss_rows=2) + similarity_flops(3, 4))
    # NMS keeping k computes the similarities of the 2k best-ranked tokens only
    assert selector_overhead_flops(["gradient"], 5, TINY, n_visual=30, kept=4, nms=True) == (
        proxy_flops(5, TINY) + similarity_flops(8, 4))
    assert selector_overhead_flops([], 5, TINY) == 0


def test_full_flops_breakdown():
    got = full_flops(TINY, [3, 2], lm_head_rows=1, overhead=7.0, batch=2)
    assert got.llm == 2 * llm_prefill_flops([3, 2], TINY)
    assert got.lm_head == 2 * 80 and got.overhead == 14 and got.vision == got.projector == 0
    assert got.total == got.llm + got.lm_head + 14 and got.model == got.total - 14


# -- full convention vs torch's FLOP formulas on real (tiny) models --------------------------------
def _measured(model, inputs, ctx=None):
    import contextlib

    with torch.no_grad(), (ctx or contextlib.nullcontext()) as session:
        _, measured = measure_flops(model, **inputs, use_cache=True, logits_to_keep=1)
    return measured, session


def _analytic(model, inputs, session=None, images=None):
    text, vision = text_arch(model.config), vision_arch(model.config)
    batch, seq = inputs["input_ids"].shape
    tokens = session.trace.prefill_length if session is not None else [seq] * text.num_layers
    over = 0.0
    if session is not None:
        over = in_llm_overhead_flops(session.selector, session.schedule, session.trace.visual_per_layer[0], tokens, text)
    # images of the whole batch at once (samples hold different images); the LLM per row x batch
    llm = full_flops(text, tokens, batch=batch, overhead=over / batch)
    return llm.total + (sum(vision_flops(vision, images).values()) if images else 0.0)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen2_vl"])
def test_full_flops_equal_measured_flops_keep_all(model_cache, family):
    model = model_cache(family)
    inputs = tiny_inputs(model, images_per_prompt=(1, 2))  # batch of 2, left padding
    measured, _ = _measured(model, inputs)
    if family == "llava":
        images = [{"tiles": 1}] * 3
    else:
        images = [{"grid_thw": g} for g in inputs["image_grid_thw"].tolist()]
    assert measured.total == _analytic(model, inputs, images=images)


def test_full_flops_llava_next_tiles(model_cache):
    model = model_cache("llava_next")
    inputs = tiny_inputs(model, images_per_prompt=(1, 2))
    measured, _ = _measured(model, inputs)
    images = [{"tiles": anyres_count(*size, LLAVA_NEXT_PINPOINTS, CLIP_IMAGE // CLIP_PATCH, CLIP_IMAGE)[2]}
              for size in inputs["image_sizes"].tolist()]
    assert measured.total == _analytic(model, inputs, images=images)


@pytest.mark.parametrize("selector, kwargs", [
    ("random", dict(keep=6, layer=2, seed=0)),
    ("fastv", dict(k=2, keep=6)),
    ("pio_fvlm", dict(layers=[1, 3], keep=[8, 4])),
    ("pio_fvlm", dict(layers=[1, 3], keep=[5, 2])),  # NMS on 2k < N best-ranked tokens
    ("pio_fvlm", dict(layers=[1, 3], keep=[8, 4], proxy="block")),
])
def test_full_flops_equal_measured_flops_pruned(model_cache, selector, kwargs):
    """In-LLM pruning (per-layer lengths from the trace) and the selector's own work (attention rows,
    PIO-FVLM's proxy forward + backward and NMS similarities) counted exactly."""
    if selector not in fvlm.list_selectors():
        pytest.skip(f"{selector} not registered")
    try:
        sel = fvlm.create_selector(selector, **kwargs)
    except Exception as exc:  # e.g. an option another version of the selector does not have
        pytest.skip(f"{selector}{kwargs}: {exc}")
    model = model_cache("llava")
    inputs = tiny_inputs(model, images_per_prompt=(1,))
    measured, session = _measured(model, inputs, fvlm.prune(model, sel))
    assert measured.total == _analytic(model, inputs, session, images=[{"tiles": 1}])


def test_measure_flops_by_module(model_cache):
    model = model_cache("llava")
    inputs = tiny_inputs(model, images_per_prompt=(1,))
    measured, _ = _measured(model, inputs)
    text = text_arch(model.config)
    seq = inputs["input_ids"].shape[1]
    assert measured.module("model.language_model") == llm_prefill_flops([seq] * text.num_layers, text)
    assert measured.module("lm_head") == lm_head_flops(1, text)
    assert sum(measured.by_op.values()) == measured.total


# -- KV cache ----------------------------------------------------------------------------------
def test_kv_formulas_by_hand():
    assert kv_bytes_per_token(32, 32, 128, 2) == 524_288 == MIB // 2  # Vicuna-7B fp16: 0.5 MiB
    assert kv_bytes_per_token(28, 4, 128, 2) == 57_344  # Qwen2.5-7B bf16 (GQA, 4 KV heads)
    assert kv_bytes([3, 2], num_kv_heads=2, head_dim=4, bytes_per_element=2, batch=3) == 3 * (2 * 2 * 4 * 2) * 5
    assert kv_bytes([636] * 32, 32, 128, 2) / MIB == 318.0  # the PIO-FVLM table's keep-all figure
    assert dtype_bytes(torch.float16) == dtype_bytes("bf16") == 2 and dtype_bytes("float32") == 4
    with pytest.raises(ValueError):
        dtype_bytes("float7")


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_kv_bytes_equal_the_real_cache(model_cache, family):
    model = model_cache(family)
    inputs = tiny_inputs(model, images_per_prompt=(1, 2))
    with torch.no_grad(), fvlm.prune(model, "random", keep=5, layer=2, seed=0) as session:
        out = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True)
    cache = out.past_key_values
    by_hand = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                  for layer in cache.layers)
    assert kv_cache_bytes(cache) == by_hand
    lengths = {layer.keys.shape[2] for layer in cache.layers}
    assert len(lengths) == 2  # the prune after layer 2 made later layers shorter
    info = session.info
    analytic = kv_bytes(session.trace.kv_length, info.num_kv_heads, info.head_dim, dtype_bytes(model.dtype),
                        batch=inputs["input_ids"].shape[0])
    assert analytic == by_hand
    legacy = tuple((layer.keys, layer.values) for layer in cache.layers)
    assert kv_cache_bytes(legacy) == by_hand
    with pytest.raises(TypeError):
        kv_cache_bytes(object())


# -- visual-token accounting -------------------------------------------------------------------
def test_visual_counts_and_layer_average():
    counts = visual_counts([Stage(1, 218), Stage(10, 128), Stage(15, 54)], 32, 576)
    assert counts.per_layer == (576,) + (218,) * 9 + (128,) * 5 + (54,) * 17
    assert counts.layer_average == 128.0 and counts.llm_input == 576
    assert visual_counts([Stage(1, 92), Stage(10, 54), Stage(15, 22)], 32, 576).layer_average == 64.0
    enc = visual_counts([Stage("vision", 96), Stage(16, 32)], 32, 576)
    assert enc.llm_input == 96 and enc.layer_average == 64.0
    assert visual_counts([Stage("input", 0.25)], 4, 576).per_layer == (144,) * 4
    assert stage_count(0.001, 576) == 1 and stage_count(7, 576) == 7
    # one rule for fractions: half to even (Python's round) or truncation (FastV's lmms-eval drop-in)
    assert Stage(1, 0.5).count(torch.tensor([577, 579, 0])).tolist() == [288, 290, 0]
    assert Stage(1, 0.5, rounding="floor").count(torch.tensor([577, 579])).tolist() == [288, 289]
    assert [int(Stage(1, 0.25, r).count(7)) for r in ("round", "floor")] == [2, 1]
    assert fvlm.create_selector("fastv", keep=0.5, rounding="floor").stages(None) == [Stage(2, 0.5, "floor")]
    with pytest.raises(ValueError, match="rounding"):
        Stage(1, 0.5, rounding="ceil")
    assert layer_average([1, 2, 3]) == 2
    with pytest.raises(ValueError, match="only 64 remain"):
        visual_counts([Stage("input", 64), Stage(2, 100)], 4, 576)
    with pytest.raises(ValueError, match="out of range"):
        visual_counts([Stage(4, 10)], 4, 576)


def test_visual_counts_match_the_session_trace(model_cache):
    model = model_cache("llava", "sdpa", 8)
    inputs = tiny_inputs(model, images_per_prompt=(1,))
    stages = [Stage("input", 12), Stage(2, 8), Stage(5, 3)]

    class Schedule(fvlm.TokenSelector):
        def stages(self, info):
            return stages

        def select(self, ctx):
            from fvlm.selectors.algorithms import uniform_indices

            return uniform_indices(ctx.num_visual, ctx.budget)

    with torch.no_grad(), fvlm.prune(model, Schedule()) as session:
        model(**inputs)
    counts = visual_counts(stages, 8, 16)
    assert list(counts.per_layer) == session.trace.visual_per_layer[0]
    assert counts.layer_average == session.trace.layer_average[0]


# -- measured timing and memory ------------------------------------------------------------------
def test_step_clock_and_generate_timing(model_cache):
    model = model_cache("llava")
    inputs = tiny_inputs(model, images_per_prompt=(1, 1))
    with torch.no_grad(), StepClock(model) as clock:
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
    steps = clock.steps()
    assert len(steps) == 4  # one prefill + 3 decode steps
    assert all(0 <= a <= b <= clock.total for a, b in steps)
    assert all(steps[i][1] <= steps[i + 1][0] for i in range(3))

    timing = measure_generate(model, inputs, max_new_tokens=4, repeats=2, warmup=1,
                              context=lambda: fvlm.prune(model, "random", keep=4))
    assert timing.batch == 2 and timing.new_tokens == 4 and len(timing.runs) == 2
    assert all(r["steps"] == 4 for r in timing.runs)
    assert 0 < timing.prefill <= timing.ttft <= timing.end_to_end
    assert timing.decode_per_token > 0
    assert timing.throughput == pytest.approx(2 / timing.end_to_end)
    assert timing.tokens_per_second == pytest.approx(8 / timing.end_to_end)
    assert timing.to_dict()["device"] == "cpu"

    prefill = time_prefill(model, inputs, repeats=3, warmup=1)
    assert len(prefill.seconds) == 3 and prefill.minimum <= prefill.median


def test_step_clock_measures_elapsed_time():
    sleeper = torch.nn.Module()
    sleeper.forward = lambda: time.sleep(0.05)
    with StepClock(sleeper, torch.device("cpu")) as clock:
        sleeper()
    ((start, end),) = clock.steps()
    assert end - start >= 0.05 and clock.total >= end
    with StepClock(sleeper, torch.device("cpu"), clock="cpu") as cpu:  # thread CPU time: sleeping is free
        sleeper()
    ((start, end),) = cpu.steps()
    assert end - start < 0.04
    with pytest.raises(ValueError, match="clock must be one of"):
        StepClock(sleeper, clock="gpu")


def test_peak_memory_sees_a_temporary_allocation():
    with PeakMemory("cpu") as mem:
        block = torch.ones(64 * MIB // 4)  # 64 MiB, touched
        del block
    reading = mem.reading
    assert reading.kind == "rss"
    if reading.scope == "block":  # Linux with a resettable high-water mark
        assert reading.peak_increase >= 60 * MIB
    assert reading.peak >= reading.start
