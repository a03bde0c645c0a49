"""SparseVLM (v1.5) and SparseVLM+ (v2.0): text-guided, multi-stage visual-token sparsification.

Paper: Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025, https://arxiv.org/abs/2410.04417 (v1.5 schedules and token recycling; the
authors' ``main`` branch adds SparseVLM+ as ``USE_VERSION=2_0``).

What it does, as the authors' code runs it:

1. Raters, once per prefill, on the LLM input embeddings (``Stage("input", 1.0)``, a keep-all
   stage that only computes them): ``R = softmax_text(V T^T)`` averaged over the visual tokens,
   where ``V`` are the visual and ``T`` the text embeddings after the image (after the sample's
   first visual token, so multi-image prompts include the text between images); raters are the
   text tokens whose relevance exceeds the mean relevance. A sample with no such token (all equal,
   or a single text token) uses all its text tokens after the image; one with none of those uses
   its last prompt token (the authors' code would average zero rows: NaN).
2. Stages. The authors' ``pruning_loc = [2, 6, 15]`` are 0-based indices of layers that run on all
   current tokens, score with **their own** attention and have **their output** pruned. In fvlm's
   "after ``l`` decoder layers" counting these are ``layers=(3, 7, 16)`` (the default): the stage
   after 3 layers scores with the attention probabilities of layer index 2. Score per visual token
   = attention from the rater rows, averaged over heads and raters; the top ``keep`` stay, capped
   at one below the current visual count (the authors' ``min(k, v - 1)``); text tokens stay.
3. Token recycling (v1.5, on by default like the authors' code): of the ``d`` tokens deleted at a
   stage, the top ``int(0.3 * d) + 1`` by score are clustered by density-peak clustering into
   ``C = int(m / 10) + 1`` centres (``m`` = the recycled count; kNN density over the ``C`` nearest
   tokens including the token itself, [`fvlm.selectors.algorithms.density_peak_merge`][fvlm.selectors.algorithms.density_peak_merge]); each
   cluster's mean is **appended after the kept visual tokens** (centre order). The stage therefore
   holds ``keep + C`` visual tokens (192 -> 309 / 204 / 113 on LLaVA-1.5).
4. SparseVLM+ (``version="v2.0"``): before the head mean, the rater -> visual attention is divided by
   the "gravity" of RoPE (all-ones queries and keys rotated to the same positions, dot product over
   ``sqrt(head_dim)``: [`fvlm.context.SelectionContext.rope_bias`][fvlm.context.SelectionContext.rope_bias]), and only the ``heads``
   heads (14) with the largest summed corrected rater -> visual attention are averaged. Its own
   counts, no recycling, original position ids.

Budget: per-stage keep counts indexed by the layer-average target ``budget`` (LLaVA-1.5's 576
tokens and 32 layers). v1.5: 192 -> (300, 200, 110), 128 -> (303, 110, 36), 64 -> (66, 30, 17) and
the ``USE_VERSION=1_0`` row 96 -> (238, 48, 26); v2.0: 192 -> (300, 200, 118), 128 -> (238, 108, 60),
96 -> (246, 54, 28), 64 -> (66, 34, 20). ``schedule=[(layer, keep), ...]`` overrides ``budget`` and
``layers`` (``keep``: int count, or float fraction of the original visual count). With recycling
the layer average exceeds the nominal budget (206.50 / 145.41 / 82.25 for 192 / 128 / 64); the
authors' log prints 192.03 / 128.62 / 64.81 because it counts each pruning layer at its post-prune
size. fvlm's trace reports both (``layer_average`` and ``layer_average_outputs``).

Positions: v1.5 renumbers the kept tokens contiguously (``positions = "compact"``), v2.0 keeps the
original ids; a session's ``positions=`` overrides either.

Needs: ``Need.ATTENTION`` (rater rows x visual columns of the pruning layer, recomputed from its
q/k, so any attention kernel works) and ``Need.TEXT``.

State: the raters of the current prefill are kept on the selector instance between its stages
(set at the input stage, read by the later ones); use one instance per pruning session.

Deviations from the official code (bug fixes, each measured in ``docs/faithfulness.md``):

- batched with padding, no environment variables, visual tokens from token ids (no hard-coded
  576 / 664 lengths), attention rows recomputed instead of materialising full attention;
- scores, raters, gravity and clustering in float32 (the authors: the model dtype);
- density-peak ties go to the better-scored recycled token instead of random jitter (their results
  change with the global seed), score ties to the lower index (``torch.topk`` leaves them unspecified);
- the rater text is every text token after the first image (the official code assumes one image).
"""
from __future__ import annotations

import torch

from fvlm.context import gather_rows, positions_of
from fvlm.errors import FVLMError
from fvlm.selectors.algorithms import density_peak_merge, topk_indices
from fvlm.selectors.arguments import check_int, check_keep, fail
from fvlm.selectors.base import Need, Selection, Stage, TokenSelector

#: Per-stage keep counts after ``DEFAULT_LAYERS``, indexed by the layer-average budget.
COUNTS: dict[str, dict[int, tuple[int, int, int]]] = {
    "v1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "v2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
AUTHORS_PRUNING_LOC = (2, 6, 15)  # 0-based indices of the layers whose output is pruned
DEFAULT_LAYERS = tuple(i + 1 for i in AUTHORS_PRUNING_LOC)  # the same stages, "after n layers"
PRIORITY_HEADS = 14  # SparseVLM+: heads kept by summed rater -> visual attention


def _version(owner, value) -> str:
    """``"v1.5"`` / ``"v2.0"`` from that spelling, a bare ``"1.5"`` or a number (YAML reads 2.0 as one)."""
    try:
        key = f"v{float(str(value).removeprefix('v')):.1f}" if not isinstance(value, bool) else None
    except ValueError:
        key = None
    if key not in COUNTS:
        raise fail(owner, "version", "one of " + ", ".join(repr(v) for v in COUNTS), value)
    return key


def recycled_clusters(deleted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(recycled, clusters)`` per sample for ``deleted`` tokens: ``m = int(0.3 * d) + 1`` and
    ``C = int(m / 10) + 1`` as in the authors' code, both 0 when nothing is deleted."""
    deleted = torch.as_tensor(deleted, dtype=torch.long)
    recycled = torch.where(deleted > 0, (deleted.double() * 0.3).floor().long() + 1, 0)
    clusters = torch.where(recycled > 0, recycled // 10 + 1, 0)
    return recycled, clusters


class SparseVLM(TokenSelector):
    """SparseVLM (arXiv 2410.04417): visual tokens rated by the attention of relevant text tokens.

    ``budget``: layer-average target selecting the version's schedule (192, 128, 96, 64);
    ``layers``: the three stages those counts apply to, after that many decoder layers (default
    3, 7, 16 = the authors' pruning layers 2, 6, 15, 0-based); ``schedule``: explicit
    ``[(layer, keep), ...]`` (overrides both); ``recycle``: token recycling (default: on for v1.5,
    like the authors' code; v2.0 has none); ``version``: ``"v1.5"`` or ``"v2.0"`` (SparseVLM+);
    ``heads``: heads SparseVLM+ keeps.
    """

    needs = frozenset({Need.ATTENTION, Need.TEXT})
    positions = "compact"
    example_kwargs = {"schedule": [[1, 0.75], [2, 0.5], [3, 0.25]]}  # the tiny backbones have 4 layers

    def __init__(self, budget: int = 192, layers: tuple[int, ...] = DEFAULT_LAYERS,
                 schedule: list[tuple[int, int | float]] | None = None, recycle: bool | None = None,
                 version: str = "v1.5", heads: int = PRIORITY_HEADS):
        version = _version(self, version)
        if recycle is None:
            recycle = version == "v1.5"
        if recycle and version == "v2.0":
            raise fail(self, "recycle", "False for SparseVLM+ (version 'v2.0' has no token recycling)", recycle)
        check_int(self, heads, "heads", minimum=1)
        if schedule is None:
            if isinstance(budget, bool) or budget not in COUNTS[version]:
                raise fail(self, "budget", f"one of the {version} budgets {sorted(COUNTS[version])} (pass "
                           "schedule=[(layer, keep), ...] for other budgets)", budget)
            if isinstance(layers, (str, bytes)) or len(layers) != 3:
                raise fail(self, "layers", "three layers (the counts are for three stages)", layers)
            pairs = list(zip(layers, COUNTS[version][budget]))
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
        self.version = version
        self.heads = heads
        if version == "v2.0":
            self.positions = "original"
        self._pairs = pairs
        self._raters: torch.Tensor | None = None  # [B, T] over each sample's text tokens, in order

    def stages(self, info):
        return [Stage("input", 1.0)] + [Stage(layer, keep) for layer, keep in self._pairs]

    # -- budgets ---------------------------------------------------------------------------
    def kept(self, stage: Stage, current: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """Tokens kept by score at ``stage``: its count, capped at ``current - 1`` (the authors' rule)."""
        cap = torch.where(current > 1, current - 1, current)
        return torch.minimum(stage.count(original).to(current.device), cap)

    def keep_count(self, stage, current, original, images):
        if stage.where == "input":
            return current
        kept = self.kept(stage, current, original)
        return kept + recycled_clusters(current - kept)[1] if self.recycle else kept

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
        tmask = t_valid.float()
        mean = (relevance * tmask).sum(1, keepdim=True) / tmask.sum(1, keepdim=True).clamp(min=1)
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
        """``[B, N]``: attention from the raters to each visual token, mean over (priority) heads and raters."""
        rows, valid = self._rater_rows(ctx)
        attn = ctx.attention(rows)  # [B, H, Q, N]
        both = (valid[:, :, None] & ctx.visual_valid[:, None, :])[:, None]
        if self.version == "v2.0":
            attn = torch.where(both, attn / ctx.rope_bias(rows)[:, None], 0)
            top = attn.sum((2, 3)).topk(min(self.heads, attn.shape[1]), dim=1).indices  # [B, heads]
            attn = attn.gather(1, top[:, :, None, None].expand(-1, -1, *attn.shape[2:]))
        attn = torch.where(both, attn, 0).mean(dim=1)  # [B, Q, N]
        return attn.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)

    def select(self, ctx):
        if ctx.stage.where == "input":
            self._raters = self._compute_raters(ctx)
            n = ctx.visual_index.shape[1]
            return torch.where(ctx.visual_valid, torch.arange(n, device=ctx.hidden.device), -1)
        scores = self.score(ctx)
        kept = topk_indices(scores, ctx.visual_valid, self.kept(ctx.stage, ctx.num_visual, ctx.original_visual))
        if not self.recycle:
            return kept
        return self._recycled(ctx, scores, kept)

    # -- token recycling -------------------------------------------------------------------
    def _recycled(self, ctx, scores: torch.Tensor, kept: torch.Tensor) -> Selection:
        """The kept tokens, then one merged token per cluster of the best deleted ones (centre order)."""
        valid = ctx.visual_valid
        deleted = valid & ~_mask_of(kept, valid.shape[1])
        recycled_k, clusters_k = recycled_clusters(deleted.sum(1))
        recycled = _by_score(scores, deleted, recycled_k)  # [B, R] best first, like the authors' topk
        hidden = ctx.visual_hidden
        merged, centre_slot, _ = density_peak_merge(gather_rows(hidden, recycled), recycled >= 0, clusters_k)
        centre_slot = torch.where(clusters_k[:, None] > 0, centre_slot, -1)
        carriers = torch.where(centre_slot >= 0, recycled.gather(1, centre_slot.clamp(min=0)), -1)
        index = torch.cat([kept, carriers], dim=1)  # -1 gaps are moved to the end by the session
        return Selection(index, torch.cat([gather_rows(hidden, kept), merged.to(hidden.dtype)], dim=1))


def _by_score(scores: torch.Tensor, allowed: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` indices of the top-``k[b]`` ``allowed`` tokens in descending score (ties -> lower index)."""
    s = torch.where(allowed, scores.float(), float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    width = int(k.max()) if k.numel() else 0
    top = order[:, :width]
    return torch.where(torch.arange(width, device=k.device)[None, :] < k[:, None], top, -1)


def _mask_of(index: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` bool with the non-negative entries of ``index`` ``[B, K]`` set."""
    mask = torch.zeros(index.shape[0], n + 1, dtype=torch.bool, device=index.device)
    mask.scatter_(1, torch.where(index >= 0, index, n), True)
    return mask[:, :n]
