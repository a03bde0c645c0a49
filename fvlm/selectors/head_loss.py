"""Cross-entropy of an LM head's logits against their own argmax, with the input gradient from one
read of the head's weight.

PIO-FVLM's proxy loss on a few rows ``x`` is ``CE(head(x), argmax head(x))``. Autograd reads the
``[V, D]`` head weight twice for it: ``z = x W^T + b`` forward and ``dz W`` backward. With the label
being the argmax, ``dL/dx = softmax(z) W - W[y]``, and ``softmax(z) W`` can be accumulated while
``z`` is computed, chunk by chunk over the vocabulary, with a running maximum (the online-softmax
rescaling). Each chunk of ``W`` is then read from memory once and reused from cache. The loss is
``log sum exp(z - max z)``. On a CPU this halves the head's memory traffic (a fifth of the rows
proxy's time at the Vicuna-7B shape); on a GPU the per-chunk kernel launches cost more than the
second read, so [`self_argmax_cross_entropy`][fvlm.selectors.head_loss.self_argmax_cross_entropy] keeps plain autograd there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 4 * 2**20  # weight rows per chunk: about 4 MiB, so a chunk stays in cache for its second use


def self_argmax_cross_entropy(x: torch.Tensor, head: nn.Module | torch.Tensor, *, fused: bool | None = None
                              ) -> torch.Tensor:
    """Per-row ``CE(head(x), argmax)`` (``[...]`` for ``x`` ``[..., D]``), in at least float32.

    ``head``: a module, or a weight matrix ``[V, D]`` used as a bias-free linear head (e.g. the
    input-embedding matrix). Logits are computed in the head's dtype and promoted like
    ``logits.float()``; differentiable w.r.t. ``x`` only (the head gets no gradient). ``fused``
    (default: a plain ``nn.Linear`` head or a weight matrix, on the CPU) computes the gradient in the
    forward pass with one read of the weight; otherwise plain autograd. Both give the same loss and
    gradient up to float rounding.
    """
    weight_only = isinstance(head, torch.Tensor)
    if fused is None:
        fused = (weight_only or type(head) is nn.Linear) and x.device.type == "cpu"
    if weight_only:
        weight = head.detach()
        head = lambda rows: F.linear(rows, weight)  # noqa: E731
    if not fused:
        logits = head(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        labels = logits.detach().argmax(dim=-1)
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").view_as(labels)
    if weight_only:
        weight, bias = weight, None
    elif type(head) is nn.Linear:
        weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
    else:
        raise TypeError(f"self_argmax_cross_entropy(fused=True) needs a plain nn.Linear head, got {type(head).__name__}")
    flat = x.reshape(-1, x.shape[-1])
    loss = _FusedHeadLoss.apply(flat, weight, bias)
    return loss.view(x.shape[:-1])


class _FusedHeadLoss(torch.autograd.Function):
    """``[R, D]`` rows -> ``[R]`` losses; the forward also computes and keeps ``dL/dx``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        rows, vocab = x.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_BYTES // (weight.shape[1] * weight.element_size()))
        peak = torch.full((rows, 1), -torch.inf, dtype=acc_dtype, device=x.device)
        total = torch.zeros(rows, 1, dtype=acc_dtype, device=x.device)
        mixed = torch.zeros(rows, weight.shape[1], dtype=acc_dtype, device=x.device)  # sum_v exp(z_v - peak) W_v
        label = torch.zeros(rows, dtype=torch.long, device=x.device)
        for start in range(0, vocab, chunk):
            w = weight[start:start + chunk]
            z = F.linear(x, w, None if bias is None else bias[start:start + chunk]).to(acc_dtype)
            top, where = z.max(dim=-1, keepdim=True)
            label = torch.where(top[:, 0] > peak[:, 0], where[:, 0] + start, label)  # first maximum wins ties
            new_peak = torch.maximum(peak, top)
            rescale = torch.exp(peak - new_peak)
            p = torch.exp(z - new_peak)
            total = total * rescale + p.sum(dim=-1, keepdim=True)
            mixed = mixed * rescale + torch.matmul(p.to(weight.dtype), w).to(acc_dtype)
            peak = new_peak
        ctx.save_for_backward(mixed / total - weight[label].to(acc_dtype))
        ctx.input_dtype = x.dtype
        return total.log().squeeze(-1)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_x,) = ctx.saved_tensors
        return (grad_loss[:, None] * grad_x).to(ctx.input_dtype), None, None
