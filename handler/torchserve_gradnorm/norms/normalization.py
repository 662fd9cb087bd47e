"""``F.batch_norm`` (running statistics), ``F.layer_norm``, ``F.group_norm``: affine weight w
and bias b, whichever module or subclass calls them (torchvision/timm LayerNorm2d, timm
BatchNormAct2d and GroupNorm1 all do).

All three compute y = xhat * w + b with xhat the normalized input, so per sample
dL/dw = sum over the positions that share a weight of g * xhat and dL/db = sum of g.
BatchNorm with batch statistics (``training=True``, or no running statistics) normalizes
each sample by its own statistics under the per-sample recording, as scoring it alone
would; that case goes to the functional rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import per_sample_norm
from .registry import OpCall, Want, register


def affine_norms(xhat: Tensor, grad_output: Tensor, want: Want, kind: str) -> dict[str, Tensor]:
    """Per-sample gradients of y = xhat * w + b, both laid out (B, positions, *w.shape)."""
    out: dict[str, Tensor] = {}
    for name, grad in (("weight", lambda: grad_output * xhat), ("bias", lambda: grad_output)):
        if name in want:
            g = grad().sum(1)
            out[name] = g if want[name] == "grad" else per_sample_norm(g, kind)
    return out


def channels_last(t: Tensor, batch: int) -> Tensor:
    """(B * N, C, *spatial) rows -> (B, N * spatial, C)."""
    return t.reshape(batch, -1, t.shape[1], t[0, 0].numel()).transpose(2, 3).flatten(1, 2)


def _batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
): ...


def _batchnorm_check(arguments: dict) -> str | None:
    if arguments["training"] or arguments["running_mean"] is None:
        return "batch statistics"
    return None


@register(
    F.batch_norm,
    signature=_batch_norm,
    per_sample=("input",),
    params=("weight", "bias"),
    check=_batchnorm_check,
)
def batchnorm_norms(call: OpCall, want: Want, kind: str) -> dict[str, Tensor]:
    a = call.bound
    x, (g,) = a["input"], call.grad_outputs
    batch, channels = len(x), x.shape[2]
    # one sample's value is (N, C, *spatial), N usually 1; kept in that (contiguous) layout,
    # (B, N, C, positions), so that every reduction runs over the innermost axis
    x = x.reshape(batch, -1, channels, x[0, 0, 0].numel())
    g = g.reshape(x.shape)
    out: dict[str, Tensor] = {}
    if "weight" in want:
        # sum over positions of g * (x - mean) / std, the 1 / std taken out of the sum
        centered = x - a["running_mean"].view(-1, 1)
        weight = centered.mul_(g).sum((1, 3)) * torch.rsqrt(a["running_var"] + a["eps"])
        del centered
        out["weight"] = weight if want["weight"] == "grad" else per_sample_norm(weight, kind)
    if "bias" in want:
        bias = g.sum((1, 3))
        out["bias"] = bias if want["bias"] == "grad" else per_sample_norm(bias, kind)
    return out


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5): ...


@register(
    F.layer_norm,
    signature=_layer_norm,
    per_sample=("input",),
    params=("weight", "bias"),
)
def layernorm_norms(call: OpCall, want: Want, kind: str) -> dict[str, Tensor]:
    a = call.bound
    x, (g,) = a["input"], call.grad_outputs
    shape = a["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    positions = tuple(range(1, x.dim() - len(shape)))
    # summed over the positions in place: a channels-last view (torchvision's and timm's
    # LayerNorm2d permute NCHW) would be copied by a reshape to (B, positions, C)

    def over_positions(t: Tensor) -> Tensor:
        return t.sum(positions) if positions else t

    out: dict[str, Tensor] = {}
    if "weight" in want:
        # layer norm's own kernel: one pass, where var_mean over a short last axis (ConvNeXt's
        # 96 channels) and (x - mean) * rstd took 4-5x longer
        xhat, _, _ = torch.native_layer_norm(x, shape, None, None, a["eps"])
        weight = over_positions(xhat.mul_(g))
        del xhat
        out["weight"] = weight if want["weight"] == "grad" else per_sample_norm(weight, kind)
    if "bias" in want:
        bias = over_positions(g)
        out["bias"] = bias if want["bias"] == "grad" else per_sample_norm(bias, kind)
    return out


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5): ...


@register(
    F.group_norm,
    signature=_group_norm,
    per_sample=("input",),
    params=("weight", "bias"),
)
def groupnorm_norms(call: OpCall, want: Want, kind: str) -> dict[str, Tensor]:
    a = call.bound
    x, (g,) = a["input"], call.grad_outputs
    xr = x.reshape(-1, *x.shape[2:])  # one sample's value is (N, C, *spatial)
    grouped = xr.reshape(len(xr), a["num_groups"], -1)
    var, mean = torch.var_mean(grouped, dim=2, unbiased=False, keepdim=True)
    xhat = ((grouped - mean) * torch.rsqrt(var + a["eps"])).reshape(xr.shape)
    batch = len(x)
    return affine_norms(
        channels_last(xhat, batch), channels_last(g.reshape(xr.shape), batch), want, kind
    )
