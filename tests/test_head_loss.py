"""``self_argmax_cross_entropy``: the one-pass (fused) head loss equals plain autograd.

Loss and input gradient agree in float64 to 1e-12 for heads with and without bias, with chunks that
do and do not divide the vocabulary (the running maximum moves between chunks), for a batch of
rows; in bfloat16 to bfloat16 rounding. The head's weight gets no gradient. A non-Linear head
falls back to autograd by default and is refused when ``fused=True`` is forced.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fvlm.selectors import head_loss
from fvlm.selectors.head_loss import self_argmax_cross_entropy


def _loss_and_grad(x, head, fused, weights):
    leaf = x.detach().clone().requires_grad_()
    loss = self_argmax_cross_entropy(leaf, head, fused=fused)
    (grad,) = torch.autograd.grad((loss * weights).sum(), [leaf])
    return loss.detach(), grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 1000])
def test_fused_equals_autograd_in_float64(monkeypatch, bias, chunk_rows):
    gen = torch.Generator().manual_seed(chunk_rows + bias)
    head = nn.Linear(12, 37, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(37, 12, generator=gen, dtype=torch.float64))
    x = torch.randn(3, 4, 12, generator=gen, dtype=torch.float64)
    weights = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", chunk_rows * 12 * 8)
    loss, grad = _loss_and_grad(x, head, True, weights)
    ref_loss, ref_grad = _loss_and_grad(x, head, False, weights)
    assert loss.shape == (3, 4) and loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-12)
    assert head.weight.grad is None


def test_fused_is_the_default_on_cpu_and_matches_in_bfloat16(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(64, 300, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 4, 64, generator=gen).to(torch.bfloat16)
    weights = torch.ones(2, 4)
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 64 * 64 * 2)  # 5 chunks of 64 rows
    loss, grad = _loss_and_grad(x, head, None, weights)
    ref_loss, ref_grad = _loss_and_grad(x, head, False, weights)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=2e-2 * float(ref_grad.abs().max()), rtol=2e-2)
    calls = []
    monkeypatch.setattr(head_loss._FusedHeadLoss, "apply", lambda *a: calls.append(a) or torch.zeros(8))
    self_argmax_cross_entropy(x, head)
    assert calls, "a plain nn.Linear head on the CPU takes the fused path by default"


class Scaled(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


def test_other_heads_use_autograd_and_refuse_fused():
    head = Scaled(nn.Linear(8, 11).double())
    x = torch.randn(5, 8, dtype=torch.float64)
    loss = self_argmax_cross_entropy(x, head)
    logits = head(x)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, logits.argmax(-1), reduction="none"))
    with pytest.raises(TypeError, match="plain nn.Linear head"):
        self_argmax_cross_entropy(x, head, fused=True)
