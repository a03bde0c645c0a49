"""CDPruner: conditional diversity of the visual tokens given the instruction (a DPP), before the LLM.

Paper: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs", NeurIPS 2025, https://arxiv.org/abs/2506.10967 (code: LLaVA-1.5 / LLaVA-NeXT).

What it does, per sample, on every vision-tower view (LLaVA-1.5: the image; LLaVA-NeXT: each crop,
before the unpadding; Qwen: each image):

- relevance ``s_i = sign * mean_m (v_i . t_m)`` of each patch (unit vectors) to the instruction,
  normalised per sample over all its views' patches: ``r_i = (s_i - min + 1e-6) / (max - min)``
  (``r_i = 1`` when all scores are equal, where the official code divides by zero);
- kernel ``K_ij = q_i (x_i . x_j) q_j`` on the unit-norm projector outputs ``x`` (quality ``q = r``,
  or ``exp(theta / (2 (1 - theta)) r)`` with ``theta``);
- the greedy MAP of the DPP picks ``keep`` patches per view
  ([`fvlm.selectors.algorithms.dpp_greedy_map`][fvlm.selectors.algorithms.dpp_greedy_map]), kept in spatial order; nothing is merged.
  LLaVA-NeXT: each crop's picks then follow the model's unpadding and newline tokens are always
  kept, so a sample keeps at most ``keep`` per crop plus its newlines (the trace has the real count).

Relevance sources (``relevance_source``):

- ``clip_text`` (the authors' LLaVA rule): ``v = visual_projection(post_layernorm(H))`` with ``H``
  the projector's input and ``post_layernorm`` the backbone's own tower norm, ``visual_projection``
  and the text tower from a CLIP checkpoint (``text_model``, an auxiliary model, float32 by
  default); ``t`` = the CLIP text embeddings of the instruction cut into rows of 77 tokens (BOS /
  EOS added, zero-padded; rows are pooled by transformers' rule for the checkpoint's config, the
  legacy largest-id rule for ``openai/clip-vit-large-patch14-336``, as in the authors' runs). The
  instruction comes per sample from ``fvlm.prune(..., instructions=[...])``; ``fvlm run`` passes
  each sample's question (with its options, without the answer-format prompt).
- ``llm_embed`` (the default where no CLIP text tower exists: Qwen2.5-VL; **not a reproduction**,
  the authors released no Qwen code): ``v`` = the projector / merger outputs, ``t`` = the LLM input
  embeddings of the prompt's text after the first image (the question *and* the chat template's
  closing tokens: an approximation of the instruction).
- ``none``: quality 1 (a plain DPP, an ablation).

Deviations from the official code: one instruction and one min / max per sample (the official
batched code scores every sample against one text and normalises over the whole batch); batches of
any size; the degenerate-kernel guard above and in [`dpp_greedy_map`][fvlm.selectors.algorithms.dpp_greedy_map]
(noted in the trace); ``theta`` is an option, off by default, as in the evaluated code.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from fvlm.adapters.tiny import tiny_clip
from fvlm.auxiliary import DTYPES, AuxiliarySpec
from fvlm.errors import AuxiliaryModelError, UnsupportedModelError
from fvlm.metrics.flops import clip_text_flops, dpp_map_flops
from fvlm.selectors.algorithms import dpp_greedy_map
from fvlm.selectors.arguments import check_choice, check_int, check_number, fail
from fvlm.selectors.base import Need, Selection, Stage, TokenSelector

DEFAULT_TEXT_MODEL = "openai/clip-vit-large-patch14-336"
RELEVANCE_SOURCES = ("auto", "clip_text", "llm_embed", "none")
_BASE_NEEDS = frozenset({Need.GRID, Need.VISION_FEATURES})
_NEEDS = {"clip_text": _BASE_NEEDS | {Need.INSTRUCTION}, "llm_embed": _BASE_NEEDS | {Need.TEXT}, "none": _BASE_NEEDS}


class ClipRelevanceTower(nn.Module):
    """CDPruner's auxiliary model: a CLIP text tower with its projection, CLIP's image projection
    and the CLIP tokenizer (no vision tower: the backbone's own tower supplies the patch features)."""

    def __init__(self, text_model: nn.Module, text_projection: nn.Module, visual_projection: nn.Module, tokenizer):
        super().__init__()
        self.text_model = text_model
        self.text_projection = text_projection
        self.visual_projection = visual_projection
        self.tokenizer = tokenizer

    @property
    def context_length(self) -> int:
        return int(self.text_model.config.max_position_embeddings)

    def embed_texts(self, texts: list[str]) -> list[torch.Tensor]:
        """Per text, ``[M, P]`` projected embeddings of its 77-token rows (BOS / EOS, zero padding)."""
        length = self.context_length
        rows, masks, counts = [], [], []
        for text in texts:
            ids = torch.tensor(self.tokenizer(text, truncation=False, verbose=False)["input_ids"], dtype=torch.long)
            m = max(1, -(-len(ids) // length))
            padded, mask = torch.zeros(2, m * length, dtype=torch.long)
            padded[: len(ids)], mask[: len(ids)] = ids, 1
            rows.append(padded.view(m, length))
            masks.append(mask.view(m, length))
            counts.append(m)
        device = self.text_projection.weight.device
        pooled = self.text_model(input_ids=torch.cat(rows).to(device),
                                 attention_mask=torch.cat(masks).to(device)).pooler_output
        return list(self.text_projection(pooled).split(counts))

    def project_patches(self, normed: torch.Tensor) -> torch.Tensor:
        """CLIP's image projection of post-layernorm patch features (cast to the projection's dtype)."""
        return self.visual_projection(normed.to(self.visual_projection.weight.dtype))


def load_clip_relevance(source: str, backbone: nn.Module) -> ClipRelevanceTower:
    """The CLIP parts CDPruner needs, from a CLIP checkpoint (hub id or folder) or ``"tiny:clip"``
    (a random tiny CLIP sized to the backbone, no hub: tests and smoke runs)."""
    vision = getattr(backbone.config, "vision_config", None)
    width = getattr(vision, "hidden_size", None)
    if source.startswith("tiny:"):
        if source != "tiny:clip":
            raise AuxiliaryModelError(f"unknown tiny auxiliary model {source!r}; expected 'tiny:clip'")
        clip, tokenizer = tiny_clip(width)
    else:
        from transformers import AutoTokenizer, CLIPModel

        clip = CLIPModel.from_pretrained(source, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
    if clip.visual_projection.in_features != width:
        raise AuxiliaryModelError(
            f"CLIP model {source!r} projects {clip.visual_projection.in_features}-wide patch features, but the "
            f"backbone's vision tower is {width} wide: use the CLIP checkpoint the backbone's tower comes from")
    return ClipRelevanceTower(clip.text_model, clip.text_projection, clip.visual_projection, tokenizer)


class CDPruner(TokenSelector):
    """CDPruner (arXiv 2506.10967): instruction-conditioned DPP over the projector outputs, before the LLM.

    ``keep``: patches kept per view (LLaVA-1.5: per image, the papers' 128 / 64 / 32 of 576;
    LLaVA-NeXT: per crop, 128 / 64 / 32 giving their 640 / 320 / 160; Qwen2.5-VL: per image).
    ``relevance_source``: ``auto`` (``clip_text`` on the LLaVA families, ``llm_embed`` on Qwen),
    ``clip_text``, ``llm_embed`` or ``none`` (see the module docs). ``text_model``: the CLIP checkpoint
    for ``clip_text`` (hub id or folder; ``"tiny:clip"`` for tests). ``relevance_sign``: -1 (the
    official formula; unverified for ``llm_embed``) or +1. ``theta``: ``None`` (quality = relevance,
    the evaluated code) or in (0, 1) for ``exp(theta / (2 (1 - theta)) r)``. ``normalize_in_input_dtype``:
    normalise the projector outputs in their own dtype before the float32 kernel (the official
    order; False: in float32). ``text_dtype``: ``float32`` (the authors) or ``model`` for the CLIP parts.
    """

    needs = _NEEDS["clip_text"]
    example_kwargs = {"keep": 6, "text_model": "tiny:clip"}
    positions = "compact"  # the authors' LLaVA code renumbers the kept tokens (Qwen keeps its M-RoPE ids)

    def __init__(self, keep: int = 64, relevance_source: str = "auto", text_model: str = DEFAULT_TEXT_MODEL,
                 relevance_sign: int = -1, theta: float | None = None, normalize_in_input_dtype: bool = True,
                 text_dtype: str = "float32"):
        check_int(self, keep, "keep", minimum=1)
        check_choice(self, relevance_source, "relevance_source", RELEVANCE_SOURCES)
        check_choice(self, relevance_sign, "relevance_sign", (-1, 1))
        if theta is not None:
            check_number(self, theta, "theta", 0.0, 1.0)
            if not 0 < theta < 1:
                raise fail(self, "theta", "None or a number in (0, 1)", theta)
        if not isinstance(normalize_in_input_dtype, bool):
            raise fail(self, "normalize_in_input_dtype", "a bool", normalize_in_input_dtype)
        if not isinstance(text_model, str) or not text_model:
            raise fail(self, "text_model", "a CLIP hub id, a local folder or 'tiny:clip'", text_model)
        check_choice(self, text_dtype, "text_dtype", DTYPES)
        self.keep = keep
        self.relevance_source = relevance_source
        self.text_model = text_model
        self.relevance_sign = relevance_sign
        self.theta = theta
        self.normalize_in_input_dtype = normalize_in_input_dtype
        self.text_dtype = text_dtype
        self._source = None if relevance_source == "auto" else relevance_source
        self.needs = _NEEDS[self._source or "clip_text"]

    # -- schedule --------------------------------------------------------------------------
    def _resolve(self, info) -> str:
        if info.family not in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"):
            raise UnsupportedModelError(f"cdpruner supports LLaVA-1.5, LLaVA-NeXT and Qwen2-VL / 2.5-VL, not {info.family}")
        if self.relevance_source == "auto":
            self._source = "llm_embed" if info.family.startswith("qwen") else "clip_text"
        elif self._source == "clip_text" and info.family.startswith("qwen"):
            raise UnsupportedModelError(
                f"cdpruner relevance_source='clip_text' needs a CLIP vision tower; {info.family} has none "
                "(use 'llm_embed', the labelled default there, or 'none')")
        self.needs = _NEEDS[self._source]
        return self._source

    def stages(self, info):
        self._resolve(info)
        if info.family == "llava_next":
            return [Stage("vision", min(1.0, self.keep / info.view_tokens), exact=False)]
        return [Stage("vision", self.keep)]

    def auxiliary_models(self):
        if self._source in (None, "clip_text"):
            return [AuxiliarySpec("text_tower", self.text_model, load_clip_relevance, self.text_dtype)]
        return []

    def keep_count(self, stage, current, original, images):
        """From counts (``fvlm profile``): ``keep`` per image, or the nominal fraction on LLaVA-NeXT."""
        if isinstance(stage.keep, float):
            return stage.count(original)
        return torch.minimum(images.clamp(min=1) * stage.keep, current)

    def stage_budget(self, ctx):
        """Per view (LLaVA-NeXT: per crop, plus the newline tokens, which stay): ``min(keep, view size)``."""
        counts = [sum(min(self.keep, v.rows * v.cols) for v in lay.views) + len(lay.unviewed) for lay in ctx.layout]
        return torch.tensor(counts, dtype=torch.long, device=ctx.hidden.device)

    def overhead_flops(self, info, stage, seq_len, n_visual) -> float:
        """The kernel and greedy MAP per view, plus one 77-token row of a ViT-L/14 CLIP text tower
        for ``clip_text`` (longer instructions add a row each)."""
        views = max(1, n_visual // info.view_tokens) if info.view_tokens else 1
        per_view = n_visual / views
        text = clip_text_flops(1) if self._resolve(info) == "clip_text" else 0.0
        return views * dpp_map_flops(per_view, info.hidden_size, min(self.keep, per_view)) + text

    # -- selection -------------------------------------------------------------------------
    def relevance(self, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Normalised relevance ``[N]`` of one sample's patch embeddings ``[N, P]`` to its text rows ``[M, P]``."""
        v, t = F.normalize(patches.float(), dim=-1), F.normalize(text.float(), dim=-1)
        s = self.relevance_sign * (v @ t.T).mean(dim=1)
        lo, hi = s.min(), s.max()
        if not bool(hi > lo):
            return torch.ones_like(s)
        return (s - lo + 1e-6) / (hi - lo)

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1).float() if self.normalize_in_input_dtype else F.normalize(x.float(), dim=-1)

    def select(self, ctx):
        source = self._source
        texts = ctx.auxiliary("text_tower").embed_texts(ctx.instructions) if source == "clip_text" else None
        jobs = []  # (sample, view, unit features, quality)
        for b, layout in enumerate(ctx.layout):
            if not layout.views:
                continue
            feats = [ctx.view_features(b, v) for v in layout.views]
            sizes = [f.shape[0] for f in feats]
            quality = torch.ones(sum(sizes), device=ctx.hidden.device)
            if source == "clip_text":
                tower, norm = ctx.auxiliary("text_tower"), ctx.vision_post_norm
                patches = torch.cat([tower.project_patches(norm(ctx.view_vision_features(v))) for v in layout.views])
                quality = self.relevance(patches, texts[b].to(patches.device))
            elif source == "llm_embed":
                text = ctx.hidden[b, ctx.text_after_visual[b]]
                quality = self.relevance(torch.cat(feats), text) if len(text) else quality
            if self.theta is not None:
                quality = torch.exp(self.theta / (2 * (1 - self.theta)) * quality)
            for view, x, q in zip(layout.views, feats, quality.split(sizes)):
                jobs.append((b, view, self._unit(x), q))
        kept = [list(lay.unviewed.tolist()) for lay in ctx.layout]
        for size in sorted({x.shape[0] for _, _, x, _ in jobs}):
            group = [j for j in jobs if j[2].shape[0] == size]
            unit = torch.stack([x for _, _, x, _ in group])
            quality = torch.stack([q for _, _, _, q in group])
            valid = torch.ones(quality.shape, dtype=torch.bool, device=quality.device)
            picks, stopped = dpp_greedy_map(unit, quality, valid, self.keep)
            for (b, view, _, _), row, fallback in zip(group, picks.cpu(), stopped.tolist()):
                cells = view.index.flatten()[row[row >= 0]]
                kept[b] += cells[cells >= 0].tolist()
                if fallback:
                    ctx.note(f"sample {b}, view {view.source}: the kernel's rank is below keep={self.keep}; "
                             "the last slots were filled by relevance")
        width = max((len(k) for k in kept), default=0)
        out = torch.full((len(kept), width), -1, dtype=torch.long)
        for b, k in enumerate(kept):
            out[b, : len(k)] = torch.tensor(sorted(k), dtype=torch.long)
        return Selection(out.to(ctx.hidden.device))
