"""Measured FLOPs with torch's FLOP formulas, to cross-check the analytic full convention.

A small ``TorchDispatchMode`` applies ``torch.utils.flop_counter``'s formula registry (the one
``FlopCounterMode`` uses: 2 FLOPs per multiply-add of mm / bmm / addmm / convolution / SDPA, forward
and backward) to every aten op that runs. Three differences from ``FlopCounterMode``:

* no module tracker: ``FlopCounterMode`` puts backward hooks on every module, which breaks
  ``torch.autograd.grad`` called inside a forward (what a gradient-based selector such as PIO-FVLM
  does: "A leaf node was passed to _will_engine_execute_node"). Per-module totals here come from
  forward pre/post hooks instead (``root=``), attributing an op to every module on the forward stack;
* rotary tables are left out (ops inside a ``*RotaryEmbedding`` module under ``root``), as in the
  analytic convention: transformers up to 5.18 builds cos / sin from a position x frequency matmul,
  later releases element-wise, and the count must not depend on the release;
* SDPA counts come from fvlm's own registration for every SDPA kernel, forward and backward, with
  torch's formulas applied to key / value shapes broadcast to the query's heads: torch before 2.13
  rejects grouped-query attention (fewer key / value heads) in its formulas, and no torch release
  has a formula for the CPU flash-attention kernel SDPA uses on CPU
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), whose attention products
  would silently count 0.

Works on real tensors and on the meta device (a 7B model without weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper


def _query_heads(query_shape, key_shape, value_shape) -> tuple:
    """Key and value shapes with the query's heads (grouped-query attention repeats them)."""
    batch, heads = query_shape[:2]
    return (batch, heads, *key_shape[2:]), (batch, heads, *value_shape[2:])


def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, *_query_heads(query_shape, key_shape, value_shape))


def _sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, *_query_heads(query_shape, key_shape, value_shape))


_SDPA_KERNELS = ("efficient_attention", "flash_attention", "cudnn_attention", "flash_attention_for_cpu")


def _registry() -> dict:
    registry = dict(flop_registry)
    aten = torch.ops.aten
    for kernel in _SDPA_KERNELS:
        for suffix, fn in (("", _sdpa), ("_backward", _sdpa_backward)):
            op = getattr(aten, f"_scaled_dot_product_{kernel}{suffix}", None)
            if op is not None:
                registry[op] = shape_wrapper(fn)
    return registry


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.registry = _registry()
        self.total = 0
        self.by_op: dict[str, int] = {}
        self.stack: list[str] = []
        self.by_module: dict[str, int] = {}
        self.excluded: set[str] = set()  # module paths whose ops are not counted (rotary tables)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None and not self.excluded.intersection(self.stack):
            flops = int(formula(*args, **kwargs, out_val=out))
            self.total += flops
            name = str(func._overloadpacket)
            self.by_op[name] = self.by_op.get(name, 0) + flops
            for module in set(self.stack):
                self.by_module[module] = self.by_module.get(module, 0) + flops
        return out


@dataclass
class MeasuredFlops:
    """What ran: the total, per aten op, and (with ``root``) per module path of the forward stack."""

    total: int
    by_op: dict[str, int]
    by_module: dict[str, int]

    def module(self, suffix: str) -> int:
        """Total of the one module whose path ends with ``suffix`` (e.g. ``"language_model"``)."""
        hits = [v for k, v in self.by_module.items() if k == suffix or k.endswith("." + suffix)]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} modules match {suffix!r}")
        return hits[0]


def measure_flops(fn: Callable[..., Any], *args, root: nn.Module | None = None, **kwargs) -> tuple[Any, MeasuredFlops]:
    """Run ``fn(*args, **kwargs)`` counting FLOPs; return ``(result, MeasuredFlops)``.

    ``root``: a module whose submodules get per-module totals (``fn`` itself when it is a module).
    """
    counter = _Counter()
    root = root if root is not None else (fn if isinstance(fn, nn.Module) else None)
    handles = []
    if root is not None:
        for name, module in root.named_modules():
            path = name or type(root).__name__
            if type(module).__name__.endswith("RotaryEmbedding"):
                counter.excluded.add(path)

            def pre(mod, inputs, path=path):
                counter.stack.append(path)

            def post(mod, inputs, output, path=path):
                if counter.stack and counter.stack[-1] == path:
                    counter.stack.pop()
                elif path in counter.stack:
                    counter.stack.remove(path)

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post, always_call=True))
    try:
        with counter:
            result = fn(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return result, MeasuredFlops(counter.total, dict(counter.by_op), dict(counter.by_module))
