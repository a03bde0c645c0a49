"""Independent references of each method's official selection rules, written from the specs
(docs: the baselines / PIO-FVLM specs), for ONE sample without padding: plain loops over the
decoder layers of a Hugging Face LLaVA model, eager attention maps, Python lists. No fvlm code.

Every function takes the sample's LLM input embeddings ``embeds [S, D]``, the visual positions
``vis`` (a list) and the eager model, and returns the picks per stage as plain lists (indices into
the visual tokens present at that stage) plus merged vectors where the method merges.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from helpers import reference_nms_picks


# ----------------------------------------------------------------------------------- LLM plumbing
def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope(model, positions: list[int]):
    """cos, sin ``[1, S, hd]`` of the model's rotary embedding at ``positions``."""
    lm = model.model.language_model
    ids = torch.tensor([positions])
    return lm.rotary_emb(torch.zeros(1, 1, dtype=torch.float32), ids)


def causal_mask(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


def run_layer(model, index: int, hidden: torch.Tensor, positions: list[int], want_attention: bool = False):
    """Decoder layer ``index`` on ``hidden [S, D]`` (causal, no cache); with ``want_attention`` also its
    eager attention probabilities ``[H, S, S]``."""
    layer = model.model.language_model.layers[index]
    seen = {}
    handle = layer.self_attn.register_forward_hook(lambda m, a, out: seen.update(p=out[1]))
    try:
        out = layer(hidden[None], attention_mask=causal_mask(hidden.shape[0]),
                    position_embeddings=rope(model, positions), position_ids=torch.tensor([positions]))
    finally:
        handle.remove()
    out = out[0] if isinstance(out, tuple) else out
    return (out[0], seen["p"][0]) if want_attention else out[0]


def keys_of(model, index: int, hidden: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Post-rotary keys of layer ``index``, heads concatenated: ``[S, H_kv * hd]``."""
    attn = model.model.language_model.layers[index].self_attn
    normed = model.model.language_model.layers[index].input_layernorm(hidden)
    k = attn.k_proj(normed).view(hidden.shape[0], -1, attn.head_dim).transpose(0, 1)  # [H, S, hd]
    cos, sin = rope(model, positions)
    k = k * cos + rotate_half(k) * sin
    return k.transpose(0, 1).reshape(hidden.shape[0], -1)


def top_k(scores: list[float], k: int) -> list[int]:
    """The k best indices (ties -> lower index), ascending."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def text_after(vis: list[int], length: int) -> list[int]:
    return [i for i in range(vis[-1] + 1, length)]


# -------------------------------------------------------------------------------------------- FastV
@torch.no_grad()
def fastv(model, embeds, vis, k_layer: int, keep: int) -> list[list[int]]:
    hidden, positions = embeds, list(range(embeds.shape[0]))
    for i in range(k_layer):
        hidden, probs = run_layer(model, i, hidden, positions, want_attention=True)
    last = embeds.shape[0] - 1
    scores = [float(probs[:, last, v].mean()) for v in vis]  # layer K-1, last prompt token, head mean
    return [top_k(scores, keep)]


# ---------------------------------------------------------------------------------------- SparseVLM
V15 = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
V20 = {192: (300, 200, 118), 128: (238, 108, 60), 64: (66, 34, 20)}
PRUNING_LOC = (2, 6, 15)


def raters(embeds, vis) -> list[int]:
    """Text tokens after the image whose softmax relevance (averaged over visual rows) beats the mean."""
    text = text_after(vis, embeds.shape[0])
    rel = torch.softmax(embeds[vis].float() @ embeds[text].float().T, dim=-1).mean(0).tolist()
    mean = sum(rel) / len(rel)
    return [t for t, r in zip(text, rel) if r > mean]


def cluster_and_merge(feats: torch.Tensor, n_clusters: int):
    """The authors' density-peak clustering: density from the C nearest tokens (itself included),
    delta to the nearest denser token (equal densities: the earlier token counts as denser), centres =
    top C of density * delta (in that order), every token to its nearest centre. Returns
    ``(centre positions in the list, merged vectors)``."""
    n, d = feats.shape
    x = feats.double()
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:n_clusters]) / n_clusters) for row in dist]
    dmax = max(max(row) for row in dist)

    def denser(j, i):
        return density[j] > density[i] or (density[j] == density[i] and j < i)

    delta = [min([dist[i][j] for j in range(n) if denser(j, i)], default=dmax) for i in range(n)]
    score = [density[i] * delta[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:n_clusters]
    members = {c: [] for c in centres}
    for i in range(n):
        target = i if i in members else min(centres, key=lambda c: (dist[i][c], centres.index(c)))
        members[target].append(i)
    return centres, [feats[members[c]].mean(0) for c in centres]


def gravity(model, rows: list[int], cols: list[int], positions: list[int]) -> torch.Tensor:
    """All-ones q and k rotated to their positions, dot product / sqrt(head_dim): ``[Q, N]``."""
    cos, sin = rope(model, positions)
    hd = cos.shape[-1]
    one = torch.ones(hd)
    q = [one * cos[0, r] + rotate_half(one) * sin[0, r] for r in rows]
    k = [one * cos[0, c] + rotate_half(one) * sin[0, c] for c in cols]
    return torch.stack([torch.stack([a @ b for b in k]) for a in q]) / math.sqrt(hd)


@torch.no_grad()
def sparsevlm(model, embeds, vis, budget: int, recycle: bool = True, version: str = "1.5"):
    """Per stage: ``(kept, centres, merged)``, indices into the stage's current visual tokens."""
    counts = (V15 if version == "1.5" else V20)[budget]
    rater_ids = raters(embeds, vis)  # positions in the unpruned prompt; text is never pruned
    first_text = vis[-1] + 1
    hidden = embeds
    tokens = list(range(embeds.shape[0]))  # original position of each current token
    n_prefix, n_vis = vis[0], len(vis)
    stages = []
    for layer in range(PRUNING_LOC[-1] + 1):
        positions = list(range(len(tokens))) if version == "1.5" else tokens  # compact vs original ids
        if layer not in PRUNING_LOC:
            hidden = run_layer(model, layer, hidden, positions)
            continue
        hidden, probs = run_layer(model, layer, hidden, positions, want_attention=True)
        cur_vis = list(range(n_prefix, n_prefix + n_vis))
        shift = first_text - (n_prefix + n_vis)
        rows = [r - shift for r in rater_ids]
        attn = probs[:, rows][:, :, cur_vis].double()  # [H, R, V]
        if version == "2.0":
            attn = attn / gravity(model, rows, cur_vis, positions).double()[None]
            heads = sorted(range(attn.shape[0]), key=lambda h: -float(attn[h].sum()))[:14]
            attn = attn[heads]
        scores = attn.mean(0).mean(0).tolist()
        keep = min(counts[PRUNING_LOC.index(layer)], n_vis - 1)
        kept = top_k(scores, keep)
        centres, merged = [], []
        if recycle:
            deleted = [i for i in range(n_vis) if i not in kept]
            m = int(len(deleted) * 0.3) + 1
            recycled = sorted(deleted, key=lambda i: (-scores[i], i))[:m]
            slots, merged = cluster_and_merge(hidden[[n_prefix + i for i in recycled]], int(m / 10) + 1)
            centres = [recycled[s] for s in slots]
        stages.append((kept, centres, merged))
        new_vis = [hidden[n_prefix + i] for i in kept] + merged  # merged tokens appended after the kept ones
        hidden = torch.cat([hidden[:n_prefix], torch.stack(new_vis), hidden[n_prefix + n_vis:]])
        tokens = tokens[:n_prefix] + [tokens[n_prefix + i] for i in kept + centres] + tokens[n_prefix + n_vis:]
        n_vis = len(new_vis)
    return stages


# --------------------------------------------------------------------------------------------- DART
@torch.no_grad()
def dart(model, embeds, vis, keep: int, k_layer: int = 2, order: str = "authors"):
    positions = list(range(embeds.shape[0]))
    hidden_in = embeds
    for i in range(k_layer - 1):
        hidden_in = run_layer(model, i, hidden_in, positions)
    keys = keys_of(model, k_layer - 1, hidden_in, positions)
    out = model.model.language_model.norm(run_layer(model, k_layer - 1, hidden_in, positions))
    text = text_after(vis, embeds.shape[0])
    norm = keys.abs().sum(-1).tolist()
    image_pivots = sorted(vis, key=lambda i: (-norm[i], i))[:4]  # by descending L1 norm of keys
    text_pivots = sorted(text, key=lambda i: (-norm[i], i))[:4]
    pivots = list(set(image_pivots + text_pivots)) if order == "authors" else sorted(image_pivots + text_pivots)
    quota = keep // 8
    pool = [v for v in vis if v not in image_pivots]
    picked = []
    for p in pivots:
        sims = {v: float(F.cosine_similarity(out[p], out[v], dim=0)) for v in pool}
        take = sorted(pool, key=lambda v: (sims[v], v))[:quota]
        picked += take
        pool = [v for v in pool if v not in take]
    return [sorted(vis.index(v) for v in image_pivots + picked)]


# -------------------------------------------------------------------------------------- VisionZip
@torch.no_grad()
def visionzip(eager_model, pixel_values: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """The LLM-space image tokens ``[dominant + contextual, D]``: projected CLS, dominant patches in
    spatial order, contextual tokens in target order (one image)."""
    tower = eager_model.model.vision_tower
    out = tower(pixel_values[None], output_attentions=True, output_hidden_states=True)
    encoder = getattr(tower, "vision_model", tower).encoder
    layer = len(encoder.layers) - 2  # hidden_states[-2] is this layer's output
    feats = out.hidden_states[-2][0]  # [577, Dv], CLS first
    cls_attn = out.attentions[layer][0, :, 0, 1:].sum(0).tolist()
    block = encoder.layers[layer]
    k = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[layer][0]))
    k = k.view(577, block.self_attn.num_heads, -1).mean(1)[1:]
    dom = top_k(cls_attn, dominant - 1)  # + the CLS token = `dominant` tokens
    rest = [i for i in range(576) if i not in dom]
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    unit = F.normalize(k, dim=-1)
    members = {t: [] for t in targets}
    for i in rest:
        if i not in targets:
            sims = [float(unit[i] @ unit[t]) for t in targets]
            members[targets[sims.index(max(sims))]].append(i)
    ctx = [feats[1 + t] + (feats[[1 + i for i in members[t]]].mean(0) if members[t] else 0) for t in targets]
    tokens = torch.stack([feats[0]] + [feats[1 + d] for d in dom] + ctx)
    return eager_model.model.multi_modal_projector(tokens)


# --------------------------------------------------------------------------------------- DivPrune
@torch.no_grad()
def divprune(embeds, vis, keep: int) -> list[list[int]]:
    x = F.normalize(embeds[vis].float(), dim=-1)
    dist = (1 - x @ x.T).tolist()
    n = len(vis)
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    picks = [max(range(n), key=lambda i: (nearest[i], -i))]
    to_picks = list(dist[picks[0]])  # each token's minimum distance to the picks so far
    while len(picks) < keep:
        best = max((i for i in range(n) if i not in picks), key=lambda i: (to_picks[i], -i))
        picks.append(best)
        to_picks = [min(a, b) for a, b in zip(to_picks, dist[best])]
    return [sorted(picks)]


# --------------------------------------------------------------------------------------- PIO-FVLM
@torch.no_grad()
def pio_fvlm(model, embeds, vis, layers: list[int], keep: list[int], k_last: int = 4, tau: float = 0.8):
    """LLaVA variant: after ``l`` layers, the next layer (index l) + final norm + lm_head on a detached
    leaf, CE against its own argmax over the last 4 shifted positions, gradient-norm saliency, NMS +
    fill; compact positions."""
    lm = model.model.language_model
    hidden = embeds
    n_prefix, n_vis = vis[0], len(vis)
    stages = []
    done = 0
    for layer, k in zip(layers, keep):
        while done < layer:
            hidden = run_layer(model, done, hidden, list(range(hidden.shape[0])))
            done += 1
        with torch.enable_grad():
            x = hidden.detach().requires_grad_(True)
            s = x.shape[0]
            y = run_layer(model, layer, x, list(range(s)))
            logits = model.lm_head(lm.norm(y[s - 1 - k_last: s - 1])).float()
            loss = F.cross_entropy(logits, logits.argmax(-1).detach())
            (grad,) = torch.autograd.grad(loss, x)
        cur = list(range(n_prefix, n_prefix + n_vis))
        saliency = grad[cur].float().norm(dim=-1)
        kept = reference_nms_picks(saliency, hidden[cur], k, tau)
        stages.append(kept)
        hidden = torch.cat([hidden[:n_prefix], hidden[[n_prefix + i for i in kept]], hidden[n_prefix + n_vis:]])
        n_vis = len(kept)
    return stages
