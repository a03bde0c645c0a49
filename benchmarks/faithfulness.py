"""Measured effect of every difference between fvlm and the authors' code (docs/faithfulness.md).

On a random LLaVA with LLaVA-1.5's layout (576 visual tokens at offset 35, 17 decoder layers; one
random prompt and image per seed), each entry compares two settings that differ in exactly one
rule and reports how many kept tokens (or greedy answers) change:

- the rules fvlm now follows vs what it did before: SparseVLM one layer early, DART's pivots in
  position order, VisionZip without the CLS token, PIO-FVLM with original positions;
- fvlm's deliberate deviations (bug fixes of the official code): batching, FastV's duplicated
  KV-cache entries (lmms-eval drop-in), SparseVLM's random density jitter, float32 scoring;
- SparseVLM's computed vs printed layer averages and SparseVLM+'s gravity sign on LLaVA-1.5-7B.

    python benchmarks/faithfulness.py --prompts 10 --json docs/benchmarks/faithfulness.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import fvlm
from fvlm.selectors import sparsevlm as sparsevlm_module
from fvlm.selectors.algorithms import max_min_diversity, nms_fill
from fvlm.selectors.dart import DART
from fvlm.selectors.diversity import DivPrune, VisionZip
from fvlm.selectors.fastv import FastV
from fvlm.selectors.pio_fvlm import PIOFVLM
from fvlm.selectors.sparsevlm import SparseVLM, recycled_clusters
from fvlm.testing import (
    LLAVA15_OFFSET,
    llava15_layout_inputs,
    llava15_layout_model,
    llm_input_embeddings,
    sample_inputs,
)

PIO_COUNTS = {64: [92, 54, 22], 128: [218, 128, 54], 192: [344, 202, 86]}
VISIONZIP = {64: (54, 10), 128: (108, 20), 192: (162, 30)}


def selections(model, selector, inputs, **prune_kwargs) -> list[list[list[int]]]:
    """Per stage, per sample: the kept indices (in the selection's order)."""
    seen, inner = [], selector.select

    def recording(ctx):
        out = inner(ctx)
        idx = out.indices if isinstance(out, fvlm.Selection) else out
        seen.append([[i for i in row if i >= 0] for row in idx.tolist()])
        return out

    selector.select = recording
    with fvlm.prune(model, selector, **prune_kwargs), torch.no_grad():
        model(**inputs)
    return seen


def answer(model, selector, inputs, tokens: int, **prune_kwargs) -> list[int]:
    with fvlm.prune(model, selector, **prune_kwargs), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def changed(a: list[int], b: list[int]) -> int:
    """Tokens kept by one setting and not the other (sets of equal size)."""
    return len(set(a) - set(b))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------ rules fvlm follows now
def sparsevlm_placement(model, prompts, budgets):
    """The authors' stages (layer index l scores with its own attention) vs one layer early."""
    out = {}
    for budget in budgets:
        diffs = []
        for inputs in prompts:
            right = selections(model, SparseVLM(budget=budget, recycle=False), inputs)[1][0]
            early = selections(model, SparseVLM(budget=budget, layers=(2, 6, 15), recycle=False), inputs)[1][0]
            diffs.append(len(set(right) & set(early)))
        keep = sparsevlm_module.COUNTS["v1.5"][budget][0]
        out[budget] = {"stage1_kept": keep, "shared_with_one_layer_early": mean(diffs)}
    return out


def sparsevlm_averages(budgets):
    """LLaVA-1.5-7B (32 layers, 576 tokens): layer averages of the authors' stages, with / without
    recycling, as computed and as their log prints them, and of the one-layer-early stages."""
    out = {}
    for budget in budgets:
        row = {}
        for name, layers, recycle in (("authors", (3, 7, 16), False), ("authors_recycling", (3, 7, 16), True),
                                      ("one_layer_early", (2, 6, 15), False)):
            sel = SparseVLM(budget=budget, layers=layers, recycle=recycle)
            counts, n = [], torch.tensor([576])
            for stage in sel.stages(None)[1:]:
                n = sel.keep_count(stage, n, torch.tensor([576]), torch.tensor([1]))
                counts.append(int(n))
            per_layer = [576] * layers[0] + [counts[0]] * (layers[1] - layers[0]) \
                + [counts[1]] * (layers[2] - layers[1]) + [counts[2]] * (32 - layers[2])
            trace = fvlm.Trace([576], [576], [per_layer], [0] * 32)
            row[name] = {"counts": counts, "layer_average": round(trace.layer_average[0], 2),
                         "printed": round(trace.layer_average_outputs[0], 2)}
        out[budget] = row
    return out


def dart_order(model, prompts, budgets):
    out = {}
    for budget in budgets:
        diffs = []
        for inputs in prompts:
            a = selections(model, DART(keep=budget, exact_budget=False), inputs)[0][0]
            b = selections(model, DART(keep=budget, exact_budget=False, pivot_order="position"), inputs)[0][0]
            diffs.append(changed(a, b) / len(a))
        out[budget] = {"kept_tokens_changed": mean(diffs)}
    return out


def visionzip_cls(model, prompts, budgets):
    """``dominant`` counting the CLS token vs counting patches only (the contextual pool shifts)."""
    out = {}
    for budget in budgets:
        d, c = VISIONZIP[budget]
        shared = []
        for inputs in prompts:
            with_cls = selections(model, VisionZip(d, c), inputs)[0][0]
            patches_only = selections(model, VisionZip(d + 1, c), inputs)[0][0]  # d patches + CLS
            shared.append(len(set(with_cls[d:]) & set(patches_only[d + 1:])))
        out[budget] = {"contextual": c, "contextual_targets_shared": mean(shared)}
    return out


def pio_positions(model, prompts, budgets, tokens):
    out = {}
    for budget in budgets:
        differ, answers = [0, 0], 0
        for inputs in prompts:
            make = lambda: PIOFVLM(layers=[1, 10, 15], keep=PIO_COUNTS[budget])  # noqa: E731
            compact = selections(model, make(), inputs, positions="compact")
            original = selections(model, make(), inputs, positions="original")
            for s in (1, 2):
                differ[s - 1] += compact[s] != original[s]
            answers += answer(model, make(), inputs, tokens, positions="compact") != \
                answer(model, make(), inputs, tokens, positions="original")
        out[budget] = {"runs": len(prompts), "stage2_differs": differ[0], "stage3_differs": differ[1],
                       "answer_differs": answers}
    return out


# ------------------------------------------------------------ fvlm's deliberate deviations
def batching(model, seed):
    """A left-padded batch of two vs each prompt alone: picks and last-position logits."""
    batch = llava15_layout_inputs(((LLAVA15_OFFSET, 40), (30, 28)), seed=seed)
    out = {}
    for name, make in (("fastv", lambda: FastV(k=2, keep=128)), ("sparsevlm", lambda: SparseVLM(budget=128)),
                       ("dart", lambda: DART(keep=128, exact_budget=False)), ("divprune", lambda: DivPrune(keep=128)),
                       ("visionzip", lambda: VisionZip(108, 20)),
                       ("pio_fvlm", lambda: PIOFVLM(layers=[1, 10, 15], keep=PIO_COUNTS[128]))):
        together = selections(model, make(), batch)
        with fvlm.prune(model, make()), torch.no_grad():
            logits = model(**batch).logits[:, -1]
        same, delta = True, 0.0
        for b in range(2):
            single = sample_inputs(batch, b)
            alone = selections(model, make(), single)
            same &= [stage[b] for stage in together] == [stage[0] for stage in alone]
            with fvlm.prune(model, make()), torch.no_grad():
                delta = max(delta, float((model(**single).logits[0, -1] - logits[b]).abs().max()))
        out[name] = {"picks_identical": same, "max_logit_difference": delta}
    return out


def fastv_kv_duplication(eager, prompts, tokens):
    """FastV's lmms-eval drop-in appends layer K-1's prompt keys/values twice: at decode time every
    prompt key then weighs double in that layer (logit + ln 2). K=3, keep 50%."""
    k, changes, delta = 3, 0, 0.0

    def scores(inputs):
        with fvlm.prune(eager, FastV(k=k, keep=288)), torch.no_grad():
            out = eager.generate(**inputs, max_new_tokens=tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        return out.sequences[0].tolist(), torch.stack(out.scores)

    for inputs in prompts:
        length = inputs["input_ids"].shape[1]
        clean, clean_scores = scores(inputs)

        def doubled(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if kwargs["hidden_states"].shape[1] == 1 and mask is not None:
                mask = mask.clone()
                mask[..., :length] += math.log(2.0)
                kwargs["attention_mask"] = mask
            return args, kwargs

        handle = eager.model.language_model.layers[k - 1].self_attn.register_forward_pre_hook(doubled, with_kwargs=True)
        try:
            dup, dup_scores = scores(inputs)
        finally:
            handle.remove()
        changes += clean != dup
        if clean == dup:
            delta = max(delta, float((clean_scores - dup_scores).abs().max()))
    return {"runs": len(prompts), "answer_differs": changes, "tokens": tokens, "max_logit_difference": delta}


def sparsevlm_jitter(model, prompts, budgets, seeds: int = 5):
    """The authors add rand * 1e-6 to the densities of the recycled tokens (a different draw every
    call): over every recycling stage, how often does that change the clusters (the merged vectors)
    or only their order / carrier tokens, compared with fvlm's index tie-break?"""
    seen = []
    inner = sparsevlm_module.density_peak_merge

    def capture(feats, valid, n_clusters, density_noise=None):
        seen.append((feats, valid, n_clusters))
        return inner(feats, valid, n_clusters)

    sparsevlm_module.density_peak_merge = capture
    try:
        for budget in budgets:
            for inputs in prompts:
                selections(model, SparseVLM(budget=budget), inputs)
    finally:
        sparsevlm_module.density_peak_merge = inner
    clusters_changed = order_changed = 0
    gen = torch.Generator().manual_seed(0)
    for feats, valid, n_clusters in seen:
        _, centres, assign = inner(feats, valid, n_clusters)
        for _ in range(seeds):
            noise = torch.rand(valid.shape, generator=gen) * 1e-6
            _, j_centres, j_assign = inner(feats, valid, n_clusters, density_noise=noise)
            same_groups = _groups(assign[0], valid[0]) == _groups(j_assign[0], valid[0])
            clusters_changed += not same_groups
            order_changed += same_groups and not torch.equal(centres, j_centres)
    draws = len(seen) * seeds
    return {"recycling_stages": len(seen), "draws": draws, "clusters_changed": clusters_changed,
            "only_order_or_carrier_changed": order_changed}


def _groups(assign: torch.Tensor, valid: torch.Tensor) -> set:
    out = {}
    for i, a in enumerate(assign.tolist()):
        if valid[i]:
            out.setdefault(a, set()).add(i)
    return {frozenset(g) for g in out.values()}


def float32_scoring(bf16, prompts, budgets):
    """bf16 model: fvlm's float32 scores vs scores kept in bf16 (the authors' dtype)."""
    out = {}
    for budget in budgets:
        fastv, pio, div = [], [], []
        for inputs in prompts:
            inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
            # FastV: the last row of layer 1's eager attention (probabilities in bf16) -> topk
            ours = selections(bf16, FastV(k=2, keep=budget), inputs)[0][0]
            with torch.no_grad():
                probs = bf16(**inputs, output_attentions=True).attentions[1][0, :, -1]
            vis = (inputs["input_ids"][0] == 3).nonzero().flatten()
            theirs = probs[:, vis].mean(0).topk(budget).indices.tolist()
            fastv.append(changed(ours, theirs))
            # DivPrune: distances in bf16
            x = llm_input_embeddings(bf16, inputs)[0, vis]
            valid = torch.ones(1, len(vis), dtype=torch.bool)
            theirs = _max_min_in_dtype(x, budget)
            div.append(changed(max_min_diversity(x[None], valid, budget)[0].tolist(), theirs))
            # PIO-FVLM: saliency norm taken in bf16 (ties ordered by the sort) vs float32
            pio.append(_pio_bf16_norm(bf16, inputs, budget))
        out[budget] = {"fastv_tokens_changed": mean(fastv), "divprune_tokens_changed": mean(div),
                       "pio_fvlm_stages_changed": mean(p[0] for p in pio), "pio_fvlm_tokens_changed": mean(p[1] for p in pio)}
    return out


def _max_min_in_dtype(x: torch.Tensor, k: int) -> list[int]:
    """DivPrune's greedy max-min with cosine distances in the model dtype (argmax picks the first max)."""
    unit = x / x.norm(dim=-1, keepdim=True)
    dist = 1 - unit @ unit.T
    first = int(dist.fill_diagonal_(float("inf")).min(dim=1).values.argmax())
    dist.fill_diagonal_(0)
    picks = [first]
    score = dist[first].clone()
    for _ in range(k - 1):
        score[picks] = -1
        nxt = int(score.argmax())
        picks.append(nxt)
        score = torch.minimum(score, dist[nxt])
    return sorted(picks)


def _pio_bf16_norm(model, inputs, budget) -> tuple[int, int]:
    """Stages and tokens whose picks change when the saliency norm is taken in bf16."""
    class Bf16Norm(PIOFVLM):
        def saliency(self, ctx):
            grad = self.gradient(ctx)
            rows = grad.gather(1, ctx.visual_index.clamp(min=0)[..., None].expand(-1, -1, grad.shape[-1]))
            return rows.norm(dim=-1).float() * ctx.visual_valid

    ours = selections(model, PIOFVLM(layers=[1, 10, 15], keep=PIO_COUNTS[budget]), inputs)
    theirs = selections(model, Bf16Norm(layers=[1, 10, 15], keep=PIO_COUNTS[budget]), inputs)
    stages = sum(a != b for a, b in zip(ours, theirs))
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    return stages, (changed(ours[first][0], theirs[first][0]) if first is not None else 0)


def gravity_sign(head_dim: int = 128, base: float = 10000.0) -> int:
    """First token distance at which SparseVLM+'s gravity (sum of cos over RoPE frequencies) <= 0."""
    freqs = [base ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    return next(d for d in range(1, 100000) if sum(math.cos(d * f) for f in freqs) <= 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10, help="random prompts (one image each)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--tokens", type=int, default=8, help="greedy tokens per answer")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", nargs="+", help="measure these sections only (and update them in --json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, eager = llava15_layout_model(), llava15_layout_model(attn_implementation="eager")
    bf16 = llava15_layout_model(attn_implementation="eager").to(torch.bfloat16)
    prompts = [llava15_layout_inputs(((LLAVA15_OFFSET, 40),), seed=s) for s in range(args.prompts)]
    sections = {
        "sparsevlm_placement": lambda: sparsevlm_placement(model, prompts, args.budgets),
        "sparsevlm_averages_llava15_7b": lambda: sparsevlm_averages(args.budgets),
        "dart_pivot_order": lambda: dart_order(model, prompts, args.budgets),
        "visionzip_cls": lambda: visionzip_cls(model, prompts, args.budgets),
        "pio_fvlm_positions": lambda: pio_positions(model, prompts, args.budgets, args.tokens),
        "batching": lambda: batching(model, seed=0),
        "fastv_kv_duplication": lambda: fastv_kv_duplication(eager, prompts, args.tokens),
        "sparsevlm_density_jitter": lambda: sparsevlm_jitter(model, prompts, args.budgets),
        "float32_scoring": lambda: float32_scoring(bf16, prompts, args.budgets),
        "sparsevlm_plus_gravity_sign_distance": gravity_sign,
    }
    results = {"model": "llava15_layout_model(): 17 layers, hidden 128, 16 heads; 576 visual tokens at offset 35",
               "prompts": args.prompts}
    if args.only and args.json and Path(args.json).exists():
        with open(args.json) as f:
            results = json.load(f)
    for name, measure in sections.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        results[name] = measure()
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
