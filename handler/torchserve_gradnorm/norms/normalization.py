"""BatchNorm (eval mode), LayerNorm, GroupNorm: affine weight w and bias b.

All three compute y = xhat * w + b with xhat the normalized input, so per sample
dL/dw = sum over the positions that share a weight of g * xhat and dL/db = sum of g.
BatchNorm is per-sample only with running statistics (eval mode): batch statistics in
training mode couple the samples of a batch, and there is no per-sample gradient to take.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..losses import per_sample_norm
from .registry import register


def _affine_norms(
    xhat: Tensor, grad_output: Tensor, reduce_dims: tuple[int, ...], kind: str, wanted
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    if "weight" in wanted:
        gw = (grad_output * xhat).sum(reduce_dims) if reduce_dims else grad_output * xhat
        out["weight"] = per_sample_norm(gw, kind)
    if "bias" in wanted:
        gb = grad_output.sum(reduce_dims) if reduce_dims else grad_output
        out["bias"] = per_sample_norm(gb, kind)
    return out


def _batchnorm_check(module: nn.Module) -> str | None:
    if not module.track_running_stats or module.running_mean is None:
        return "BatchNorm without running statistics uses batch statistics (couples samples)"
    return None


@register(
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    params=("weight", "bias"),
    check=_batchnorm_check,
)
def batchnorm_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor, kind: str, wanted: frozenset
) -> dict[str, Tensor]:
    if module.training:
        raise RuntimeError("BatchNorm in training mode has no per-sample gradient")
    shape = [1, -1] + [1] * (activation.dim() - 2)
    xhat = (activation - module.running_mean.view(shape)) * torch.rsqrt(
        module.running_var.view(shape) + module.eps
    )
    return _affine_norms(xhat, grad_output, tuple(range(2, activation.dim())), kind, wanted)


@register(nn.LayerNorm, params=("weight", "bias"))
def layernorm_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor, kind: str, wanted: frozenset
) -> dict[str, Tensor]:
    dims = tuple(range(activation.dim() - len(module.normalized_shape), activation.dim()))
    var, mean = torch.var_mean(activation, dim=dims, unbiased=False, keepdim=True)
    xhat = (activation - mean) * torch.rsqrt(var + module.eps)
    shared = tuple(range(1, dims[0]))  # positions (sequence etc.) that share the weight
    return _affine_norms(xhat, grad_output, shared, kind, wanted)


@register(nn.GroupNorm, params=("weight", "bias"))
def groupnorm_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor, kind: str, wanted: frozenset
) -> dict[str, Tensor]:
    batch = activation.shape[0]
    grouped = activation.reshape(batch, module.num_groups, -1)
    var, mean = torch.var_mean(grouped, dim=2, unbiased=False, keepdim=True)
    xhat = ((grouped - mean) * torch.rsqrt(var + module.eps)).reshape(activation.shape)
    return _affine_norms(xhat, grad_output, tuple(range(2, activation.dim())), kind, wanted)
