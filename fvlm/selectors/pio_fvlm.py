"""PIO-FVLM (arXiv 2602.04657; "TRIO" in v3): gradient saliency of a layer-local proxy, then NMS + fill.

At each in-LLM stage (after ``l`` decoder layers) the hidden states ``X`` are detached into a leaf,
one decoder block, the final norm and the LM head are run on them (the *proxy*), and the
cross-entropy of the proxy's logits against their own argmax over the last ``K`` shifted prompt
positions is back-propagated to ``X``. A visual token's saliency is the L2 norm of its gradient row.
Tokens are then picked in saliency order with feature-space non-maximum suppression (cosine >= tau)
and the budget is filled in saliency order ([`fvlm.selectors.algorithms.nms_fill`][fvlm.selectors.algorithms.nms_fill]).

Differences from the authors' code (deliberate; see ``docs`` and the spec):

- batches of any size with left or right padding: the ``K`` loss rows are chosen per sample among
  its *valid* tokens (the ``K`` valid positions before its last prompt token), and several images
  per prompt are one pool of visual tokens;
- the loss is the sum over samples of each sample's mean over its ``K`` rows, so a sample's
  saliency does not depend on what else is in the batch (with batch size 1 this is their loss);
- ``proxy="rows"`` (default) runs the proxy block for the ``K`` loss rows only: the loss reads
  the block output at those rows, which depends on the other rows only through their keys and
  values, so norm + key projection run on all rows and queries / attention / values / MLP / final
  norm / LM head on the ``K`` rows (same loss and gradient up to float rounding, a fraction of the
  cost; [`fvlm.context.SelectionContext.run_layer_rows`][fvlm.context.SelectionContext.run_layer_rows]). ``proxy="block"`` runs the whole block
  like the authors, with ``head_rows="loss"`` (norm and head on the ``K`` rows; identical
  gradients) or ``head_rows="all"`` (float32 logits for every row, as the authors materialise);
- NMS runs batched on the device, with the same result as their CPU loop;
- the proxy defaults to the LLaVA variant (next block, real LM head, final norm) on every backbone;
  their Qwen variant is ``proxy_block="current", proxy_head="embed"`` (the layer that just ran, and
  the input-embedding matrix as head after the final norm), used by the Qwen paper recipes;
- saliency norms in float32 with ties to the lower index (their norm in the model dtype creates
  ties that their unstable sort orders arbitrarily).

Positions: compact (``positions = "compact"``, their LLaVA code renumbers kept tokens); on Qwen's
M-RoPE fvlm keeps the original ids, which is what their Qwen code does.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from fvlm.budget import counts_for_average
from fvlm.errors import BudgetError, FVLMError, SelectorArgumentError
from fvlm.selectors.algorithms import nms_fill
from fvlm.selectors.arguments import check_choice, check_number
from fvlm.selectors.base import Need, Stage, TokenSelector
from fvlm.selectors.head_loss import self_argmax_cross_entropy

if TYPE_CHECKING:
    from fvlm.adapters.base import ModelInfo
    from fvlm.context import SelectionContext

#: The authors' encoder-free LLaVA-1.5-7B schedules (32 layers, 576 visual tokens), as ``keep`` counts
#: after layers ``[1, 10, 15]``. ``average=128`` derives exactly the first one.
AUTHORS_SCHEDULES: dict[str, dict] = {
    "llava15_avg128": dict(layers=[1, 10, 15], keep=[218, 128, 54]),
    "llava15_avg64": dict(layers=[1, 10, 15], keep=[92, 54, 22]),
    "llava_next_speed": dict(layers=[1, 10, 15], keep=[436, 255, 173]),  # of 2,880 visual tokens
}
AUTHORS_SHAPE = (218, 128, 54)  # relative stage sizes used to derive 3-stage schedules from `average`
DEFAULT_AVERAGE = 128.0
DEFAULT_N_VISUAL = 576  # LLaVA-1.5: 24 x 24 patches

PROXY_BLOCKS = ("next", "current")
PROXY_HEADS = ("lm_head", "embed")
PROXIES = ("rows", "block")
HEAD_ROWS = ("loss", "all")


class PIOFVLM(TokenSelector):
    """PIO-FVLM: proxy-loss gradient saliency + feature NMS + fill, at one or more in-LLM stages.

    Give at most one budget (`keep`, `keep_fraction`, `keep_ratio` or `average`), one entry per
    stage. With none, the authors' LLaVA-1.5 schedule: after layers `[1, 10, 15]` keep
    `[218, 128, 54]`, a layer average of 128.0 on 32 layers (their average-64 schedule is
    `keep=[92, 54, 22]`, see [`AUTHORS_SCHEDULES`][fvlm.selectors.pio_fvlm.AUTHORS_SCHEDULES]).

    Args:
        layers: stage positions, strictly increasing; `l` = after `l` decoder layers (1-based, below
            the model's layer count).
        keep: visual-token counts kept after each of `layers`.
        keep_fraction: fractions in (0, 1] of each sample's *original* visual-token count, rounded
            half to even.
        keep_ratio: fractions in (0, 1] of the count *entering each stage*, truncated
            (`int(ratio * current)`, at least 1), as the authors' Qwen code applies its ratios.
        average: target *layer average* of the visual-token count (the paper's "64 / 128 / 192
            tokens") for `n_visual` input tokens; per-stage counts from
            [`counts_for_average`][fvlm.budget.counts_for_average] (3 stages: the
            authors' shape 218 : 128 : 54), applied as fractions of each sample's count.
        n_visual: the input size `average` is derived for (another size gets the same proportions).
        k_last: number of shifted prompt positions in the proxy loss (K).
        tau: cosine threshold of the NMS.
        nms: `False`: plain top-k by saliency.
        proxy_block: `"next"` runs decoder layer `l` (0-based; the authors' LLaVA code), `"current"`
            re-runs layer `l - 1` (their Qwen code).
        head_rows: with `proxy="block"`: `"loss"` applies the final norm and LM head to the K loss
            rows only (same gradient, less memory), `"all"` to every row like the authors' code.
        proxy: `"rows"` computes the proxy block at the K loss rows only (keys for every row; same
            gradient up to float rounding, a fraction of the cost), `"block"` runs the full block on
            every row (the reference path).
        proxy_head: `"lm_head"`, or `"embed"`: the input-embedding matrix as the head after the
            final norm (the authors' Qwen code).
    """

    needs = frozenset({Need.GRADIENT, Need.LAYERS})
    positions = "compact"
    example_kwargs = {"layers": [1, 2], "keep_fraction": [0.5, 0.25]}

    def __init__(
        self,
        layers: list[int] = [1, 10, 15],  # noqa: B006 (copied; the default is the recipe schema)
        keep: list[int] | None = None,
        keep_fraction: list[float] | None = None,
        keep_ratio: list[float] | None = None,
        average: float | None = None,
        n_visual: int = DEFAULT_N_VISUAL,
        k_last: int = 4,
        tau: float = 0.8,
        nms: bool = True,
        proxy_block: str = "next",
        head_rows: str = "loss",
        proxy: str = "rows",
        proxy_head: str = "lm_head",
    ):
        self.layers = _int_list("layers", layers)
        if not self.layers:
            raise SelectorArgumentError("PIOFVLM: `layers` needs at least one stage")
        if self.layers[0] < 1 or any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise SelectorArgumentError(f"PIOFVLM: `layers` must be strictly increasing integers >= 1, got {self.layers}")
        given = [name for name, v in (("keep", keep), ("keep_fraction", keep_fraction), ("keep_ratio", keep_ratio),
                                      ("average", average)) if v is not None]
        if len(given) > 1:
            raise SelectorArgumentError(
                f"PIOFVLM: give only one of keep / keep_fraction / keep_ratio / average, got {' and '.join(given)}")
        if not given:
            average = DEFAULT_AVERAGE
        self.keep = self.keep_fraction = self.keep_ratio = self.average = None
        if keep is not None:
            self.keep = _int_list("keep", keep)
            self._check_budgets("keep", self.keep)
            if min(self.keep) < 1:
                raise SelectorArgumentError(f"PIOFVLM: `keep` counts must be >= 1, got {self.keep}")
        elif keep_fraction is not None:
            self.keep_fraction = [_float("keep_fraction", f) for f in _list("keep_fraction", keep_fraction)]
            self._check_budgets("keep_fraction", self.keep_fraction)
            if not all(0.0 < f <= 1.0 for f in self.keep_fraction):
                raise SelectorArgumentError(f"PIOFVLM: `keep_fraction` entries must be in (0, 1], got {self.keep_fraction}")
        elif keep_ratio is not None:
            self.keep_ratio = [_float("keep_ratio", f) for f in _list("keep_ratio", keep_ratio)]
            if len(self.keep_ratio) != len(self.layers):
                raise SelectorArgumentError(f"PIOFVLM: `keep_ratio` has {len(self.keep_ratio)} entries for "
                                            f"{len(self.layers)} stages (layers={self.layers})")
            if not all(0.0 < f <= 1.0 for f in self.keep_ratio):
                raise SelectorArgumentError(f"PIOFVLM: `keep_ratio` entries must be in (0, 1], got {self.keep_ratio}")
        else:
            self.average = _float("average", average)
            if not self.average > 0:
                raise SelectorArgumentError(f"PIOFVLM: `average` must be > 0, got {self.average}")
        self.n_visual = _int("n_visual", n_visual)
        if self.n_visual < 1:
            raise SelectorArgumentError(f"PIOFVLM: `n_visual` must be >= 1, got {self.n_visual}")
        if self.average is not None and self.average > self.n_visual:
            raise SelectorArgumentError(f"PIOFVLM: `average`={self.average} exceeds the assumed input of n_visual={self.n_visual} tokens")
        self.k_last = _int("k_last", k_last)
        if self.k_last < 1:
            raise SelectorArgumentError(f"PIOFVLM: `k_last` must be >= 1, got {self.k_last}")
        self.tau = check_number(self, tau, "tau", -1.0, 1.0)  # a cosine threshold
        if not isinstance(nms, bool):
            raise SelectorArgumentError(f"PIOFVLM: `nms` must be a bool, got {nms!r}")
        self.nms = nms
        self.proxy_block = check_choice(self, proxy_block, "proxy_block", PROXY_BLOCKS)
        self.head_rows = check_choice(self, head_rows, "head_rows", HEAD_ROWS)
        check_choice(self, proxy, "proxy", PROXIES)
        if proxy == "rows" and head_rows == "all":
            raise SelectorArgumentError(
                "PIOFVLM: head_rows='all' applies the LM head to every block output row, which proxy='rows' "
                "does not compute; use proxy='block' with head_rows='all'"
            )
        self.proxy = proxy
        self.proxy_head = check_choice(self, proxy_head, "proxy_head", PROXY_HEADS)

    def _check_budgets(self, name: str, values: list) -> None:
        if len(values) != len(self.layers):
            raise SelectorArgumentError(f"PIOFVLM: `{name}` has {len(values)} entries for {len(self.layers)} stages (layers={self.layers})")
        if any(b > a for a, b in zip(values, values[1:])):
            raise SelectorArgumentError(f"PIOFVLM: `{name}` must not increase from one stage to the next, got {values}")

    # -- schedule --------------------------------------------------------------------------
    def counts(self, info: "ModelInfo", n_visual: int | None = None) -> list[int]:
        """Per-stage visual-token counts for an input of ``n_visual`` tokens (default: ``self.n_visual``).

        ``keep`` gives itself; fractions are rounded like the session does ([`Stage.count`][fvlm.types.Stage.count]);
        ``keep_ratio`` multiplies the count entering each stage (truncated).
        """
        n = self.n_visual if n_visual is None else int(n_visual)
        if self.keep is not None:
            return list(self.keep)
        if self.keep_ratio is not None:
            out = []
            for r in self.keep_ratio:
                n = int(_ratio_count(torch.tensor([n]), r)[0])
                out.append(n)
            return out
        return [int(Stage(1, f).count(n)) for f in self._fractions(info)]

    def _derived_counts(self, info: "ModelInfo") -> list[int]:
        shape = AUTHORS_SHAPE if len(self.layers) == 3 else None
        try:
            counts = counts_for_average(self.layers, self.average, info.num_layers, self.n_visual, shape=shape)
        except ValueError as err:
            raise BudgetError(
                f"PIOFVLM: cannot reach a layer average of {self.average} visual tokens (of n_visual={self.n_visual}) "
                f"with stages after layers {self.layers} on {info.num_layers} layers: {err}"
            ) from err
        if min(counts) < 1:
            raise BudgetError(
                f"PIOFVLM: a layer average of {self.average} (of n_visual={self.n_visual}) after layers {self.layers} "
                f"needs a stage keeping no tokens ({counts}); raise `average` or move the stages"
            )
        return counts

    def _fractions(self, info: "ModelInfo") -> list[float]:
        if self.keep_fraction is not None:
            return list(self.keep_fraction)
        return [c / self.n_visual for c in self._derived_counts(info)]

    def stages(self, info: "ModelInfo") -> list[Stage]:
        last = info.num_layers - 1
        if self.layers[-1] > last:
            raise FVLMError(
                f"PIOFVLM: a stage after layer {self.layers[-1]} is out of range for {info.family} with "
                f"{info.num_layers} decoder layers (use 1..{last}; the 'next' proxy block is layer index l, "
                "which must exist)"
            )
        if self.keep is not None:
            return [Stage(l, k) for l, k in zip(self.layers, self.keep)]
        if self.keep_ratio is not None:  # the count is keep_count's: ratio x the count entering the stage
            return [Stage(l, r, rounding="floor") for l, r in zip(self.layers, self.keep_ratio)]
        return [Stage(l, f) for l, f in zip(self.layers, self._fractions(info))]

    def keep_count(self, stage, current, original, images):
        if self.keep_ratio is None:
            return super().keep_count(stage, current, original, images)
        return _ratio_count(current, self.keep_ratio[self.layers.index(stage.where)])

    # -- saliency --------------------------------------------------------------------------
    def loss_rows(self, ctx: "SelectionContext") -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, the ``K`` positions whose shifted logits enter the loss: ``([B, K] long, [B, K] valid)``.

        They are the ``K`` valid tokens right before the sample's last prompt token (rows ``t``
        predict ``t + 1``, so the last token's row has no target); fewer when the sample is shorter.
        """
        valid = ctx.token_valid
        seq = valid.shape[1]
        rank = valid.long().cumsum(dim=1)  # 1-based rank of each valid token
        total = rank[:, -1:]
        chosen = valid & (rank < total) & (rank >= total - self.k_last)
        width = min(self.k_last, seq)
        ar = torch.arange(seq, device=valid.device)
        rows = torch.where(chosen, ar, seq).sort(dim=1).values[:, :width]
        ok = rows < seq
        return rows.clamp(max=seq - 1), ok

    def proxy_loss(self, ctx: "SelectionContext") -> Callable[[torch.Tensor], torch.Tensor]:
        """The objective ``X -> L`` of the spec (labels = the proxy's own detached argmax)."""
        block = ctx.layer if self.proxy_block == "next" else ctx.layer - 1
        rows, ok = self.loss_rows(ctx)
        norm = ctx.final_norm
        head = ctx.lm_head if self.proxy_head == "lm_head" else ctx.input_embeddings.weight

        def objective(x: torch.Tensor) -> torch.Tensor:
            if self.proxy == "rows":
                ce = self_argmax_cross_entropy(norm(ctx.run_layer_rows(block, x, rows)), head)
            elif self.head_rows == "loss":
                y = ctx.run_layer(block, x)
                ce = self_argmax_cross_entropy(norm(y.gather(1, rows[..., None].expand(-1, -1, y.shape[-1]))), head,
                                               fused=False)
            else:
                y = ctx.run_layer(block, x)
                full = (F.linear(norm(y), head) if isinstance(head, torch.Tensor) else head(norm(y)))
                full = full.to(torch.promote_types(y.dtype, torch.float32))
                logits = full.gather(1, rows[..., None].expand(-1, -1, full.shape[-1]))
                labels = logits.detach().argmax(dim=-1)
                ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
            weight = ok.to(ce.dtype) / ok.sum(dim=1, keepdim=True).clamp(min=1).to(ce.dtype)
            return (ce * weight).sum()  # sum over samples of each sample's mean over its rows

        return objective

    def gradient(self, ctx: "SelectionContext") -> torch.Tensor:
        """``dL/dX`` ``[B, L, D]`` at ``X = ctx.hidden`` (model weights get no gradient)."""
        return ctx.grad(self.proxy_loss(ctx))

    def saliency(self, ctx: "SelectionContext") -> torch.Tensor:
        """``[B, N]`` float32 L2 norm of the gradient row of every visual token (0 in padding slots)."""
        grad = self.gradient(ctx)
        index = ctx.visual_index
        rows = grad.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, grad.shape[-1]))
        return rows.float().norm(dim=-1) * ctx.visual_valid

    # -- selection -------------------------------------------------------------------------
    def select(self, ctx: "SelectionContext") -> torch.Tensor:
        return nms_fill(self.saliency(ctx), ctx.visual_hidden, ctx.visual_valid, ctx.budget, self.tau, self.nms)


def _ratio_count(current: torch.Tensor, ratio: float) -> torch.Tensor:
    """``int(ratio * current)`` per sample (the authors' Qwen rule), at least 1, 0 without visual tokens."""
    kept = (current.double() * ratio).floor().long().clamp(min=1)
    return torch.where(current > 0, kept, 0)


# -- argument checks -------------------------------------------------------------------------
def _list(name: str, value) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise SelectorArgumentError(f"PIOFVLM: `{name}` must be a list, got {value!r}")
    return list(value)


def _int(name: str, value) -> int:
    if isinstance(value, bool):
        raise SelectorArgumentError(f"PIOFVLM: `{name}` must be an int, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int):
        raise SelectorArgumentError(f"PIOFVLM: `{name}` must be an int, got {value!r}")
    return value


def _int_list(name: str, value) -> list[int]:
    return [_int(name, v) for v in _list(name, value)]


def _float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SelectorArgumentError(f"PIOFVLM: `{name}` must be a finite number, got {value!r}")
    return float(value)
