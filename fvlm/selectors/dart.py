"""DART: duplication-aware token reduction around key-norm pivots.

Paper: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", EMNLP 2025, https://arxiv.org/abs/2502.11494

What it does (one stage, in prefill, ``Stage(layer, ...)``: on the output of layer ``layer-1``,
so layer ``layer`` is the first to see the reduced sequence):

- inputs from layer ``layer-1``: its post-rotary key states (KV heads concatenated,
  ``[B, L, H_kv * head_dim]``) and its output hidden states passed through the model's final norm;
- pivots: the ``pivots_visual`` visual tokens and the ``pivots_text`` text tokens after the image
  (after the sample's first visual token) with the largest L1 norm of keys;
- for each pivot in turn (visual pivots by position, then text pivots by position), the visual
  tokens with the *lowest* cosine similarity (normalised hidden states) to it leave the pool and
  are kept. Visual pivots are kept, text pivots are not. All text tokens stay.

The selection itself is :func:`fvlm.selectors.algorithms.dart_select`.

Needs: ``Need.KEYS`` (keys of one layer, no attention probabilities: any attention kernel works),
``Need.TEXT`` (the text tokens after the image), ``Need.LAYERS`` (the final norm).

Budget. The authors' "128 tokens" setting keeps 132: a quota of ``keep // P`` visual tokens per
pivot (``P = pivots_visual + pivots_text = 8``, 16 each) plus the 4 visual pivots themselves.
fvlm defaults to exact budgets (``exact_budget=True``): the stage keeps exactly ``keep`` tokens,
the visual pivots plus ``keep - pivots_visual`` tokens split as evenly as possible over the
pivots (124 = 4 x 16 + 4 x 15 for 128). ``exact_budget=False`` reproduces the authors' count: the
stage declares ``pivots_visual + P * (keep // P)`` tokens (132 for 128; see :meth:`DART.stages`,
also what the trace reports) and, whenever a sample has all its pivots, picks exactly the authors'
tokens (16 per pivot). ``keep`` may be a fraction of the original visual count only with exact
budgets.

Defaults: ``layer=2`` (the paper's K=2), ``keep=128``, 4 + 4 pivots.

Deviations from the official code:

- Exact budgets by default (above). With ``exact_budget=False`` and a sample with fewer text
  tokens after the image than ``pivots_text``, the declared count still holds (the spare quota is
  spread over the remaining pivots), whereas the official count would shrink.
- Visual/text tokens are located from token ids (the official code hard-codes LLaVA-1.5's offsets);
  batched with padding; multi-image prompts treat all of a sample's visual tokens as one pool and
  every text token after the first image as text.
- Ties (equal key norms, equal similarities) go to the lower index; the official code relies on
  ``torch.topk``'s unspecified tie order.
- The KV cache is exact (layers ``< layer`` cache all tokens, later layers the pruned sequence).
"""
from __future__ import annotations

import torch

from fvlm.context import gather_rows, positions_of
from fvlm.selectors.algorithms import dart_select
from fvlm.selectors.arguments import check_int, check_keep, fail
from fvlm.selectors.base import Need, Stage, TokenSelector


class DART(TokenSelector):
    """DART (arXiv 2502.11494): keep the visual tokens least similar to key-norm pivots.

    ``layer``: prune after this many decoder layers; ``keep``: visual tokens kept (see the module
    docstring for ``exact_budget=False``, the authors' 132-for-128 count); ``pivots_visual`` /
    ``pivots_text``: number of pivots of each kind.
    """

    needs = frozenset({Need.KEYS, Need.TEXT, Need.LAYERS})
    example_kwargs = {"layer": 2, "keep": 0.5}

    def __init__(self, layer: int = 2, keep: int | float = 128, pivots_visual: int = 4, pivots_text: int = 4,
                 exact_budget: bool = True):
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
        # The stage budget already is the authors' count when exact_budget=False (see stages()), and
        # exact splitting of that count reproduces the authors' k // P quotas when all pivots exist.
        return dart_select(
            gather_rows(keys, vis_index), gather_rows(normed, vis_index), ctx.visual_valid,
            gather_rows(keys, txt_index), gather_rows(normed, txt_index), txt_valid,
            ctx.budget, n_pivots_visual=self.pivots_visual, n_pivots_text=self.pivots_text,
            exact_budget=True,
        )
