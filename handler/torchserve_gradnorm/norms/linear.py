"""nn.Linear on (B, d) or (B, ..., d) inputs.

For one sample the weight gradient is G^T A, with G (T, d_out) the output gradients and
A (T, d_in) the inputs over the T positions (T = 1 for a plain batch of vectors).
- T = 1: the gradient is an outer product g a^T, so |g a^T|_2^2 = |g|^2 |a|^2 and
  |g a^T|_1 = |g|_1 |a|_1 (Goodfellow 2015).
- T > 1, squared L2: |G^T A|^2 = <G G^T, A A^T> ("ghost norm", cost ~ T^2 (d_in + d_out)),
  used when 2 T^2 <= d_in d_out; otherwise G^T A is built per sample (Bu, Mao & Xu 2022).
- T > 1, L1: no shortcut; G^T A is built per sample.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..losses import per_sample_norm
from .registry import register


def outer_product_norm(g: Tensor, a: Tensor, kind: str) -> Tensor:
    if kind == "sq_l2":
        return g.square().sum(1) * a.square().sum(1)
    return g.abs().sum(1) * a.abs().sum(1)


def sequence_product_norm(g: Tensor, a: Tensor, kind: str) -> Tensor:
    """Per-sample norm of G_b^T A_b for g (B, T, p) and a (B, T, d)."""
    t, d, p = a.shape[1], a.shape[2], g.shape[2]
    if kind == "sq_l2" and 2 * t * t <= d * p:
        return (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
    return per_sample_norm(torch.bmm(g.transpose(1, 2), a), kind)


@register(nn.Linear, params=("weight", "bias"))
def linear_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor, kind: str, wanted: frozenset
) -> dict[str, Tensor]:
    batch = activation.shape[0]
    out: dict[str, Tensor] = {}
    if activation.dim() == 2:
        if "weight" in wanted:
            out["weight"] = outer_product_norm(grad_output, activation, kind)
        bias_grad = grad_output
    else:
        a = activation.reshape(batch, -1, activation.shape[-1])
        g = grad_output.reshape(batch, -1, grad_output.shape[-1])
        if "weight" in wanted:
            out["weight"] = sequence_product_norm(g, a, kind)
        bias_grad = g.sum(1)
    if "bias" in wanted:
        out["bias"] = per_sample_norm(bias_grad, kind)
    return out
