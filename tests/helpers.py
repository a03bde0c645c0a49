"""Test-only selectors and references shared by the session tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from fvlm import Need, Stage, TokenSelector


class FixedSelector(TokenSelector):
    """Keeps given visual-token indices per sample (a list of lists), at a given stage."""

    def __init__(self, picks, where="input"):
        self.picks = picks
        self.where = where

    def stages(self, info):
        return [Stage(self.where, len(self.picks[0]))]

    def select(self, ctx):
        return torch.tensor(self.picks, dtype=torch.long, device=ctx.hidden.device)


class EveryOther(TokenSelector):
    """Multi-stage: at each stage keeps every other visual token (deterministic, prompt-independent)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def stages(self, info):
        return [Stage(where, keep) for where, keep in self.schedule]

    def select(self, ctx):
        out = torch.full((ctx.hidden.shape[0], int(ctx.budget.max())), -1, dtype=torch.long)
        for b in range(ctx.hidden.shape[0]):
            n, k = int(ctx.num_visual[b]), int(ctx.budget[b])
            picks = list(range(0, n, 2))[:k]
            picks += [i for i in range(n) if i not in picks][: k - len(picks)]
            out[b, :k] = torch.tensor(sorted(picks))
        return out


class GradientNorm(TokenSelector):
    """Scores tokens by the gradient of the hidden states' squared norm (declares GRADIENT)."""

    needs = frozenset({Need.GRADIENT})

    def stages(self, info):
        return [Stage(1, 4)]

    def select(self, ctx):
        grad = ctx.grad(lambda x: (x**2).sum())
        from fvlm.selectors.algorithms import topk_indices

        score = grad.gather(1, ctx.visual_index.clamp(min=0)[..., None].expand(-1, -1, grad.shape[-1])).norm(dim=-1)
        return topk_indices(score, ctx.visual_valid, ctx.budget)


def generation_positions(model, ids, mask, inputs):
    """Position ids exactly as ``generate`` builds them for a full (cache-free) forward."""
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    kwargs.update(attention_mask=mask, input_ids=ids)
    if "mm_token_type_ids" in inputs:
        kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    if hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None
    return model._prepare_position_ids_for_generation(ids, kwargs)


def greedy_without_cache(model, inputs, steps):
    """Greedy decoding that re-runs the whole (pruned) forward for every token, with no KV cache."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    mm = inputs.get("mm_token_type_ids")
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for _ in range(steps):
        cur = dict(inputs, input_ids=ids, attention_mask=mask)
        if mm is not None:
            cur["mm_token_type_ids"] = mm
        pos = generation_positions(model, ids, mask, cur)
        kw = dict(extra, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        if mm is not None:
            kw["mm_token_type_ids"] = mm
        logits = model(**kw).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        if mm is not None:
            mm = torch.cat([mm, torch.zeros_like(nxt)], dim=1)
    return ids


def hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(getattr(m, "_forward_hooks_with_kwargs", {})) + len(getattr(m, "_forward_pre_hooks_with_kwargs", {}))
        for m in model.modules()
    )


def reference_nms_picks(saliency, features, k: int, tau: float, nms: bool = True) -> list[int]:
    """Saliency-ordered greedy NMS then fill, for one sample, in plain Python (the spec's loop).

    Ties in saliency go to the lower index; a kept token suppresses every token whose cosine
    similarity to it is >= ``tau``; suppressed tokens fill up to ``k``. Returns sorted indices.
    """
    import torch.nn.functional as F

    n = len(saliency)
    order = sorted(range(n), key=lambda i: (-float(saliency[i]), i))
    unit = F.normalize(torch.as_tensor(features)[:n].float(), dim=-1)
    similar = (unit @ unit.T).tolist()
    kept, suppressed = [], set()
    for i in order if nms else ():
        if len(kept) == k:
            break
        if i not in suppressed:
            kept.append(i)
            suppressed |= {j for j in range(n) if similar[i][j] >= tau} | {i}
    for i in order:
        if len(kept) == k:
            break
        if i not in kept:
            kept.append(i)
    return sorted(kept)


def record(selector) -> list:
    """Wrap ``selector.select`` on the instance; the list collects every stage's Selection (or indices)."""
    calls = []
    original = selector.select

    def recording(ctx):
        out = original(ctx)
        calls.append(out)
        return out

    selector.select = recording
    return calls


def benchmark_module(name: str):
    """The script ``benchmarks/{name}.py`` imported as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
