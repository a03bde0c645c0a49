"""Tests for fvlm.selectors.algorithms: hand-derived cases, plain-Python references, batching/padding."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import reference_nms_picks

from fvlm.selectors import algorithms
from fvlm.selectors.algorithms import (
    cls_dominant_and_contextual,
    dart_select,
    density_peak_merge,
    max_min_diversity,
    nms_fill,
    topk_indices,
    uniform_indices,
)

SEEDS = range(50)


def angles(*deg):
    """Unit 2-D vectors at the given angles (degrees)."""
    r = torch.tensor(deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([r.cos(), r.sin()], -1).float()


def rows(out):
    """[B, K] padded output -> list of per-sample lists (padding dropped, checking it is a suffix)."""
    res = []
    for r in out.tolist():
        n = sum(v >= 0 for v in r)
        assert all(v >= 0 for v in r[:n]) and all(v == -1 for v in r[n:]), r
        res.append(r[:n])
    return res


def one(x):
    return x[None]


def full(n):
    return torch.ones(1, n, dtype=torch.bool)


# -------------------------------------------------------------------------- plain-Python references
def ref_order(s):
    return sorted(range(len(s)), key=lambda i: (-s[i], i))


def ref_topk(s, k):
    return sorted(ref_order(s)[:k])


def ref_cos(f):
    v = F.normalize(f.float(), dim=-1)
    return (v @ v.T).tolist()


def ref_maxmin(f, k):
    sim = ref_cos(f)
    n = len(sim)
    d = [[1.0 - sim[i][j] for j in range(n)] for i in range(n)]
    if k == 0:
        return []
    nn = [min([d[i][j] for j in range(n) if j != i], default=math.inf) for i in range(n)]
    sel = [max(range(n), key=lambda i: (nn[i], -i))]
    while len(sel) < k:
        rest = [i for i in range(n) if i not in sel]
        sel.append(max(rest, key=lambda i: (min(d[s][i] for s in sel), -i)))
    return sorted(sel)


def ref_dart(vk, vh, tk, th, k, pv_n, pt_n, exact):
    n = len(vk)
    vn = [sum(abs(x) for x in r) for r in vk.tolist()]
    tn = [sum(abs(x) for x in r) for r in tk.tolist()]
    pv = min(pv_n, n, k) if exact else min(pv_n, n)
    pt = min(pt_n, len(tn))
    vis_p = sorted(ref_order(vn)[:pv])
    txt_p = sorted(ref_order(tn)[:pt])
    P = max(pv + pt, 1)
    hv, ht = F.normalize(vh.float(), dim=-1), F.normalize(th.float(), dim=-1)
    pivots = [hv[i] for i in vis_p] + [ht[i] for i in txt_p]
    kept, pool = set(vis_p), [i for i in range(n) if i not in vis_p]
    rest = k - pv
    for m, p in enumerate(pivots):
        q = rest // P + (m < rest % P) if exact else k // P
        sims = (hv @ p).tolist()
        take = sorted(pool, key=lambda i: (sims[i], i))[:q]
        kept |= set(take)
        pool = [i for i in pool if i not in take]
    return sorted(kept)


# ---------------------------------------------------------------------------------- random inputs
def rand_valid(g, B, N, min_n=1):
    """Random (non-prefix) valid masks with at least min_n valid slots per row."""
    valid = torch.rand(B, N, generator=g) < 0.7
    for b in range(B):
        if valid[b].sum() < min_n:
            valid[b, torch.randperm(N, generator=g)[:min_n]] = True
    return valid


def garbage(x, valid):
    """Fill padding slots with NaN so that any leak from them shows up."""
    m = ~valid
    while m.dim() < x.dim():
        m = m[..., None]
    return x.masked_fill(m, float("nan"))


def clustered(g, B, N, D, n_centres=4, noise=0.4):
    c = torch.randn(B, n_centres, D, generator=g)
    pick = torch.randint(n_centres, (B, N), generator=g)
    return c.gather(1, pick[..., None].expand(B, N, D)) + noise * torch.randn(B, N, D, generator=g)


def rand_k(g, valid):
    n = valid.sum(1)
    return (torch.rand(n.shape, generator=g) * (n + 1)).long().clamp(max=n)


def compact(valid_row):
    return valid_row.nonzero().squeeze(1).tolist()


# ------------------------------------------------------------------------------------- topk_indices
def test_topk_hand():
    s = torch.tensor([[3.0, 1.0, 3.0, 2.0, 5.0]])
    # descending: 5 (idx 4), then the tie 3/3 -> idx 0 before idx 2, then 2 (idx 3)
    assert rows(topk_indices(s, full(5), torch.tensor([3]))) == [[0, 2, 4]]
    assert rows(topk_indices(s, full(5), torch.tensor([2]))) == [[0, 4]]  # tie at 3 -> lower idx 0
    # idx 4 invalid: the best valid ones are 0, 2 (tie, both taken), then 3
    v = torch.tensor([[True, True, True, True, False]])
    assert rows(topk_indices(s, v, torch.tensor([3]))) == [[0, 2, 3]]
    # per-sample budgets, padded with -1
    out = topk_indices(s.repeat(2, 1), full(5).repeat(2, 1), torch.tensor([1, 3]))
    assert out.tolist() == [[4, -1, -1], [0, 2, 4]]


@pytest.mark.parametrize("seed", SEEDS)
def test_topk_random(seed):
    g = torch.Generator().manual_seed(seed)
    B, N = 4, 23
    valid = rand_valid(g, B, N)
    s = torch.randint(0, 6, (B, N), generator=g).float()  # many ties
    k = rand_k(g, valid)
    out = rows(topk_indices(garbage(s, valid), valid, k))
    for b in range(B):
        idx = compact(valid[b])
        assert out[b] == [idx[i] for i in ref_topk([s[b, i].item() for i in idx], int(k[b]))]


# ----------------------------------------------------------------------------------------- nms_fill
def test_nms_hand():
    # t0 ~ t1 (cos 0.995), t2 ~ t3 (cos 0.995), t4 at 45 deg: cos 0.774 with t1 and t3, 0.707 with t0/t2
    f = torch.tensor([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [1, 1]])
    sal = torch.tensor([4.0, 5.0, 2.0, 3.0, 1.0])  # saliency order: t1, t0, t3, t2, t4
    # walk: keep t1 (suppress t0), skip t0, keep t3 (suppress t2), skip t2, keep t4 -> {1, 3, 4}
    assert rows(nms_fill(one(sal), one(f), full(5), torch.tensor([3]))) == [[1, 3, 4]]
    # k=4: NMS keeps only 3, fill takes the next not-kept token in saliency order: t0
    assert rows(nms_fill(one(sal), one(f), full(5), torch.tensor([4]))) == [[0, 1, 3, 4]]
    # k=2: stop after t1, t3
    assert rows(nms_fill(one(sal), one(f), full(5), torch.tensor([2]))) == [[1, 3]]
    # nms=False: plain top-3 by saliency -> t1, t0, t3
    assert rows(nms_fill(one(sal), one(f), full(5), torch.tensor([3]), nms=False)) == [[0, 1, 3]]
    # tau=0.7 also suppresses t4 from t1 (0.774 >= 0.7), and t2, t3 from... no: cos(t1, t3) = 0.199
    # walk: keep t1 (supp t0, t4), keep t3 (supp t2) -> 2 kept, fill with t0 -> {0, 1, 3}
    assert rows(nms_fill(one(sal), one(f), full(5), torch.tensor([3]), tau=0.7)) == [[0, 1, 3]]


def test_nms_needs_a_row_beyond_the_2k_best(monkeypatch):
    """The walk runs on the 2k best-ranked tokens first; when NMS suppresses more than k of them a
    pick lies further down and the block doubles: same picks."""
    calls = []
    by_rank = algorithms._nms_keep_by_rank
    monkeypatch.setattr(algorithms, "_nms_keep_by_rank", lambda u, *a: calls.append(u.shape[1]) or by_rank(u, *a))
    f = torch.tensor([[1.0, 0, 0]] * 5 + [[0, 1.0, 0], [0, 0, 1.0], [0, 1.0, 1.0]])  # t0-t4 duplicates
    sal = torch.arange(8, 0, -1).float()  # saliency order t0, t1, ..., t7
    other = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))  # no duplicates: no redo needed
    out = rows(nms_fill(torch.stack([sal, sal]), torch.stack([f, other]), torch.ones(2, 8, dtype=torch.bool), 2))
    assert out[0] == [0, 5] == reference_nms_picks(sal, f, 2, 0.8)  # t5 has rank 5 >= 2k = 4
    assert out[1] == reference_nms_picks(sal, other, 2, 0.8)
    assert calls == [4, 8]


def test_nms_long_suppression_chain():
    """Each token suppresses only its saliency-order neighbour: the kept set alternates down a chain of
    200, the worst case for the fixed-point rounds (every round settles one more link)."""
    n = 200
    f = angles(*[1.5 * i for i in range(n)])  # cos(1.5 deg) = 0.99966 >= tau > cos(3 deg) = 0.99863
    sal = torch.arange(n, 0, -1).float()
    for k in (50, 100, 150):
        out = rows(nms_fill(one(sal), one(f), full(n), torch.tensor([k]), tau=0.9992))
        assert out[0] == reference_nms_picks(sal, f, k, 0.9992)
    assert rows(nms_fill(one(sal), one(f), full(n), torch.tensor([100]), tau=0.9992))[0] == list(range(0, n, 2))


@pytest.mark.parametrize("seed", SEEDS)
def test_nms_random(seed, monkeypatch):
    if seed % 2:  # exercise the row-per-pick path used for big batches
        monkeypatch.setattr(algorithms, "_SIM_MAX", 0)
    g = torch.Generator().manual_seed(seed)
    B, N, D = 3, 30, 6
    valid = rand_valid(g, B, N)
    f = clustered(g, B, N, D)
    sal = torch.randint(0, 8, (B, N), generator=g).float()
    k = rand_k(g, valid)
    tau = [0.5, 0.8, 0.95][seed % 3]
    out = rows(nms_fill(garbage(sal, valid), garbage(f, valid), valid, k, tau=tau))
    for b in range(B):
        idx = compact(valid[b])
        ref = reference_nms_picks([sal[b, i].item() for i in idx], f[b, idx], int(k[b]), tau)
        assert out[b] == [idx[i] for i in ref]


# -------------------------------------------------------------------------------- max_min_diversity
def test_maxmin_hand():
    # unit vectors at 0, 10, 90, 180, 185 degrees; d = 1 - cos(angle difference)
    # nearest-neighbour angles: 10, 10, 80, 5, 5 -> first pick t2 (90 deg)
    # min d to {t2}: t0 1, t1 0.83, t3 1, t4 1.087 -> pick t4
    # min d to {t2, t4}: t0 1, t1 0.83, t3 0.004 -> pick t0
    f = angles(0, 10, 90, 180, 185)
    assert rows(max_min_diversity(one(f), full(5), torch.tensor([1]))) == [[2]]
    assert rows(max_min_diversity(one(f), full(5), torch.tensor([3]))) == [[0, 2, 4]]
    # tie: two identical far points (t0, t1) and a tight pair: first pick has the largest NN distance;
    # t0 and t1 have NN distance 0, t2/t3 (90, 95 deg) 0.004 -> first pick t2; then t0 and t1 are
    # both 1 away, t3 0.004 -> tie to lower index t0
    g = angles(0, 0, 90, 95)
    assert rows(max_min_diversity(one(g), full(4), torch.tensor([2]))) == [[0, 2]]


@pytest.mark.parametrize("seed", SEEDS)
def test_maxmin_random(seed):
    g = torch.Generator().manual_seed(seed)
    B, N, D = 3, 25, 5
    valid = rand_valid(g, B, N)
    f = torch.randn(B, N, D, generator=g)
    k = rand_k(g, valid)
    out = rows(max_min_diversity(garbage(f, valid), valid, k))
    for b in range(B):
        idx = compact(valid[b])
        assert out[b] == [idx[i] for i in ref_maxmin(f[b, idx], int(k[b]))]


# --------------------------------------------------------------------------------------------- DART
def _dart_hand_inputs():
    # visual keys: token 2 has the largest L1 norm -> visual pivot 2; text: token 1 -> text pivot
    vk = torch.tensor([[1.0, 0], [1, 1], [3, 3], [0, 1], [1, 0], [0.5, 0.5]])
    tk = torch.tensor([[1.0, 1], [2, 2]])
    vh = angles(0, 30, 0, 90, 180, 135)
    th = angles(45, 90)
    return [one(x) for x in (vk, vh)] + [full(6)] + [one(x) for x in (tk, th)] + [full(2)]


def test_dart_hand():
    args = _dart_hand_inputs()
    # k=4, 1+1 pivots, authors' rule: quota 4 // 2 = 2 per pivot, keep pivot 2.
    # pivot v2 (0 deg) first: lowest cosine in pool {0,1,3,4,5}: v4 (-1), v5 (-0.71) -> taken
    # text pivot (90 deg): pool {0,1,3}: cos v0 0, v1 0.5, v3 1 -> v0, v1
    out = dart_select(*args, torch.tensor([4]), n_pivots_visual=1, n_pivots_text=1)
    assert rows(out) == [[0, 1, 2, 4, 5]]  # 1 + 2*2 = 5 tokens, the authors' over-count
    # exact: rest = 4 - 1 = 3 over 2 pivots -> 2 for the first visited (v2), 1 for the text pivot
    out = dart_select(*args, torch.tensor([4]), n_pivots_visual=1, n_pivots_text=1, exact_budget=True)
    assert rows(out) == [[0, 2, 4, 5]]


def test_dart_authors_count():
    g = torch.Generator().manual_seed(0)
    vk, vh = torch.randn(1, 576, 16, generator=g), torch.randn(1, 576, 32, generator=g)
    tk, th = torch.randn(1, 20, 16, generator=g), torch.randn(1, 20, 32, generator=g)
    a = (vk, vh, full(576), tk, th, full(20), torch.tensor([128]))
    assert (dart_select(*a) >= 0).sum() == 132  # 4 visual pivots + 8 * (128 // 8)
    assert (dart_select(*a, exact_budget=True) >= 0).sum() == 128


@pytest.mark.parametrize("seed", SEEDS)
def test_dart_random(seed):
    g = torch.Generator().manual_seed(seed)
    B, N, T, Dk, D = 3, 30, 7, 4, 5
    valid = rand_valid(g, B, N)
    tvalid = rand_valid(g, B, T, min_n=0)
    vk, tk = torch.randn(B, N, Dk, generator=g), torch.randn(B, T, Dk, generator=g)
    vh, th = torch.randn(B, N, D, generator=g), torch.randn(B, T, D, generator=g)
    k = rand_k(g, valid)
    npv, npt = [(4, 4), (2, 3), (1, 0)][seed % 3]
    for exact in (False, True):
        out = rows(dart_select(garbage(vk, valid), garbage(vh, valid), valid, garbage(tk, tvalid),
                               garbage(th, tvalid), tvalid, k, npv, npt, exact_budget=exact))
        for b in range(B):
            vi, ti = compact(valid[b]), compact(tvalid[b])
            ref = ref_dart(vk[b, vi], vh[b, vi], tk[b, ti], th[b, ti], int(k[b]), npv, npt, exact)
            assert out[b] == [vi[i] for i in ref]
            if exact:
                assert len(out[b]) == int(k[b])


def test_dart_no_text():
    g = torch.Generator().manual_seed(1)
    vk, vh = torch.randn(2, 9, 3, generator=g), torch.randn(2, 9, 3, generator=g)
    empty = torch.zeros(2, 0, 3)
    out = dart_select(vk, vh, torch.ones(2, 9, dtype=torch.bool), empty, empty,
                      torch.zeros(2, 0, dtype=torch.bool), torch.tensor([5, 8]), exact_budget=True)
    assert [len(r) for r in rows(out)] == [5, 8]


# -------------------------------------------------------------------------------- density_peak_merge
def test_density_peak_hand():
    # 1-D points 0, 1, 2, 50, 51, 53 (D = 1, so no scaling); the kNN density uses the C nearest
    # tokens including the token itself (the authors' rule).
    # C = 2: mean sq. distance (0 + nearest^2) / 2: 0.5 for a0..a4, 2 for a5 -> a0..a4 tie (lower
    # index counts as denser). delta: a0 max 53; a1 1; a2 1; a3 48 (a2); a4 1; a5 2 (a4).
    # rho*delta: a0 53e^-.5, a3 48e^-.5, then a1 = a2 = a4 = e^-.5 -> centres [a0, a3] in that order
    x = torch.tensor([0.0, 1, 2, 50, 51, 53])[None, :, None]
    cen, ci, asg = density_peak_merge(x, full(6), torch.tensor([2]))
    assert ci.tolist() == [[0, 3]]
    assert asg.tolist() == [[0, 0, 0, 1, 1, 1]]  # nearest centre
    assert torch.allclose(cen[0, :, 0], torch.tensor([1.0, 154 / 3]))
    # C = 3: (0 + two nearest^2) / 3: a0 5/3, a1 2/3, a2 5/3, a3 10/3, a4 5/3, a5 13/3.
    # density a1 > a0 > a2 > a4 (ties by index) > a3 > a5; delta a1 53, a0 1, a2 1, a4 49, a3 1, a5 2
    # rho*delta: a1 53e^-2/3, a4 49e^-5/3, a0 = a2 = e^-5/3 (tie -> a0): centres [a1, a4, a0]
    cen, ci, asg = density_peak_merge(x, full(6), torch.tensor([3]))
    assert ci.tolist() == [[1, 4, 0]]
    assert asg.tolist() == [[2, 0, 0, 1, 1, 1]]  # a2 is closer to a1 (1) than to a0 (2)
    assert torch.allclose(cen[0, :, 0], torch.tensor([1.5, 154 / 3, 0.0]))


# ------------------------------------------------------------------------------------- VisionZip
def test_visionzip_hand():
    cls = torch.tensor([0.1, 0.8, 0.2, 0.05, 0.15, 0.9, 0.3, 0.01])
    # dominant (2): tokens 5 (0.9) and 1 (0.8); remaining [0,2,3,4,6,7]: R=6, stride 6 // 2 = 3
    # -> targets at list positions 0 and 3 = tokens 0 and 4
    keys = torch.tensor([[1, 0], [0, 0], [1, 0.2], [0.1, 1], [0, 1], [0, 0], [0.9, 0.1], [0, 1.0]])
    # by key cosine: 2 -> 0, 3 -> 4, 6 -> 0, 7 -> 4
    hid = torch.stack([torch.arange(8.0), 10 * torch.arange(8.0)], -1)
    dom, ctx_i, ctx_h = cls_dominant_and_contextual(one(cls), one(keys), one(hid), full(8), 2, 2)
    assert dom.tolist() == [[1, 5]] and ctx_i.tolist() == [[0, 4]]
    # h0 + mean(h2, h6) = (0,0) + (4,40); h4 + mean(h3, h7) = (4,40) + (5,50)
    assert torch.allclose(ctx_h[0], torch.tensor([[4.0, 40], [9, 90]]))
    # no-member case: every key points like token 0 -> target 4 gets nobody and stays h4
    keys2 = keys.clone()
    keys2[[3, 7]] = torch.tensor([1.0, 0.1])
    _, _, ctx_h = cls_dominant_and_contextual(one(cls), one(keys2), one(hid), full(8), 2, 2)
    # h0 + mean(h2, h3, h6, h7) = (0,0) + (4.5, 45)
    assert torch.allclose(ctx_h[0], torch.tensor([[4.5, 45], [4, 40]]))


# --------------------------------------------------------------------------------------- uniform
def test_uniform_hand():
    # floor((i + 0.5) * 10 / 4) = floor(1.25, 3.75, 6.25, 8.75)
    assert uniform_indices(torch.tensor([10]), 4).tolist() == [[1, 3, 6, 8]]
    assert uniform_indices(torch.tensor([7]), 7).tolist() == [list(range(7))]
    assert uniform_indices(torch.tensor([10, 7]), torch.tensor([2, 3])).tolist() == [[2, 7, -1], [1, 3, 5]]
    # 4x4 grid, k=4: 2x2 lattice, rows/cols floor((r + 0.5) * 2) = 1, 3 -> 5, 7, 13, 15
    assert uniform_indices(torch.tensor([16]), 4, grid=(4, 4)).tolist() == [[5, 7, 13, 15]]
    # 24x24, k=144: 12x12 lattice = every second patch at odd rows/cols
    exp = [r * 24 + c for r in range(1, 24, 2) for c in range(1, 24, 2)]
    assert uniform_indices(torch.tensor([576]), 144, grid=(24, 24)).tolist() == [exp]


def test_uniform_properties():
    for n in range(1, 40):
        for k in range(0, n + 1):
            r = rows(uniform_indices(torch.tensor([n]), k))[0]
            assert len(r) == k and r == sorted(set(r)) and all(0 <= v < n for v in r)
    for H, W in [(4, 4), (3, 7), (24, 24), (6, 2)]:
        for k in range(0, H * W + 1):
            r = rows(uniform_indices(torch.tensor([H * W]), k, grid=(H, W)))[0]
            assert len(r) == k and r == sorted(set(r)) and all(0 <= v < H * W for v in r)


# ------------------------------------------------------------------------ batched vs one-at-a-time
@pytest.mark.parametrize("seed", range(10))
def test_batched_equals_single(seed):
    """A padded batch (non-prefix padding, NaN in pad slots) gives each sample's solo answer."""
    g = torch.Generator().manual_seed(seed)
    B, N, D = 4, 20, 6
    valid = rand_valid(g, B, N, min_n=2)
    f = clustered(g, B, N, D)
    s = torch.randn(B, N, generator=g)
    kf = torch.randn(B, N, 3, generator=g)
    k = rand_k(g, valid)
    nc = torch.randint(1, 5, (B,), generator=g)
    fb, sb, kb = garbage(f, valid), garbage(s, valid), garbage(kf, valid)
    outs = {
        "topk": rows(topk_indices(sb, valid, k)),
        "nms": rows(nms_fill(sb, fb, valid, k)),
        "mm": rows(max_min_diversity(fb, valid, k)),
    }
    cen, ci, asg = density_peak_merge(fb, valid, nc)
    dom, cti, cth = cls_dominant_and_contextual(sb, kb, fb, valid, 3, 2)
    for b in range(B):
        idx = compact(valid[b])
        n, kk = len(idx), torch.tensor([int(k[b])])
        m = lambda r: [idx[i] for i in r[0]]  # noqa: E731
        assert outs["topk"][b] == m(rows(topk_indices(one(s[b, idx]), full(n), kk)))
        assert outs["nms"][b] == m(rows(nms_fill(one(s[b, idx]), one(f[b, idx]), full(n), kk)))
        assert outs["mm"][b] == m(rows(max_min_diversity(one(f[b, idx]), full(n), kk)))
        for r in outs.values():
            assert len(r[b]) == int(k[b]) and all(valid[b, i] for i in r[b])
        c1, i1, a1 = density_peak_merge(one(f[b, idx]), full(n), nc[b:b + 1])
        C = int(min(nc[b], n))
        assert rows(ci[b:b + 1]) == [m(rows(i1))] and len(rows(i1)[0]) == C
        assert asg[b, idx].tolist() == a1[0].tolist() and (asg[b, ~valid[b]] == -1).all()
        assert torch.allclose(cen[b, :C], c1[0, :C], atol=1e-5) and (cen[b, C:] == 0).all()
        d1, t1, h1 = cls_dominant_and_contextual(one(s[b, idx]), one(kf[b, idx]), one(f[b, idx]),
                                                 full(n), 3, 2)
        assert rows(dom[b:b + 1]) == [m(rows(d1))] and rows(cti[b:b + 1]) == [m(rows(t1))]
        assert torch.allclose(cth[b], h1[0], atol=1e-5)


def test_budget_edge_cases():
    s, f = torch.randn(2, 5), torch.randn(2, 5, 3)
    v = torch.tensor([[True] * 5, [True, False, True, False, False]])
    for fn in (lambda k: topk_indices(s, v, k), lambda k: nms_fill(s, f, v, k),
               lambda k: max_min_diversity(f, v, k)):
        assert fn(torch.tensor([0, 0])).shape == (2, 0)
        assert [len(r) for r in rows(fn(torch.tensor([5, 2])))] == [5, 2]
        assert [len(r) for r in rows(fn(torch.tensor([5, 9])))] == [5, 2]  # clamped to valid count
    assert uniform_indices(torch.tensor([0, 3]), torch.tensor([0, 0])).shape == (2, 0)
