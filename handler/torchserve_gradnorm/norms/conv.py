"""nn.Conv1d / Conv2d / Conv3d (any stride, padding, dilation, groups, padding mode).

The weight gradient of a convolution is itself a convolution of the input with the output
gradient. Folding the batch into the channel axis and multiplying ``groups`` by B turns
the batch-summed weight gradient into B separate ones in a single grouped-convolution
backward call, with no unfold of the input (whose size is k^d times the activation's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import per_sample_norm
from .registry import register


def _check(module: nn.Module) -> str | None:
    if isinstance(module.padding, str) and module.padding == "same":
        if any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
            return "padding='same' with an even effective kernel (asymmetric padding)"
    return None


def _padded(module: nn.Module, activation: Tensor) -> tuple[Tensor, list[int]]:
    dims = activation.dim() - 2
    if module.padding_mode != "zeros":
        pad = F.pad(activation, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return pad, [0] * dims
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return activation, [0] * dims
        return activation, [d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size)]
    return activation, list(module.padding)


def per_sample_conv_weight_grad(module: nn.Module, activation: Tensor, grad_output: Tensor):
    """(B, C_out, C_in / groups, *kernel): each sample's own weight gradient."""
    batch = activation.shape[0]
    x, padding = _padded(module, activation)
    w = module.weight
    x = x.reshape(1, batch * x.shape[1], *x.shape[2:])
    g = grad_output.reshape(1, batch * grad_output.shape[1], *grad_output.shape[2:])
    weight_shape = (batch * w.shape[0], *w.shape[1:])
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        g.contiguous(),
        x.contiguous(),
        w.detach().new_empty(weight_shape),
        None,
        list(module.stride),
        padding,
        list(module.dilation),
        False,
        [0] * (activation.dim() - 2),
        module.groups * batch,
        [False, True, False],
    )
    return grad_w.reshape(batch, *w.shape)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, params=("weight", "bias"), check=_check)
def conv_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor, kind: str, wanted: frozenset
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    if "weight" in wanted:
        out["weight"] = per_sample_norm(
            per_sample_conv_weight_grad(module, activation, grad_output), kind
        )
    if "bias" in wanted:
        out["bias"] = per_sample_norm(grad_output.flatten(2).sum(2), kind)
    return out
