"""Model-independent, batched tensor algorithms behind the token selectors.

Conventions shared by every function:

- Visual tokens arrive padded: ``x [B, N, D]`` with ``valid [B, N]`` (``False`` = padding, never chosen).
- Budgets are per sample, ``k: LongTensor [B]`` (an ``int`` is broadcast); ``k`` is clamped to
  ``[0, valid.sum(1)]``.
- Index outputs are ``LongTensor [B, K]`` with ``K`` = the largest per-sample count, each row sample
  ``b``'s indices into ``N`` in ascending (spatial) order, padded with ``-1``.
- Ties always go to the lower index. Similarities and distances are computed in float32.
- Everything stays on the input device; the only host syncs are the ones that fix an output width or a
  greedy loop length (``int(k.max())``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from fvlm.indexing import gather_seq

Budget = Union[int, torch.Tensor]
_SIM_MAX = 2**26  # entries of the [B, m, m] similarity block nms_fill may hold (256 MiB in float32)

__all__ = [
    "topk_indices",
    "nms_fill",
    "max_min_diversity",
    "dart_pivots",
    "dart_select",
    "density_peak_merge",
    "cls_dominant_and_contextual",
    "uniform_indices",
    "dpp_greedy_map",
    "window_quota_scan",
    "window_cap_scan",
    "merge_into_kept",
    "block_pool",
]


# ----------------------------------------------------------------------------------------- helpers
def _arange(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device)


def _budget(k: Budget, n_valid: torch.Tensor) -> torch.Tensor:
    """Per-sample budget as a LongTensor [B] on n_valid's device, clamped to [0, n_valid]."""
    k = torch.as_tensor(k, device=n_valid.device, dtype=torch.long).expand_as(n_valid)
    return torch.minimum(k.clamp(min=0), n_valid)


def _max(x: torch.Tensor) -> int:
    return int(x.max()) if x.numel() else 0


def _order(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Permutation [B, N]: valid slots by descending score (ties -> lower index, NaN last), then invalid."""
    s = scores.float()
    s = torch.where(valid & ~torch.isnan(s), s, s.new_tensor(-math.inf))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    invalid_first = (~valid).gather(1, order).to(torch.uint8)
    return order.gather(1, torch.sort(invalid_first, dim=1, stable=True).indices)


def _take_first(order: torch.Tensor, allowed: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Mask [B, N] of the first n[b] slots of ``order`` (a permutation) that are ``allowed``."""
    allowed_sorted = allowed.gather(1, order)
    take_sorted = allowed_sorted & (allowed_sorted.cumsum(1) <= n[:, None])
    return torch.zeros_like(allowed).scatter(1, order, take_sorted)


def _mask_to_indices(mask: torch.Tensor, width: Optional[int] = None) -> torch.Tensor:
    """Selected slots of ``mask [B, N]`` as ascending indices [B, width], padded with -1."""
    B, N = mask.shape
    width = _max(mask.sum(1)) if width is None else width
    pos = torch.where(mask, _arange(N, mask), N).sort(dim=1).values[:, :width]
    if width > N:
        pos = F.pad(pos, (0, width - N), value=N)
    return pos.masked_fill(pos >= N, -1)


def _first_argmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """argmax along ``dim``, ties -> lowest index (explicitly, not by kernel luck); NaN counts as -inf."""
    x = torch.where(torch.isnan(x), -math.inf, x)
    n = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = n
    idx = torch.arange(n, device=x.device).view(shape)
    return torch.where(x == x.amax(dim, keepdim=True), idx, n).amin(dim)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


# ---------------------------------------------------------------------------------------- top-k
def topk_indices(scores: torch.Tensor, valid: torch.Tensor, k: Budget) -> torch.Tensor:
    """Per-sample top-k by score (descending, ties to the lower index; NaN ranks last), returned in
    ascending index order. Used by FastV (arXiv 2403.06764), SparseVLM (2410.04417), PyramidDrop,
    and the ``nms=False`` ablation of PIO-FVLM (2602.04657).
    """
    k = _budget(k, valid.sum(1))
    order = _order(scores, valid)
    return _mask_to_indices(_take_first(order, valid, k), _max(k))


# ----------------------------------------------------------------------------- PIO-FVLM NMS + fill
def nms_fill(saliency: torch.Tensor, feats: torch.Tensor, valid: torch.Tensor, k: Budget,
             tau: float = 0.8, nms: bool = True) -> torch.Tensor:
    """PIO-FVLM (arXiv 2602.04657) selection: reorder by saliency + greedy feature-space NMS + fill.

    Walk tokens by descending saliency (ties -> lower index); skip suppressed ones; keep a token and
    suppress every j with cosine(i, j) >= tau (itself included), cosine on L2-normalised float32
    ``feats``; stop at k kept. Then fill up to k with not-yet-kept tokens in saliency order
    (suppressed ones included). Returns ascending indices. ``nms=False``: plain top-k by saliency.

    The walk is computed without a loop over picks ([`_nms_keep_by_rank`][fvlm.selectors.algorithms._nms_keep_by_rank]) on the ``m`` best-ranked
    tokens, ``m = 2k`` first: the picks lie there unless NMS suppressed more than ``k`` of them, in
    which case ``m`` doubles (one host check per round). Past ``2**26`` pairwise entries it falls
    back to one similarity row per pick ([`_nms_keep_per_pick`][fvlm.selectors.algorithms._nms_keep_per_pick], memory-bound).
    """
    if not nms:
        return topk_indices(saliency, valid, k)
    B, N = valid.shape
    k = _budget(k, valid.sum(1))
    order = _order(saliency, valid)
    valid_by_rank = valid.gather(1, order)
    v = _unit(feats)
    picks = _max(k)
    m = min(N, 2 * picks)
    kept_by_rank = None
    while picks and B * m * m <= _SIM_MAX:
        kept_by_rank = _nms_keep_by_rank(gather_seq(v, order[:, :m]), valid_by_rank[:, :m], tau)
        kept_by_rank &= kept_by_rank.cumsum(1) <= k[:, None]  # the walk stops at k picks
        short = (kept_by_rank.sum(1) < k) & (valid_by_rank[:, m:].any(1))
        if m == N or not bool(short.any()):
            break
        kept_by_rank, m = None, min(N, 2 * m)
    if kept_by_rank is None:
        m, kept_by_rank = N, _nms_keep_per_pick(v.gather(1, order[..., None].expand_as(v)), valid_by_rank, k, tau, picks)
    kept = torch.zeros_like(valid).scatter(1, order[:, :m], kept_by_rank)
    kept |= _take_first(order, valid & ~kept, k - kept_by_rank.sum(1))
    return _mask_to_indices(kept, picks)


def _nms_keep_by_rank(u: torch.Tensor, ok: torch.Tensor, tau: float) -> torch.Tensor:
    """Unbounded greedy NMS over rank-ordered unit features ``u [B, m, D]`` (``ok``: may be kept).

    Token ``a`` is kept iff ``ok[a]`` and no kept ``b < a`` has cosine(b, a) >= tau. That rule has one
    solution (by induction over ``a``); it is reached by repeating ``keep <- rule(keep)`` from
    ``keep = ok``: after round ``t`` ranks ``< t`` are final, and in practice a few rounds settle
    everything (each one a boolean ``[B, m, m]`` pass, no FLOPs; one host check per round).
    """
    suppresses = ((u @ u.transpose(1, 2)) >= tau).triu_(1)  # [b, a]: b < a suppresses a (if b is kept)
    suppressed_by = suppresses.transpose(1, 2).contiguous()  # [a, b]
    keep = ok
    for _ in range(ok.shape[1] + 1):
        new = ok & ~(suppressed_by & keep[:, None, :]).any(-1)
        if torch.equal(new, keep):
            break
        keep = new
    return keep


def _nms_keep_per_pick(u: torch.Tensor, ok: torch.Tensor, k: torch.Tensor, tau: float, picks: int) -> torch.Tensor:
    """The same walk, stopped at ``k`` picks, with one similarity row per pick (``picks`` batched steps)."""
    B, N = ok.shape
    rows = _arange(B, ok)
    kept = torch.zeros_like(ok)
    suppressed = ~ok
    count = torch.zeros_like(k)
    for _ in range(picks):
        free = ~suppressed & (count < k)[:, None]
        a = torch.where(free, _arange(N, ok), N).amin(1)  # best-ranked unsuppressed token per row
        has = a < N
        a = a.clamp(max=N - 1)
        sim = torch.bmm(u, u[rows, a][:, :, None])[..., 0]
        suppressed |= has[:, None] & (sim >= tau)
        kept[rows, a] |= has
        suppressed[rows, a] |= has
        count += has.long()
    return kept


# ----------------------------------------------------------------------------- DivPrune max-min
def max_min_diversity(feats: torch.Tensor, valid: torch.Tensor, k: Budget) -> torch.Tensor:
    """DivPrune (arXiv 2503.02175): greedy max-min diversity on the cosine distance d = 1 - cos.

    First pick: the token whose nearest-neighbour distance (to the other valid tokens; +inf for a lone
    token) is largest; each next pick: the unpicked token maximising its minimum distance to the picked
    set (running minimum, O(k N) after the N x N distance matrix). Ties -> lower index. Returns
    ascending indices. Memory: one float32 [B, N, N] matrix.
    """
    B, N = valid.shape
    k = _budget(k, valid.sum(1))
    v = _unit(feats)
    dist = 1.0 - v @ v.transpose(1, 2)
    pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(N, dtype=torch.bool, device=valid.device)
    score = torch.where(pair, dist, math.inf).amin(-1)  # nearest-neighbour distance
    rows = _arange(B, valid)
    picked = torch.zeros_like(valid)
    for t in range(_max(k)):
        active = t < k
        i = _first_argmax(torch.where(valid & ~picked, score, -math.inf))
        picked[rows, i] |= active
        score = dist[rows, i] if t == 0 else torch.minimum(score, dist[rows, i])
    return _mask_to_indices(picked, _max(k))


# ------------------------------------------------------------------------------------------- DART
def dart_pivots(vis_keys: torch.Tensor, valid: torch.Tensor, txt_keys: torch.Tensor, txt_valid: torch.Tensor,
                n_visual: Budget, n_text: Budget) -> Tuple[torch.Tensor, torch.Tensor]:
    """DART's pivots: per sample the ``n_visual`` visual and ``n_text`` text tokens with the largest L1
    norm of keys (fewer if a sample has fewer tokens), each ``[B, P]`` **in descending norm order**
    (ties -> lower index), -1 padded; the widths are ``max(n_visual)`` and ``max(n_text)``."""
    def pick(keys, mask, n):
        n = _budget(n, mask.sum(1))
        order = _order(keys.float().abs().sum(-1), mask)
        width = _max(torch.as_tensor(n))
        return torch.where(_arange(width, mask)[None, :] < n[:, None], order[:, :width], -1)

    return pick(vis_keys, valid, n_visual), pick(txt_keys, txt_valid, n_text)


def dart_select(vis_keys: torch.Tensor, vis_hidden: torch.Tensor, valid: torch.Tensor,
                txt_keys: torch.Tensor, txt_hidden: torch.Tensor, txt_valid: torch.Tensor,
                k: Budget, n_pivots_visual: int = 4, n_pivots_text: int = 4,
                exact_budget: bool = False, visit: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DART (arXiv 2502.11494): duplication-aware selection around key-norm pivots.

    Inputs are already split: visual tokens ``vis_* [B, N, .]`` / ``valid``, and the text tokens after
    the image ``txt_* [B, T, .]`` / ``txt_valid``. ``*_keys``: the layer's post-rotary keys (heads
    concatenated); ``*_hidden``: its output hidden states after the final norm.

    Pivots: [`dart_pivots`][fvlm.selectors.algorithms.dart_pivots]. Each pivot in turn moves its quota of visual tokens with the LOWEST
    cosine similarity (of the hidden states) to it out of the pool (valid, unpicked, non-pivot visual
    tokens; ties -> lower index). Visual pivots are kept, text pivots are not. Visiting order:
    ``visit [B, Pv + Pt]`` lists pivot slots (``0..Pv-1``: visual pivots in norm order, ``Pv..``: text
    pivots in norm order, ``Pv = n_pivots_visual``); default: visual pivots by ascending position,
    then text pivots by ascending position. Slots without a pivot are skipped.

    Quotas: ``exact_budget=False`` reproduces the authors' count, ``k // P`` per pivot with P the
    number of pivots, so the result holds ``Pv + P * (k // P)`` tokens (132 for k=128, 4+4 pivots).
    ``exact_budget=True`` keeps exactly k: the visual pivots are cut to ``min(Pv, k)`` (largest norms),
    and the remaining ``k - Pv`` tokens are split as evenly as possible over the P pivots, the first
    ``(k - Pv) % P`` pivots in visiting order taking one extra. Returns ascending indices into N; the
    width is the largest per-sample count.
    """
    B, N = valid.shape
    n_vis = valid.sum(1)
    k = _budget(k, n_vis)
    pv = torch.clamp(n_vis, max=n_pivots_visual)
    if exact_budget:
        pv = torch.minimum(pv, k)
    vis_piv, txt_piv = dart_pivots(vis_keys, valid, txt_keys, txt_valid, pv, n_pivots_text)
    vis_piv = F.pad(vis_piv, (0, n_pivots_visual - vis_piv.shape[1]), value=-1)
    txt_piv = F.pad(txt_piv, (0, n_pivots_text - txt_piv.shape[1]), value=-1)
    slot_piv = torch.cat([vis_piv, txt_piv], dim=1)  # [B, Pv + Pt]
    is_vis = _arange(slot_piv.shape[1], valid) < n_pivots_visual
    if visit is None:  # by position within each kind, visual first
        key = torch.where(is_vis, 0, 1)[None, :] * (N + txt_piv.shape[1] + 1) + torch.where(
            slot_piv >= 0, slot_piv, N + txt_piv.shape[1])
        visit = key.argsort(dim=1, stable=True)
    n_piv = (slot_piv >= 0).sum(1).clamp(min=1)
    vh, th = _unit(vis_hidden), _unit(txt_hidden)
    rows = _arange(B, valid)
    kept = torch.zeros(B, N + 1, dtype=torch.bool, device=valid.device)
    kept = kept.scatter(1, torch.where(vis_piv >= 0, vis_piv, N), True)[:, :N]
    pool = valid & ~kept
    rest = k - pv
    rank = torch.zeros_like(k)  # pivots visited so far
    for j in range(slot_piv.shape[1]):
        slot = visit[:, j]
        piv = slot_piv[rows, slot]
        present = piv >= 0
        if exact_budget:
            quota = rest // n_piv + (rank < rest % n_piv).long()
        else:
            quota = k // n_piv
        quota = torch.where(present, quota, 0)
        rank += present.long()
        vis_src = vh[rows, piv.clamp(min=0).clamp(max=max(N - 1, 0))] if N else vh.new_zeros(B, vh.shape[-1])
        txt_src = th[rows, piv.clamp(min=0).clamp(max=max(th.shape[1] - 1, 0))] if th.shape[1] else vis_src
        src = torch.where(is_vis[slot][:, None], vis_src, txt_src)
        sim = torch.einsum("bd,bnd->bn", src, vh)
        take = _take_first(_order(-sim, pool), pool, quota)
        kept |= take
        pool &= ~take
    return _mask_to_indices(kept)


# ------------------------------------------------------------------ SparseVLM recycling clustering
def density_peak_merge(feats: torch.Tensor, valid: torch.Tensor, n_clusters: Budget,
                       density_noise: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseVLM (arXiv 2410.04417) token recycling: density-peak clustering (DPC-kNN) and averaging,
    with the authors' rules.

    - distance: Euclidean on float32 feats divided by sqrt(D).
    - C = ``n_clusters[b]`` (clamped to [1, n_valid]); local density rho_i = exp(-mean of the squared
      distances to the C nearest valid tokens, **itself included** (distance 0)).
    - delta_i = distance to the nearest token of higher density (equal densities: the lower index
      counts as higher, replacing the authors' random jitter); the densest token gets the sample's
      largest pairwise distance.
    - centres: the top C by rho * delta, **in that order** (descending; ties -> lower index).
    - assignment: every valid token joins its nearest centre (ties -> the earlier centre); a centre
      always joins its own cluster. A merged token is the mean of its cluster.
    - ``density_noise`` ``[B, N]`` is added to the densities first (the authors add ``rand * 1e-6``;
      fvlm passes none and breaks ties by index; the option exists to measure that difference).

    Returns ``centres [B, C, D]`` (merged tokens in centre order, feats' dtype, zeros in padded
    slots), ``centre_index [B, C]`` (token index of each centre, -1 padded) and ``assignment [B, N]``
    (centre slot in 0..C-1, -1 for invalid tokens).
    """
    B, N, D = feats.shape
    x = feats.float()
    n = valid.sum(1)
    c = torch.minimum(torch.as_tensor(n_clusters, device=n.device, dtype=torch.long).expand_as(n)
                      .clamp(min=1), n)
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(D)
    idx = _arange(N, valid)
    both = valid[:, :, None] & valid[:, None, :]
    near = torch.where(both, dist, math.inf).sort(-1).values  # row i: itself (0) first
    in_knn = _arange(N, valid)[None, None, :] < c[:, None, None]
    density = torch.exp(-torch.where(in_knn, near.square(), 0).sum(-1) / c[:, None].clamp(min=1))
    if density_noise is not None:
        density = density + density_noise.to(density)
    higher = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (idx[None, :] < idx[:, None]))
    higher &= both
    dmax = torch.where(both, dist, 0).flatten(1).amax(1) if N else dist.new_zeros(B)
    delta = torch.where(higher, dist, math.inf).amin(-1)
    delta = torch.where(torch.isinf(delta), dmax[:, None], delta)
    order = _order(density * delta, valid)
    C = _max(c)
    centre_index = torch.where(_arange(C, valid)[None, :] < c[:, None], order[:, :C], -1)
    to_centre = dist.gather(2, centre_index.clamp(min=0)[:, None, :].expand(B, N, C))
    to_centre = torch.where(centre_index[:, None, :] >= 0, to_centre, math.inf)
    assign = _first_argmax(-to_centre) if C else torch.zeros_like(idx).expand(B, N)
    slot = torch.full((B, N + 1), -1, dtype=torch.long, device=valid.device)
    slot.scatter_(1, torch.where(centre_index >= 0, centre_index, N), _arange(C, valid).expand(B, C))
    assign = torch.where(slot[:, :N] >= 0, slot[:, :N], assign)  # centres join themselves
    assign = torch.where(valid, assign, -1)
    a = assign.clamp(min=0)
    w = valid.float()[..., None]
    sums = x.new_zeros(B, C, D).scatter_add_(1, a[..., None].expand(B, N, D), torch.where(w > 0, x, 0))
    counts = x.new_zeros(B, C, 1).scatter_add_(1, a[..., None], w)
    centres = (sums / counts.clamp(min=1)).to(feats.dtype)
    return centres, centre_index, assign


# ------------------------------------------------------------------------------------- VisionZip
def cls_dominant_and_contextual(cls_attn: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor,
                                valid: torch.Tensor, n_dominant: int, n_contextual: int
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip (arXiv 2412.04467): dominant tokens by CLS attention + merged contextual tokens.

    - dominant: top ``n_dominant`` by ``cls_attn`` (ties -> lower index). The CLS token itself is the
      caller's business (VisionZip keeps CLS + n_dominant - 1 patches: pass patches only).
    - contextual targets: the R remaining valid tokens in ascending order, positions
      0, s, 2s, ... of that list with stride s = max(1, R // n_contextual), the first n_contextual
      of them (fewer if R < n_contextual).
    - every other remaining token joins its most similar target by cosine of ``keys`` (ties -> lower
      target slot); contextual_hidden = target hidden + mean of its members' hidden states, or just the
      target hidden when no token joined it.

    Returns ``dominant_idx [B, n_dominant]``, ``contextual_idx [B, n_contextual]`` (ascending, -1
    padded) and ``contextual_hidden [B, n_contextual, D]`` (hidden's dtype, zeros in padded slots).
    """
    B, N, D = hidden.shape
    dom_mask = _take_first(_order(cls_attn, valid), valid, torch.clamp(valid.sum(1), max=n_dominant))
    dom = _mask_to_indices(dom_mask, n_dominant)
    if n_contextual == 0:
        return dom, dom.new_zeros(B, 0), hidden.new_zeros(B, 0, D)
    rest = valid & ~dom_mask
    step = (rest.sum(1) // max(n_contextual, 1)).clamp(min=1)[:, None]
    pos = rest.long().cumsum(1) - 1
    is_target = rest & (pos % step == 0) & (pos // step < n_contextual)
    tgt = _mask_to_indices(is_target, n_contextual)
    kn = _unit(keys)
    sim = torch.einsum("bnd,bcd->bnc", kn, gather_seq(kn, tgt))
    assign = _first_argmax(torch.where(tgt[:, None, :] >= 0, sim, -math.inf))
    w = (rest & ~is_target).float()[..., None]
    h = hidden.float()
    sums = h.new_zeros(B, n_contextual, D).scatter_add_(1, assign[..., None].expand(B, N, D),
                                                        torch.where(w > 0, h, 0))
    counts = h.new_zeros(B, n_contextual, 1).scatter_add_(1, assign[..., None], w)
    ctx = (gather_seq(h, tgt) + sums / counts.clamp(min=1)) * (tgt >= 0)[..., None]
    return dom, tgt, ctx.to(hidden.dtype)


# -------------------------------------------------------------------------------------- uniform
def uniform_indices(n_valid: torch.Tensor, k: Budget, grid: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Spatially uniform baseline: k[b] evenly spaced indices in 0..n_valid[b]-1, ascending, unique.

    1-D (``grid=None``): index_i = floor((i + 0.5) * n / k) for i < k.
    2-D (``grid=(H, W)``, every sample must then hold H*W tokens in raster order): a kh x kw lattice
    with kh = round(sqrt(k H / W)) (clamped to [1, H]), kw = ceil(k / kh) (<= W, kh raised if needed),
    rows floor((r + 0.5) H / kh), cols floor((c + 0.5) W / kw); k lattice points are then taken with
    the 1-D rule over the raster-ordered lattice (all of them when kh * kw == k, e.g. stride-2 for
    k = 144 of 24 x 24).
    """
    n_valid = torch.as_tensor(n_valid, dtype=torch.long)
    k = _budget(k, n_valid)
    i = _arange(_max(k), n_valid)[None, :]
    ok = i < k[:, None]
    kk = k.clamp(min=1)[:, None]
    if grid is None:
        out = (2 * i + 1) * n_valid[:, None] // (2 * kk)
    else:
        H, W = int(grid[0]), int(grid[1])
        kh = torch.round(torch.sqrt(kk.double() * H / W)).long().clamp(1, H)
        kw = ((kk + kh - 1) // kh).clamp(max=W)
        kh = torch.maximum(kh, (kk + kw - 1) // kw).clamp(max=H)
        lat = (2 * i + 1) * (kh * kw) // (2 * kk)
        r, c = lat // kw, lat % kw
        out = ((2 * r + 1) * H // (2 * kh)) * W + (2 * c + 1) * W // (2 * kw)
    return torch.where(ok, out, -1)


# ------------------------------------------------------------------------------- CDPruner DPP
def dpp_greedy_map(unit: torch.Tensor, quality: torch.Tensor, valid: torch.Tensor, k: Budget
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """CDPruner (arXiv 2506.10967): greedy MAP of the DPP with kernel ``K_ij = q_i (u_i . u_j) q_j``.

    ``unit [V, N, D]``: unit-norm features (the similarity is computed in float32); ``quality [V, N]``.
    Fast greedy MAP inference (Chen et al. 2018): residual gains ``d_i^2`` start at ``K_ii``; each step
    takes the first argmax ``j``, stores the Cholesky row ``e = (K_j - sum_s c_s[j] c_s) / d_j`` and
    lowers every gain by ``e_i^2``. Exactly ``k`` steps, no early stop, so it equals the greedy
    maximisation of ``log det K_S``. Degenerate kernels (``k`` above its numerical rank): when the
    largest remaining gain is not ``> 0`` (or not finite) the view stops, and its remaining slots are
    filled with unpicked tokens by descending ``K_ii`` (lowest index on ties) instead of the NaN
    cascade of the official code. Returns ascending indices ``[V, K]`` (-1 padded) and ``[V]`` bool:
    which views took that fallback.
    """
    V, N = valid.shape
    k = _budget(k, valid.sum(1))
    q = torch.where(valid, quality.float(), 0.0)
    u = unit.float()
    kernel = q[:, :, None] * (u @ u.transpose(1, 2)) * q[:, None, :]
    diag = kernel.diagonal(dim1=1, dim2=2)
    gains = torch.where(valid, diag, -math.inf)
    rows = _arange(V, valid)
    steps = _max(k)
    chol = kernel.new_zeros(V, steps, N)
    picked = torch.zeros_like(valid)
    stopped = torch.zeros(V, dtype=torch.bool, device=valid.device)
    for t in range(steps):
        active = (t < k) & ~stopped
        j = _first_argmax(gains)
        best = gains[rows, j]
        bad = active & ~(torch.isfinite(best) & (best > 0))
        stopped |= bad
        active &= ~bad
        done = torch.bmm(chol[rows, :t, j].unsqueeze(1), chol[:, :t]).squeeze(1) if t else 0.0
        e = (kernel[rows, j] - done) / torch.where(active, best, 1.0).sqrt()[:, None]
        e = torch.where(active[:, None], e, 0.0)
        chol[:, t] = e
        gains = gains - e.square()
        picked[rows, j] |= active
        gains[rows, j] = torch.where(active, -math.inf, gains[rows, j])
    fill = _take_first(_order(diag, valid), valid & ~picked, k - picked.sum(1))
    return _mask_to_indices(picked | fill, steps), stopped


# ---------------------------------------------------------------------------------- VScan scans
def window_quota_scan(scores: torch.Tensor, rows: int, cols: int, windows: int, n: int) -> torch.Tensor:
    """VScan's LLaVA local scan: the ``rows x cols`` raster grid (``scores [V, rows*cols]``) is cut into
    ``windows x windows`` equal windows (row-major) and each keeps its ``n // windows**2`` best tokens
    (ties -> lower index); the remainder of ``n`` is not used (the official rule). Returns a mask."""
    if rows % windows or cols % windows:
        raise ValueError(f"a {rows} x {cols} grid does not split into {windows} x {windows} equal windows")
    wr, wc = rows // windows, cols // windows
    r = torch.arange(rows * cols, device=scores.device) // cols
    c = torch.arange(rows * cols, device=scores.device) % cols
    window = (r // wr) * windows + c // wc
    per = n // windows**2
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for w in range(windows**2):
        member = (window == w).expand_as(mask)
        mask |= _take_first(_order(scores, member), member, torch.full_like(scores[:, 0], per, dtype=torch.long))
    return mask


def window_cap_scan(scores: torch.Tensor, rows: int, cols: int, window: int, n: int) -> torch.Tensor:
    """VScan's Qwen2.5-VL local scan: windows of ``window x window`` tokens (``max(1, rows // window)``
    by ``max(1, cols // window)`` of them; the ragged last rows / columns join the last window row /
    column); every window may hold ``ceil(n / windows)`` picks; walk all tokens by descending score
    (ties -> lower index) and accept a token while its window is below that cap, until ``n`` are
    accepted. ``scores [V, rows*cols]``; returns a mask."""
    wr, wc = max(1, rows // window), max(1, cols // window)
    cap = -(-n // (wr * wc))
    r = torch.arange(rows * cols, device=scores.device) // cols
    c = torch.arange(rows * cols, device=scores.device) % cols
    win = (r // window).clamp(max=wr - 1) * wc + (c // window).clamp(max=wc - 1)
    valid = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    order = _order(scores, valid)  # [V, N] token ids by descending score
    by_rank = win[order]  # window of each ranked token
    onehot = F.one_hot(by_rank, wr * wc)
    seen_before = onehot.cumsum(1) - onehot  # picks ... tokens of the same window ranked earlier
    within_cap = (seen_before * onehot).sum(-1) < cap
    accepted = within_cap & (within_cap.long().cumsum(1) <= n)
    return torch.zeros_like(valid).scatter(1, order, accepted)


def merge_into_kept(feats: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """VScan's merge: every dropped token is averaged into its most similar kept token.

    ``feats [V, N, D]``, ``kept [V, N]``. A dropped token's target is the kept token of highest cosine
    similarity (float32; ties -> the first kept token in index order); a kept token becomes
    ``(x_k + sum of its dropped tokens) / (1 + their number)``. Returns ``[V, N, D]`` float32 (the
    merged value at kept rows, the input elsewhere).
    """
    x = feats.float()
    u = _unit(x)
    sim = torch.where(kept[:, None, :], u @ u.transpose(1, 2), -math.inf)
    target = _first_argmax(sim)  # [V, N]
    dropped = (~kept).float()[..., None]
    sums = x.clone().scatter_add_(1, target[..., None].expand_as(x), x * dropped)
    counts = torch.ones_like(x[..., :1]).scatter_add_(1, target[..., None], dropped)
    return torch.where(kept[..., None], sums / counts, x)


# ---------------------------------------------------------------------------------------- pool
def block_pool(x: torch.Tensor, index: torch.Tensor, stride: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Average pooling of a token grid in ``stride x stride`` blocks (the last block row / column is
    smaller when the grid does not divide). ``x [N, D]`` holds a sample's tokens, ``index [R, C]`` the
    grid's positions in ``x``. Returns the block anchors ``[R', C']`` (top-left positions) and the block
    means ``[R', C', D]`` (float32)."""
    R, C = index.shape
    rb, cb = -(-R // stride), -(-C // stride)
    block = (torch.arange(R)[:, None] // stride) * cb + torch.arange(C)[None, :] // stride
    flat = index.flatten().to(x.device)
    block = block.flatten().to(x.device)
    vals = x[flat].float()
    sums = vals.new_zeros(rb * cb, x.shape[-1]).index_add_(0, block, vals)
    counts = vals.new_zeros(rb * cb).index_add_(0, block, torch.ones_like(vals[:, 0]))
    anchors = index[::stride, ::stride]
    return anchors, (sums / counts[:, None]).view(rb, cb, -1)
