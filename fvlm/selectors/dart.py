"""DART: duplication-aware token reduction around key-norm pivots.

Paper: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", EMNLP 2025, https://arxiv.org/abs/2502.11494

What it does (one stage, in prefill, ``Stage(layer, ...)``: on the output of layer ``layer-1``,
so layer ``layer`` is the first to see the reduced sequence):

- inputs from layer ``layer-1``: its post-rotary key states (KV heads concatenated,
  ``[B, L, H_kv * head_dim]``) and its output hidden states passed through the model's final norm;
- pivots: the ``pivots_visual`` visual tokens and the ``pivots_text`` text tokens after the image
  (after the sample's first visual token) with the largest L1 norm of keys;
- for each pivot in turn, the visual tokens with the *lowest* cosine similarity (normalised hidden
  states) to it leave the pool and are kept. Visual pivots are kept, text pivots are not. All text
  tokens stay.

Pivot order (``pivot_order``). The authors' code visits ``list(set(image_pivots + text_pivots))``
over absolute sequence indices (counted from the sample's first real token), i.e. CPython's set
iteration order for those ints (roughly index modulo the hash-table size), which depends on the
prompt offset but is deterministic for a given prompt. ``"authors"`` (default) evaluates exactly
that expression, with the pivots inserted as the authors do (visual then text, each by descending
key norm); ``"position"`` visits them by ascending position instead (about 15 % of the kept tokens
change). The selection itself is [`fvlm.selectors.algorithms.dart_select`][fvlm.selectors.algorithms.dart_select].

Needs: ``Need.KEYS`` (keys of one layer, no attention probabilities: any attention kernel works),
``Need.TEXT`` (the text tokens after the image), ``Need.LAYERS`` (the final norm).

Budget. The authors' "128 tokens" setting keeps 132: a quota of ``keep // P`` visual tokens per
pivot (``P = pivots_visual + pivots_text = 8``, 16 each) plus the 4 visual pivots themselves.
fvlm defaults to exact budgets (``exact_budget=True``): the stage keeps exactly ``keep`` tokens,
the visual pivots plus ``keep - pivots_visual`` tokens split as evenly as possible over the
pivots (124 = 4 x 16 + 4 x 15 for 128, the extra ones to the first pivots visited).
``exact_budget=False`` (the paper recipes) reproduces the authors' count: the stage declares
``pivots_visual + P * (keep // P)`` tokens (132 for 128; see [`DART.stages`][fvlm.selectors.dart.DART.stages], also what the
trace reports) and, whenever a sample has all its pivots, picks exactly the authors' tokens
(16 per pivot). ``keep`` may be a fraction of the original visual count only with exact budgets.

Defaults: ``layer=2`` (the paper's K=2), ``keep=128``, 4 + 4 pivots. Positions: original ids with
gaps (the authors' ``position_ids = keep_indexs``).

Deviations from the official code:

- Exact budgets by default (above). With ``exact_budget=False`` and a sample with fewer text
  tokens after the image than ``pivots_text``, the declared count still holds (the spare quota is
  spread over the remaining pivots), whereas the official count would shrink.
- Visual/text tokens are located from token ids (the official code hard-codes LLaVA-1.5's offsets);
  batched with padding; multi-image prompts treat all of a sample's visual tokens as one pool and
  every text token after the first image as text.
- Ties (equal key norms, equal similarities) go to the lower index; the official code relies on
  ``torch.topk``'s unspecified tie order. Similarities in float32 (the authors: the model dtype).
- The KV cache is exact (layers ``< layer`` cache all tokens, later layers the pruned sequence).
"""
from __future__ import annotations

import torch

from fvlm.context import gather_rows, positions_of
from fvlm.selectors.algorithms import dart_pivots, dart_select
from fvlm.selectors.arguments import check_choice, check_int, check_keep, fail
from fvlm.selectors.base import Need, Stage, TokenSelector

PIVOT_ORDERS = ("authors", "position")


def pivot_visit_order(visual: list[int], text: list[int], order: str = "authors") -> list[int]:
    """Pivot slots (visual pivot ``j`` -> ``j``, text pivot ``j`` -> ``len(visual) + j``) in visiting order.

    ``visual`` / ``text``: absolute sequence index of each pivot, in descending key norm.
    ``"authors"``: ``list(set(visual + text))`` (CPython's set order, the authors' loop);
    ``"position"``: ascending index.
    """
    slot = {index: s for s, index in enumerate(visual + text)}
    ids = list(set(visual + text)) if order == "authors" else sorted(slot)
    return [slot[i] for i in ids]


class DART(TokenSelector):
    """DART (arXiv 2502.11494): keep the visual tokens least similar to key-norm pivots.

    ``layer``: prune after this many decoder layers; ``keep``: visual tokens kept (see the module
    docstring for ``exact_budget=False``, the authors' 132-for-128 count); ``pivots_visual`` /
    ``pivots_text``: number of pivots of each kind; ``pivot_order``: ``"authors"`` (their set
    order) or ``"position"``.
    """

    needs = frozenset({Need.KEYS, Need.TEXT, Need.LAYERS})
    example_kwargs = {"layer": 2, "keep": 0.5}

    def __init__(self, layer: int = 2, keep: int | float = 128, pivots_visual: int = 4, pivots_text: int = 4,
                 exact_budget: bool = True, pivot_order: str = "authors"):
        self.layer = check_int(self, layer, "layer", minimum=1)  # prune after that many decoder layers
        self.keep = check_keep(self, keep)
        check_int(self, pivots_visual, "pivots_visual", minimum=0)
        check_int(self, pivots_text, "pivots_text", minimum=0)
        if pivots_visual + pivots_text == 0:
            raise fail(self, "pivots_visual + pivots_text", "at least 1 (DART needs a pivot)", 0)
        if not exact_budget and not isinstance(keep, int):
            raise fail(self, "keep", "an int count with exact_budget=False (the authors' count)", keep)
        self.pivots_visual = pivots_visual
        self.pivots_text = pivots_text
        self.exact_budget = exact_budget
        self.pivot_order = check_choice(self, pivot_order, "pivot_order", PIVOT_ORDERS)

    def stage_keep(self) -> int | float:
        """Visual tokens the stage keeps: ``keep``, or the authors' count with ``exact_budget=False``."""
        if self.exact_budget:
            return self.keep
        pivots = self.pivots_visual + self.pivots_text
        return self.pivots_visual + pivots * (self.keep // pivots)

    def stages(self, info):
        return [Stage(self.layer, self.stage_keep())]

    def select(self, ctx) -> torch.Tensor:
        keys = ctx.keys()  # [B, H_kv, L, hd], post-rotary, of the layer that just ran
        keys = keys.transpose(1, 2).flatten(2)  # [B, L, H_kv * hd]
        normed = ctx.final_norm(ctx.hidden)
        txt_index, txt_valid = positions_of(ctx.text_after_visual)
        vis_index = ctx.visual_index
        vis_keys, txt_keys = gather_rows(keys, vis_index), gather_rows(keys, txt_index)
        # The stage budget already is the authors' count when exact_budget=False (see stages()), and
        # exact splitting of that count reproduces the authors' k // P quotas when all pivots exist.
        return dart_select(
            vis_keys, gather_rows(normed, vis_index), ctx.visual_valid,
            txt_keys, gather_rows(normed, txt_index), txt_valid,
            ctx.budget, n_pivots_visual=self.pivots_visual, n_pivots_text=self.pivots_text,
            exact_budget=True, visit=self._visit(ctx, vis_keys, txt_keys, txt_index, txt_valid),
        )

    def _visit(self, ctx, vis_keys, txt_keys, txt_index, txt_valid) -> torch.Tensor:
        """``[B, Pv + Pt]`` pivot slots in visiting order (see [`pivot_visit_order`][fvlm.selectors.dart.pivot_visit_order])."""
        n_vis = ctx.visual_valid.sum(1)
        pv = torch.minimum(n_vis.clamp(max=self.pivots_visual), ctx.budget)  # as dart_select cuts them
        vis_piv, txt_piv = dart_pivots(vis_keys, ctx.visual_valid, txt_keys, txt_valid, pv, self.pivots_text)
        absolute = ctx.token_valid.long().cumsum(1) - 1  # counted from the sample's first real token
        vis_abs = absolute.gather(1, ctx.visual_index.clamp(min=0)).gather(1, vis_piv.clamp(min=0))
        txt_abs = absolute.gather(1, txt_index.clamp(min=0)).gather(1, txt_piv.clamp(min=0))
        width = self.pivots_visual + self.pivots_text
        rows = []
        for b in range(vis_piv.shape[0]):
            visual = [int(a) for a, p in zip(vis_abs[b].tolist(), vis_piv[b].tolist()) if p >= 0]
            text = [int(a) for a, p in zip(txt_abs[b].tolist(), txt_piv[b].tolist()) if p >= 0]
            order = pivot_visit_order(visual, text, self.pivot_order)
            slots = [s if s < len(visual) else self.pivots_visual + s - len(visual) for s in order]
            rows.append(slots + [s for s in range(width) if s not in slots])
        return torch.tensor(rows, dtype=torch.long, device=ctx.hidden.device).reshape(-1, width)
