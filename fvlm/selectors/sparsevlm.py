"""SparseVLM: text-guided, multi-stage visual-token sparsification inside the LLM.

Paper: Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025, https://arxiv.org/abs/2410.04417 (v1.5 schedules and token recycling).

What it does:

1. Raters, once per prefill, on the LLM input embeddings (``Stage("input", 1.0)``, a keep-all
   stage that only computes them): ``R = softmax_text(V T^T)`` averaged over the visual tokens,
   where ``V`` are the visual and ``T`` the text embeddings after the image (after the sample's
   first visual token, so multi-image prompts include the text between images); raters are the
   text tokens whose relevance exceeds the mean (``1 / #text``). A sample with no such token (all
   equal, or a single text token) uses all its text tokens after the image; one with none of those
   uses its last prompt token.
2. In-LLM stages: after layers ``layers`` (default 2, 6, 15; layer ``l``'s stage prunes the output
   of layer ``l-1``, which itself saw all tokens). Score per visual token = that layer's attention
   probabilities from the rater rows, averaged over heads and over raters; the top-``keep`` stay in
   original order; text tokens always stay.

Budget: per-stage keep counts of v1.5, indexed by the layer-average target ``budget`` (for
LLaVA-1.5's 576 tokens and 32 layers): 192 -> (300, 200, 110), 128 -> (303, 110, 36),
96 -> (238, 48, 26), 64 -> (66, 30, 17). ``schedule=[(layer, keep), ...]`` overrides ``budget`` and
``layers`` (``keep``: int count, or float fraction of the original visual count). The trace
reports both the LLM-input count (unchanged) and the layer average.

Token recycling (``recycle=True``, v1.x): at each stage, among the deleted tokens the top 30% by
score (``floor(3 * deleted / 10)``) are clustered by density-peak clustering into
``floor(n / 10) + 1`` centres (:func:`fvlm.selectors.algorithms.density_peak_merge`), and each
cluster's mean replaces the hidden state of its centre token, which keeps that token's sequence
slot and position id. Budgets stay exact: the stage's ``keep`` counts kept plus merged tokens
(``kept + clusters == keep``; fvlm keeps the largest ``kept`` for which that holds).

Needs: ``Need.ATTENTION`` (rater rows x visual columns of the pruning layer, recomputed from its
q/k, so any attention kernel works) and ``Need.TEXT``.

State: the raters of the current prefill are kept on the selector instance between its stages
(set at the input stage, read by the later ones); use one instance per pruning session.

Deviations from the official code:

- Budgets are exact (the official v1.5 code adds the recycled tokens on top of the stage count).
- Recycled tokens take the slot and position of their cluster centre instead of being appended
  after the kept visual tokens (fvlm keeps sequence order and original positions).
- Density-peak ties are broken by index instead of random jitter.
- Batched with padding, no environment variables, visual tokens from token ids (no hard-coded
  576 / 664 lengths), attention rows recomputed instead of materialising full attention.
- Rater text is every text token after the first image (the official code assumes one image).
- ``recycle`` defaults to False (the plain top-k of the v1.5 schedule); SparseVLM+ (v2.0)'s head
  selection and attention-bias correction are not implemented.
"""
from __future__ import annotations

import torch

from fvlm.context import gather_rows, positions_of
from fvlm.errors import FVLMError
from fvlm.selectors.algorithms import density_peak_merge, topk_indices
from fvlm.selectors.arguments import check_int, check_keep, fail
from fvlm.selectors.base import Need, Selection, Stage, TokenSelector

#: v1.5 per-stage keep counts after layers (2, 6, 15), indexed by the layer-average budget.
V15_COUNTS: dict[int, tuple[int, int, int]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
DEFAULT_LAYERS = (2, 6, 15)


def recycle_split(num_visual: int, keep: int) -> tuple[int, int, int]:
    """``(kept, recycled, clusters)`` for one sample at a recycling stage, with ``kept + clusters == keep``.

    ``recycled = floor(3 * (num_visual - kept) / 10)`` (top 30% of the deleted), ``clusters =
    recycled // 10 + 1`` (0 when nothing is recycled); ``kept`` is the largest value that fits.
    When even ``kept = 0`` does not fit (tiny ``keep``), the clusters are capped at ``keep``.
    """

    def split(kept):
        recycled = 3 * (num_visual - kept) // 10
        return recycled, (recycled // 10 + 1 if recycled else 0)

    kept = keep
    while kept > 0 and kept + split(kept)[1] > keep:
        kept -= 1
    recycled, clusters = split(kept)
    clusters = min(clusters, keep - kept)
    return kept, (recycled if clusters else 0), clusters


class SparseVLM(TokenSelector):
    """SparseVLM (arXiv 2410.04417): visual tokens rated by the attention of relevant text tokens.

    ``budget``: layer-average target selecting a v1.5 schedule (192, 128, 96, 64); ``layers``: the
    three pruning layers those counts apply to; ``schedule``: explicit ``[(layer, keep), ...]``
    (overrides both); ``recycle``: v1.x token recycling, with exact budgets.
    """

    needs = frozenset({Need.ATTENTION, Need.TEXT})
    example_kwargs = {"schedule": [[1, 0.75], [2, 0.5], [3, 0.25]]}  # the tiny backbones have 4 layers

    def __init__(self, budget: int = 192, layers: tuple[int, ...] = DEFAULT_LAYERS,
                 schedule: list[tuple[int, int | float]] | None = None, recycle: bool = False):
        if schedule is None:
            if isinstance(budget, bool) or budget not in V15_COUNTS:
                raise fail(self, "budget", f"one of the v1.5 budgets {sorted(V15_COUNTS)} (pass "
                           "schedule=[(layer, keep), ...] for other budgets)", budget)
            if isinstance(layers, (str, bytes)) or len(layers) != 3:
                raise fail(self, "layers", "three layers (the v1.5 counts are for three stages)", layers)
            pairs = list(zip(layers, V15_COUNTS[budget]))
        else:
            pairs = [tuple(p) if isinstance(p, (list, tuple)) else (p,) for p in schedule]
            if not pairs or any(len(p) != 2 for p in pairs):
                raise fail(self, "schedule", "a non-empty list of (layer, keep) pairs", schedule)
        for layer, keep in pairs:
            check_int(self, layer, "schedule layer" if schedule is not None else "layers", minimum=1)
            check_keep(self, keep, "schedule keep" if schedule is not None else "budget")
        wheres = [layer for layer, _ in pairs]
        if wheres != sorted(set(wheres)):
            raise fail(self, "schedule" if schedule is not None else "layers", "strictly increasing layers", wheres)
        self.budget = budget
        self.layers = tuple(layers)
        self.schedule = None if schedule is None else [tuple(p) for p in schedule]
        self.recycle = recycle
        self._pairs = pairs
        self._raters: torch.Tensor | None = None  # [B, T] over each sample's text tokens, in order

    def stages(self, info):
        return [Stage("input", 1.0)] + [Stage(layer, keep) for layer, keep in self._pairs]

    # -- stage 0: raters on the input embeddings -------------------------------------------
    def _compute_raters(self, ctx) -> torch.Tensor:
        after = ctx.text_after_visual
        t_index, t_valid = positions_of(after)
        vis = ctx.visual_hidden.float()
        txt = gather_rows(ctx.hidden, t_index).float()
        logits = vis @ txt.transpose(1, 2)  # [B, N, T]
        logits = logits.masked_fill(~t_valid[:, None, :], float("-inf"))
        probs = torch.nan_to_num(logits.softmax(dim=-1), nan=0.0)  # rows with no text -> 0
        vmask = ctx.visual_valid[..., None].float()
        relevance = (probs * vmask).sum(1) / vmask.sum(1).clamp(min=1)  # [B, T]
        mean = 1.0 / t_valid.sum(1, keepdim=True).clamp(min=1)  # each softmax row sums to 1
        is_rater = t_valid & (relevance > mean)
        none = ~is_rater.any(dim=1, keepdim=True)
        is_rater = torch.where(none, t_valid, is_rater)  # fallback: all text after the image
        rows = _mask_of(torch.where(is_rater & t_valid, t_index, -1), after.shape[1])
        last = torch.zeros_like(after)
        last[torch.arange(after.shape[0], device=after.device), ctx.last_index] = True
        rows = torch.where(rows.any(dim=1, keepdim=True), rows, last)  # no text after the image
        text_index, _ = positions_of(ctx.text_valid)
        return rows.gather(1, text_index.clamp(min=0)) & (text_index >= 0)

    def _rater_rows(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """Current positions ``[B, Q]`` of the raters (text tokens are never pruned) and validity."""
        text_index, _ = positions_of(ctx.text_valid)
        if self._raters is None or self._raters.shape != text_index.shape:
            raise FVLMError("SparseVLM: no raters for this prefill (the selector's input stage did not run "
                            "on this batch); use one selector instance per pruning session")
        rows = _mask_of(torch.where(self._raters & (text_index >= 0), text_index, -1), ctx.text_valid.shape[1])
        index, valid = positions_of(rows)
        return torch.where(valid, index, ctx.last_index[:, None]), valid

    def score(self, ctx) -> torch.Tensor:
        """``[B, N]``: attention from the raters to each visual token, mean over heads and raters."""
        rows, valid = self._rater_rows(ctx)
        attn = ctx.attention(rows).mean(dim=1)  # [B, Q, N]
        w = valid.to(attn.dtype)[..., None]
        return (attn * w).sum(1) / w.sum(1).clamp(min=1)

    def select(self, ctx):
        if ctx.stage.where == "input":
            self._raters = self._compute_raters(ctx)
            n = ctx.visual_index.shape[1]
            return torch.where(ctx.visual_valid, torch.arange(n, device=ctx.hidden.device), -1)
        scores = self.score(ctx)
        if not self.recycle:
            return topk_indices(scores, ctx.visual_valid, ctx.budget)
        return self._recycled(ctx, scores)

    # -- token recycling -------------------------------------------------------------------
    def _recycled(self, ctx, scores: torch.Tensor) -> Selection:
        valid = ctx.visual_valid
        splits = [recycle_split(int(n), int(k)) for n, k in zip(ctx.num_visual.tolist(), ctx.budget.tolist())]
        device = scores.device
        kept_k, rec_k, clu_k = (torch.tensor(col, dtype=torch.long, device=device) for col in zip(*splits))
        kept = topk_indices(scores, valid, kept_k)
        kept_mask = _mask_of(kept, valid.shape[1])
        deleted = valid & ~kept_mask
        recycled = topk_indices(scores, deleted, rec_k)  # [B, R] visual indices, ascending
        r_valid = recycled >= 0
        n = valid.shape[1]
        hidden = ctx.visual_hidden
        full = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])], dim=1)  # + a sink slot
        merged_mask = torch.zeros_like(valid)
        if r_valid.any():
            centres, centre_slot, _ = density_peak_merge(gather_rows(hidden, recycled), r_valid, clu_k)
            c_valid = (centre_slot >= 0) & (clu_k[:, None] > 0)
            centre_index = torch.where(c_valid, recycled.gather(1, centre_slot.clamp(min=0)), -1)
            merged_mask = _mask_of(centre_index, n)
            target = torch.where(c_valid, centre_index, n)  # padding slots write to the sink
            full.scatter_(1, target[..., None].expand_as(centres), centres.to(full.dtype))
        index, _ = positions_of(kept_mask | merged_mask)
        return Selection(index, gather_rows(full, index))


def _mask_of(index: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` bool with the non-negative entries of ``index`` ``[B, K]`` set."""
    mask = torch.zeros(index.shape[0], n + 1, dtype=torch.bool, device=index.device)
    mask.scatter_(1, torch.where(index >= 0, index, n), True)
    return mask[:, :n]
