"""VScan: a global + local scan of vision-tower attention with merging, then last-token pruning in the LLM.

Paper: Zhang et al., "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language
Models", TMLR 2026, https://arxiv.org/abs/2505.22654 (code: Tencent/SelfEvolvingAgent, VScan/).
PIO-FVLM's encoder stage ("w/ VE" in its tables) is this scan too: ``compose`` of
[`VScanEncoder`][fvlm.selectors.vscan.VScanEncoder] and PIO-FVLM.

Encoder stage ([`VScanEncoder`][fvlm.selectors.vscan.VScanEncoder]), per vision-tower view (LLaVA-1.5: the image; LLaVA-NeXT: each
crop; Qwen: each image), keeping ``T`` tokens:

- scores from two vision layers: LLaVA, the CLS query's attention to each patch averaged over heads
  (shallow layer 5, deep layer = the one feeding the projector); Qwen2.5-VL, the attention each
  merged token receives, summed over heads and averaged over the query rows and its 4 patches
  (local: the first full-attention block, global: the last block). Recomputed from the layers'
  inputs, so the tower may run SDPA.
- local scan on the shallow map, ``n_loc = int(T * local_ratio)``: LLaVA, the grid is cut into
  ``window x window`` equal windows and each keeps its ``n_loc // window**2`` best (the remainder
  is lost, as in the official code, unless ``fill_to_budget``); Qwen, windows of ``window x window``
  merged tokens, each capped at ``ceil(n_loc / windows)``, filled by walking all tokens by score.
- global scan: the best ``T - n_loc`` of the deep map among the rest.
- merge: every dropped token is averaged into its most similar kept token (cosine of the projector /
  merger outputs), [`fvlm.selectors.algorithms.merge_into_kept`][fvlm.selectors.algorithms.merge_into_kept].
- kept tokens stay in spatial order; LLaVA-NeXT crops then follow the model's unpadding (newline
  tokens always kept: at most ``T`` per crop plus the newlines, the trace has the real count).

In-LLM stage ([`VScan`][fvlm.selectors.vscan.VScan]): after ``layer`` decoder layers, the next layer's attention from the
last prompt token (LLaVA: with rotary at the current positions; Qwen: without rotary, as their code),
averaged over heads, keeps the top ``keep`` visual tokens of the whole visual span.

Budgets: an int is a count per view (encoder) or per view of the sample (in-LLM: LLaVA-1.5's 96 then
32); a float is a fraction, ``int(f * n)``, of each view's tokens (encoder) or of the visual tokens
entering the stage (in-LLM: Qwen's 0.167 then 0.333 of the current count).

Positions: the authors renumber LLaVA tokens contiguously (``positions="compact"``) and keep Qwen's
original M-RoPE positions. Deviations: batches of any size, per image (the official code is batch-1,
one image); ties go to the lower index; scores and the merge in float32 (the official fp16 / bf16);
excluded local picks get -inf instead of a 0 written into the attention map; at least one Qwen window
per axis (the official code divides by zero below 112 px); the in-LLM stage ranks the whole visual
span (the official code only ranks the first ``image_token_list[stage]`` tokens: on LLaVA-NeXT just
the base view).
"""
from __future__ import annotations

import torch

from fvlm import budget
from fvlm.errors import UnsupportedModelError
from fvlm.metrics.flops import attention_rows_flops, cls_rows_flops, merge_flops, received_attention_flops
from fvlm.selectors.algorithms import merge_into_kept, topk_indices, window_cap_scan, window_quota_scan
from fvlm.selectors.arguments import check_int, check_keep, check_number, fail
from fvlm.selectors.base import Need, Selection, Stage, TokenSelector


def _count(keep: int | float, n: int) -> int:
    """Tokens a budget keeps of ``n``: an int count, or ``int(f * n)`` for a float fraction."""
    return min(n, keep if isinstance(keep, int) else int(keep * n))


class VScanEncoder(TokenSelector):
    """VScan's encoder stage (arXiv 2505.22654; PIO-FVLM's "w/ VE" stage): global + local scan, merge.

    ``keep``: tokens per view (int; LLaVA-1.5 96) or fraction of each view (float; Qwen2.5-VL 0.167).
    ``local_layer`` / ``global_layer``: vision layers (0-based) of the two maps; ``None`` = the
    family's (LLaVA 5 and the feature layer; Qwen2.5-VL the first full-attention block and the last
    block). ``local_ratio``: share of ``keep`` for the local scan (0.5). ``window``: LLaVA, windows
    per side (4: 6 x 6 patches on 24 x 24); Qwen, merged tokens per window side (4).
    ``fill_to_budget``: LLaVA, let the global scan take the local remainder (the official rule loses
    it when ``int(keep / 2)`` is not a multiple of ``window**2``).
    """

    needs = frozenset({Need.VISION_ATTENTION, Need.VISION_FEATURES, Need.GRID})
    example_kwargs = {"keep": 8, "local_layer": 0, "window": 2}
    positions = "compact"  # the authors' LLaVA code renumbers the kept tokens (Qwen keeps its M-RoPE ids)

    def __init__(self, keep: int | float = 96, local_layer: int | None = None, global_layer: int | None = None,
                 local_ratio: float = 0.5, window: int = 4, fill_to_budget: bool = False):
        check_keep(self, keep)
        for name, value in (("local_layer", local_layer), ("global_layer", global_layer)):
            if value is not None:
                check_int(self, value, name, minimum=0)
        local_ratio = check_number(self, local_ratio, "local_ratio", 0.0, 1.0)
        check_int(self, window, "window", minimum=1)
        if not isinstance(fill_to_budget, bool):
            raise fail(self, "fill_to_budget", "a bool", fill_to_budget)
        self.keep = keep
        self.local_layer = local_layer
        self.global_layer = global_layer
        self.local_ratio = float(local_ratio)
        self.window = window
        self.fill_to_budget = fill_to_budget

    # -- schedule --------------------------------------------------------------------------
    def _layers(self, info) -> tuple[int, int]:
        family = info.family
        if family in ("llava", "llava_next"):
            local = 5 if self.local_layer is None else self.local_layer
            deep = info.vision_feature_layer if self.global_layer is None else self.global_layer
        elif family in ("qwen2_vl", "qwen2_5_vl"):
            full = info.vision_full_attention
            if self.local_layer is None and family == "qwen2_vl":
                raise UnsupportedModelError("vscan on Qwen2-VL: give local_layer (the authors' setting is for Qwen2.5-VL)")
            local = full[0] if self.local_layer is None else self.local_layer
            deep = info.vision_layers - 1 if self.global_layer is None else self.global_layer
        else:
            raise UnsupportedModelError(f"vscan supports LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL, not {family}")
        for name, layer in (("local_layer", local), ("global_layer", deep)):
            if layer is None or not 0 <= layer < info.vision_layers:
                raise UnsupportedModelError(
                    f"vscan: {name}={layer} is not a layer of {family}'s {info.vision_layers}-layer vision tower "
                    f"(set {name} to 0..{info.vision_layers - 1})")
        return local, deep

    def vision_layers(self, info):
        return frozenset(self._layers(info))

    def _qwen(self, info) -> bool:
        return info.family.startswith("qwen")

    def view_count(self, n: int, qwen: bool) -> int:
        """Tokens one view of ``n`` keeps (the official LLaVA rule may keep fewer than the budget)."""
        keep = _count(self.keep, n)
        if keep >= n or qwen or self.fill_to_budget:
            return keep
        local = int(keep * self.local_ratio)
        return keep - local + self.window**2 * (local // self.window**2)

    def stages(self, info):
        self._layers(info)
        qwen = self._qwen(info)
        if info.family == "llava_next":
            return [Stage("vision", self.view_count(info.view_tokens, False) / info.view_tokens, exact=False)]
        if isinstance(self.keep, float):
            return [Stage("vision", self.keep, rounding="floor")]  # int(f * n) of each image
        nominal = self.view_count(info.view_tokens, qwen) if info.view_tokens else self.keep
        return [Stage("vision", nominal)]

    def keep_count(self, stage, current, original, images):
        """From counts (``fvlm profile``): per image (the stage's nominal count of one image)."""
        if isinstance(stage.keep, float):
            return stage.count(original)
        return torch.minimum(images.clamp(min=1) * stage.keep, current)

    def overhead_flops(self, info, stage, seq_len, n_visual) -> float:
        """Per view: the two vision-layer scores recomputed from their inputs (CLS rows; Qwen: the
        attention every patch receives) and the merge's similarities."""
        qwen = self._qwen(info)
        views = 1 if qwen or not info.view_tokens else max(1, n_visual // info.view_tokens)
        n = n_visual / views
        scores = received_attention_flops(4 * n, info.vision_hidden) if qwen else cls_rows_flops(n + 1, info.vision_hidden)
        return views * (2 * scores + merge_flops(n, self.view_count(int(n), qwen), info.hidden_size))

    def stage_budget(self, ctx):
        qwen = self._qwen(ctx.info)
        counts = [sum(self.view_count(v.rows * v.cols, qwen) for v in lay.views) + len(lay.unviewed)
                  for lay in ctx.layout]
        return torch.tensor(counts, dtype=torch.long, device=ctx.hidden.device)

    # -- selection -------------------------------------------------------------------------
    def scan(self, local: torch.Tensor, deep: torch.Tensor, rows: int, cols: int, qwen: bool) -> torch.Tensor:
        """Kept mask ``[rows * cols]`` of one view from its local and global maps (one score per token)."""
        n = rows * cols
        keep = _count(self.keep, n)
        if keep >= n:
            return torch.ones(n, dtype=torch.bool, device=local.device)
        n_loc = int(keep * self.local_ratio)
        if qwen:
            picked = window_cap_scan(local[None], rows, cols, self.window, n_loc)[0]
        else:
            picked = window_quota_scan(local[None], rows, cols, self.window, n_loc)[0]
        n_glob = keep - int(picked.sum()) if qwen or self.fill_to_budget else keep - n_loc
        rest = torch.where(picked, float("-inf"), deep.float())
        return picked | _topk_mask(rest, ~picked, n_glob)

    def select(self, ctx):
        qwen = self._qwen(ctx.info)
        local_layer, deep_layer = self._layers(ctx.info)
        reduce = (lambda a: a.sum(dim=0)) if qwen else (lambda a: a.mean(dim=0))
        local_maps, deep_maps = ctx.vision_attention(local_layer), ctx.vision_attention(deep_layer)
        rows_out = []
        for b, layout in enumerate(ctx.layout):
            entries = [(int(p), ctx.visual_hidden[b, p]) for p in layout.unviewed.tolist()]
            for view in layout.views:
                kept = self.scan(reduce(local_maps[view.source]), reduce(deep_maps[view.source]), view.rows, view.cols, qwen)
                merged = merge_into_kept(ctx.view_features(b, view)[None], kept[None])[0]
                cells = kept.nonzero().flatten()
                for cell, pos in zip(cells.tolist(), view.index.flatten()[cells.cpu()].tolist()):
                    if pos >= 0:
                        entries.append((pos, merged[cell]))
            rows_out.append(entries)
        return Selection.from_rows(rows_out, ctx.hidden)


def _topk_mask(scores: torch.Tensor, allowed: torch.Tensor, n: int) -> torch.Tensor:
    """Mask of the ``n`` best ``allowed`` entries of a 1-D score (ties -> lower index)."""
    picks = topk_indices(scores[None], allowed[None], n)[0]
    return torch.zeros_like(allowed).scatter(0, picks[picks >= 0], True)


class VScan(TokenSelector):
    """VScan (arXiv 2505.22654): [`VScanEncoder`][fvlm.selectors.vscan.VScanEncoder] in the vision tower, then after ``layer``
    decoder layers keep the visual tokens the last prompt token attends to most in the next layer.

    ``encoder_keep``: the encoder stage's budget (per view, see [`VScanEncoder`][fvlm.selectors.vscan.VScanEncoder]); ``layer``,
    ``keep``: the in-LLM stage (int: per view of the sample, LLaVA-1.5's 32 after layer 16; float:
    ``int(f * n)`` of the ``n`` visual tokens entering the stage, Qwen2.5-VL's 0.333 after layer 14).
    The other arguments go to the encoder stage.
    """

    example_kwargs = {"encoder_keep": 8, "layer": 2, "keep": 4, "local_layer": 0, "window": 2}
    positions = "compact"  # the authors' LLaVA code renumbers the kept tokens (Qwen keeps its M-RoPE ids)

    def __init__(self, encoder_keep: int | float = 96, layer: int = 16, keep: int | float = 32,
                 local_layer: int | None = None, global_layer: int | None = None, local_ratio: float = 0.5,
                 window: int = 4, fill_to_budget: bool = False):
        check_int(self, layer, "layer", minimum=1)
        check_keep(self, keep)
        check_keep(self, encoder_keep, "encoder_keep")
        self.encoder = VScanEncoder(encoder_keep, local_layer, global_layer, local_ratio, window, fill_to_budget)
        self.encoder_keep = encoder_keep
        self.layer = layer
        self.keep = keep
        self.local_layer, self.global_layer = local_layer, global_layer
        self.local_ratio, self.window, self.fill_to_budget = local_ratio, window, fill_to_budget
        self.needs = self.encoder.needs | {Need.ATTENTION}

    @classmethod
    def for_average(cls, average, info, original, **params):
        """The authors' LLaVA-1.5 schedule (96 from the encoder, 32 after layer 16 of 32: average 64)
        scaled: encoder 1.5x and LLM stage 0.5x the average (the spec's labelled guess beyond 64; exact
        on 32 layers with the stage after layer 16)."""
        budget.check_average(average, original)
        return {**params, "encoder_keep": int(round(1.5 * average)), "layer": 16, "keep": int(round(0.5 * average))}

    @classmethod
    def budget_parameter(cls):
        return "encoder_keep + keep"

    def vision_layers(self, info):
        return self.encoder.vision_layers(info)

    def stages(self, info):
        (encoder,) = self.encoder.stages(info)
        if isinstance(self.keep, float):  # int(f * n) of the n visual tokens entering the stage
            return [encoder, Stage(self.layer, self.keep, rounding="floor")]
        if info.family == "llava_next":  # nominal: per crop of the 2,880-token count
            return [encoder, Stage(self.layer, min(1.0, self.keep / info.view_tokens))]
        return [encoder, Stage(self.layer, self.keep)]

    def keep_count(self, stage, current, original, images):
        """From counts (``fvlm profile``): the encoder's; then ``int(f * current)`` or ``keep`` per image."""
        if stage.where == "vision":
            return self.encoder.keep_count(stage, current, original, images)
        if isinstance(self.keep, float):
            return stage.count(current)
        if isinstance(stage.keep, float):
            return torch.minimum(stage.count(original), current)
        return torch.minimum(images.clamp(min=1) * self.keep, current)

    def overhead_flops(self, info, stage, seq_len, n_visual) -> float:
        """The encoder stage's (see [`VScanEncoder`][fvlm.selectors.vscan.VScanEncoder]), then one recomputed last-token attention row."""
        if stage.where == "vision":
            return self.encoder.overhead_flops(info, stage, seq_len, n_visual)
        return attention_rows_flops(seq_len, info)

    def stage_budget(self, ctx):
        if ctx.stage.where == "vision":
            return self.encoder.stage_budget(ctx.for_selector(self.encoder))
        now = ctx.num_visual
        if isinstance(self.keep, float):
            return ctx.stage.count(now)
        views = torch.tensor([len(lay.views) for lay in ctx.layout], device=now.device)
        return (views.clamp(min=1) * self.keep).minimum(now)

    def select(self, ctx):
        if ctx.stage.where == "vision":
            return self.encoder.select(ctx.for_selector(self.encoder))
        scores = ctx.attention(layer="next", rotary=not ctx.info.mrope).mean(dim=1)[:, 0]
        return topk_indices(scores, ctx.visual_valid, ctx.budget)
