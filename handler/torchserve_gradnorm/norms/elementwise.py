"""Broadcast ``add`` and ``mul`` of a per-sample tensor and a parameter-side one (a bias,
ViT/BERT position embeddings, ConvNeXt/CaiT layer scale, Swin's relative position bias).

The parameter-side operand R is broadcast over the sample, so one sample's gradient of R is
the output gradient (times the other operand, for mul) summed over the dimensions R was
broadcast along. It has R's size, which is small, and is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..losses import per_sample_norm
from .registry import RULES, CheckFn, OpCall, OpRule, RuleFn, Want


@dataclass(frozen=True)
class EitherOperandRule(OpRule):
    """A binary call whose per-sample operand may be either one (``h + pos``, ``pos + h``);
    the other is the parameter side."""

    def bind(self, call: OpCall, tracked: set[int]) -> dict[str, Any] | None:
        for side in ("input", "other"):
            arguments = OpRule.bind(replace(self, per_sample=frozenset({side})), call, tracked)
            if arguments is not None:
                return arguments
        return None


def register_binary(
    *funcs: Callable, signature: Callable, check: CheckFn | None = None
) -> Callable[[RuleFn], RuleFn]:
    def decorate(fn: RuleFn) -> RuleFn:
        rule = EitherOperandRule(
            inspect.signature(signature), frozenset(), frozenset(("input", "other")), fn, check
        )
        for func in funcs:
            RULES[func] = rule
        return fn

    return decorate


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


@register_binary(
    torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, signature=_binary, check=_no_alpha
)
def add_norms(call: OpCall, want: Want, kind: str) -> dict[str, Tensor]:
    (g,) = call.grad_outputs
    return _finish({n: sum_to(g, call.bound[n].shape) for n in want}, want, kind)


def _mul(input, other): ...


@register_binary(torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, signature=_mul)
def mul_norms(call: OpCall, want: Want, kind: str) -> dict[str, Tensor]:
    (g,) = call.grad_outputs
    grads = {}
    for name in want:
        other = call.bound["other" if name == "input" else "input"]
        grads[name] = sum_to(g * aligned(call, other, g.dim()), call.bound[name].shape)
    return _finish(grads, want, kind)
