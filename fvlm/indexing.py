"""Index arithmetic for pruned sequences: keep maps, and gathering positions, masks and rotary tables."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class KeepMap:
    """Which positions of a source sequence form the pruned one.

    ``index`` ``[B, L']`` holds source positions in their new order; ``filler`` marks slots that only
    square the batch up (samples that keep fewer tokens): they are masked everywhere. ``source_col``
    gives, per slot, the column of the selection it came from (``-1`` for untouched text tokens).
    """

    index: torch.Tensor
    filler: torch.Tensor
    source_col: torch.Tensor

    @cached_property
    def ordered(self) -> "KeepMap":
        """The same kept set with ``index`` ascending per row (fillers stay first).

        A selection may reorder kept visual tokens (merged tokens appended after the kept ones). The
        sequence order is what causality and compact positions follow, so masks and compact ids are
        built from this map; hidden states and original position ids follow ``index`` itself.
        """
        key = torch.where(self.filler, -1, self.index).sort(dim=1).values
        return KeepMap(key.clamp(min=0), self.filler, self.source_col)

    def then(self, later: "KeepMap") -> "KeepMap":
        """Compose: ``later`` indexes this map's output; the result indexes this map's source."""
        return KeepMap(
            self.index.gather(1, later.index),
            self.filler.gather(1, later.index) | later.filler,
            later.source_col,
        )

    def extended(self, source_len: int, new_len: int) -> "KeepMap":
        """This map (over a source of ``source_len`` positions) for the source grown to ``new_len``:
        the added positions are all kept, after the others."""
        bsz = self.index.shape[0]
        added = torch.arange(source_len, new_len, device=self.index.device).expand(bsz, new_len - source_len)
        return KeepMap(torch.cat([self.index, added], dim=1), torch.cat([self.filler, torch.zeros_like(added, dtype=torch.bool)], 1),
                       torch.cat([self.source_col, torch.full_like(added, -1)], dim=1))

    @staticmethod
    def identity(bsz: int, length: int, device) -> "KeepMap":
        index = torch.arange(length, device=device).expand(bsz, length)
        zeros = torch.zeros(bsz, length, dtype=torch.bool, device=device)
        return KeepMap(index, zeros, torch.full((bsz, length), -1, device=device))


def build_keep_map(droppable: torch.Tensor, visual_index: torch.Tensor, chosen: torch.Tensor) -> KeepMap:
    """Keep every non-droppable position plus the chosen visual tokens, squared up with fillers.

    ``droppable`` ``[B, L]`` marks visual tokens and earlier fillers; ``visual_index`` ``[B, N]`` lists
    visual positions; ``chosen`` ``[B, K]`` indexes ``visual_index`` (``-1`` padded), in the order the
    kept tokens should appear. The kept visual tokens take the slots of the kept visual positions
    sorted ascending, so an ascending selection keeps the original order. Fillers go first.
    """
    bsz, seq = droppable.shape
    device = droppable.device
    big = 2 * seq + chosen.shape[1] + 1
    ar = torch.arange(seq, device=device).expand(bsz, seq)
    ok = chosen >= 0
    picked = visual_index.gather(1, chosen.clamp(min=0))
    slots = torch.where(ok, picked, big).sort(dim=1).values
    keys = torch.cat([torch.where(droppable, big, ar), torch.where(ok, slots, big)], dim=1)
    values = torch.cat([ar, picked], dim=1)
    cols = torch.cat([torch.full_like(ar, -1), torch.arange(chosen.shape[1], device=device).expand_as(chosen)], 1)
    order = keys.sort(dim=1, stable=True).indices
    counts = (~droppable).sum(dim=1) + ok.sum(dim=1)
    width = int(counts.max())
    shift = width - counts  # fillers at the front
    slot = torch.arange(width, device=device)[None, :] - shift[:, None]
    filler = slot < 0
    pick = order.gather(1, slot.clamp(min=0))
    index = torch.where(filler, 0, values.gather(1, pick))
    source_col = torch.where(filler, -1, cols.gather(1, pick))
    return KeepMap(index, filler, source_col)


def gather_last(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather position ids ``[..., B or 1, L]`` along the last axis with ``index`` ``[B, L']``."""
    bsz = index.shape[0]
    t = t.expand(*t.shape[:-2], bsz, t.shape[-1])
    return t.gather(-1, index.expand(*t.shape[:-2], *index.shape))


def gather_seq(t: torch.Tensor, index: torch.Tensor, *, zero_invalid: bool = False) -> torch.Tensor:
    """Gather ``t`` ``[B or 1, L, ...]`` (hidden states, cos/sin tables, per-token rows) along dim 1
    with a per-sample ``index`` ``[B, K]``: ``out[b, k] = t[b, index[b, k]]``. ``-1`` entries read
    position 0, or give zeros with ``zero_invalid``. fvlm's one gather helper."""
    if t.shape[0] != index.shape[0]:
        t = t.expand(index.shape[0], *t.shape[1:])
    idx = index.clamp(min=0).reshape(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:])
    out = t.gather(1, idx)
    if zero_invalid:
        out = out * (index >= 0).reshape(*index.shape, *([1] * (t.dim() - 2))).to(out.dtype)
    return out


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b, j]]`` for ``t`` ``[B, L, D]``; ``-1`` entries give zeros ([`gather_seq`][fvlm.indexing.gather_seq])."""
    return gather_seq(t, index, zero_invalid=True)


def masked_value(mask: torch.Tensor):
    """The 'blocked' value of a mask: False (bool), the dtype minimum (additive float), 0 (int 2-D)."""
    if mask.dtype == torch.bool:
        return False
    return torch.finfo(mask.dtype).min if mask.dtype.is_floating_point else 0


def gather_mask_columns(mask: torch.Tensor, keep: KeepMap, prompt_len: int) -> torch.Tensor:
    """Columns of a 2-D ``[B, K]`` or 4-D ``[B, h, Q, K]`` mask whose first ``prompt_len`` keys are
    the pruned prompt and the rest decode steps."""
    bsz = keep.index.shape[0]
    mask = mask.expand(bsz, *mask.shape[1:])
    lead = mask.shape[:-1]
    idx = keep.index.reshape(bsz, *([1] * (mask.dim() - 2)), -1).expand(*lead, -1)
    cols = mask[..., :prompt_len].gather(-1, idx)
    blocked = keep.filler.reshape(bsz, *([1] * (mask.dim() - 2)), -1).expand_as(cols)
    cols = cols.masked_fill(blocked, masked_value(mask))
    return torch.cat([cols, mask[..., prompt_len:]], dim=-1)


def gather_square_mask(mask: torch.Tensor, keep: KeepMap) -> torch.Tensor:
    """Prefill 4-D mask ``[B, h, L, L]``: rows and columns gathered, filler columns blocked."""
    bsz = keep.index.shape[0]
    mask = mask.expand(bsz, *mask.shape[1:])
    rows = keep.index[:, None, :, None].expand(bsz, mask.shape[1], -1, mask.shape[-1])
    return gather_mask_columns(mask.gather(2, rows), keep, mask.shape[-1])


def build_mask(keep: KeepMap, query_len: int, key_extra: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """A 4-D mask for a pruned sequence where the model had none: causal, fillers blocked.

    ``query_len`` equals the pruned length in prefill (square causal mask) or 1 in decode (then
    ``key_extra`` decode columns follow the prompt). ``kind`` is ``"bool"`` or ``"float"``.
    """
    bsz, length = keep.index.shape
    device = keep.index.device
    keys = length + key_extra
    if query_len == length and key_extra == 0:
        allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    else:
        allowed = torch.ones(1, 1, query_len, keys, dtype=torch.bool, device=device)
    allowed = allowed.expand(bsz, 1, query_len, keys).clone()
    allowed[..., :length] &= ~keep.filler[:, None, None, :]
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
