"""Broadcast ``add`` and ``mul`` of a per-sample tensor and a parameter-side one (a bias,
ViT/BERT position embeddings, ConvNeXt/CaiT layer scale, Swin's relative position bias).

The parameter-side operand R is broadcast over the sample, so one sample's gradient of R is
the output gradient (times the other operand, for mul) summed over the dimensions R was
broadcast along. It has R's size, which is small, and is built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..losses import per_sample_norm
from .registry import OpCall, Want, register


def sum_to(g: Tensor, shape: torch.Size) -> Tensor:
    """(B, *out) per-sample gradients summed down to (B, *shape), as broadcasting sums them."""
    lead = g.dim() - 1 - len(shape)
    if lead:
        g = g.sum(tuple(range(1, 1 + lead)))
    dims = tuple(i + 1 for i, s in enumerate(shape) if s == 1 and g.shape[i + 1] != 1)
    return g.sum(dims, keepdim=True) if dims else g


def aligned(call: OpCall, value, out_dims: int):
    """The other operand, broadcastable against (B, *out)."""
    if not isinstance(value, Tensor):
        return value
    if call.is_per_sample(value):
        return value.reshape(len(value), *[1] * (out_dims - value.dim()), *value.shape[1:])
    return value


def _binary(input, other, *, alpha=1): ...


def _no_alpha(arguments: dict) -> str | None:
    return None if arguments["alpha"] == 1 else "add with alpha"


def _finish(grads: dict[str, Tensor], want: Want, kind: str) -> dict[str, Tensor]:
    return {n: g if want[n] == "grad" else per_sample_norm(g, kind) for n, g in grads.items()}


@register(
    torch.add,
    Tensor.add,
    Tensor.__add__,
    Tensor.__radd__,
    signature=_binary,
    per_sample=("input", "other"),
    params=("input", "other"),
    check=_no_alpha,
)
def add_norms(call: OpCall, want: Want, kind: str) -> dict[str, Tensor]:
    (g,) = call.grad_outputs
    return _finish({n: sum_to(g, call.bound[n].shape) for n in want}, want, kind)


def _mul(input, other): ...


@register(
    torch.mul,
    Tensor.mul,
    Tensor.__mul__,
    Tensor.__rmul__,
    signature=_mul,
    per_sample=("input", "other"),
    params=("input", "other"),
)
def mul_norms(call: OpCall, want: Want, kind: str) -> dict[str, Tensor]:
    (g,) = call.grad_outputs
    grads = {}
    for name in want:
        other = call.bound["other" if name == "input" else "input"]
        grads[name] = sum_to(g * aligned(call, other, g.dim()), call.bound[name].shape)
    return _finish(grads, want, kind)
