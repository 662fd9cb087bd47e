"""nn.Conv1d / Conv2d / Conv3d (any stride, padding, dilation, groups, padding mode).

Per sample and per group, the weight gradient is G U^T, with G (p, T) the output gradient
over the T output positions and U (d, T) the unfolded input (d = C_in/groups x kernel).
Two ways to its norm, chosen per layer (Bu, Mao & Xu 2022, mixed ghost clipping):
- ghost (squared L2, 1-D and 2-D convs, when 2 T^2 <= d p): |G U^T|^2 = <G^T G, U^T U>,
  two (T, T) Gram matrices per sample; nothing of the weight's size is built.
- rank one (any norm, 1-D and 2-D convs with a single output position, T = 1, as in the
  last stage of a ResNet on small inputs): G U^T is an outer product g u^T, so the norms
  are |g|^2 |u|^2 and |g|_1 |u|_1, as for a Linear layer.
- build: G U^T per sample, in chunks of samples that bound its size, either as one
  batched matrix product of the unfolded input (1-D and 2-D convs with large weights), or
  as the weight gradient of a convolution, which is itself a convolution of the input with
  the output gradient: folding the batch into the channel axis and multiplying ``groups``
  by B gives all per-sample weight gradients in one grouped-convolution backward call.
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


def grouped_weight_grad(module: nn.Module, activation: Tensor, grad_output: Tensor) -> Tensor:
    """(B, C_out, C_in / groups, *kernel) per-sample weight gradients, for any conv, as one
    grouped-convolution backward call with the batch folded into the channels."""
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


def _unfold(module: nn.Module, x: Tensor, padding: list[int]) -> Tensor:
    """(B, C_in * prod(kernel), T) patches, for 1-D and 2-D convolutions."""
    if x.dim() == 3:  # a 1-D conv is a 2-D conv of height 1
        return F.unfold(
            x.unsqueeze(2),
            (1, module.kernel_size[0]),
            dilation=(1, module.dilation[0]),
            padding=(0, padding[0]),
            stride=(1, module.stride[0]),
        )
    return F.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
    )


def grouped_patches(
    module: nn.Module, activation: Tensor, grad_output: Tensor
) -> tuple[Tensor, Tensor]:
    """U (B, groups, d, T) and G (B, groups, p, T) of a 1-D or 2-D convolution."""
    batch, groups = activation.shape[0], module.groups
    u = _unfold(module, *_padded(module, activation))
    positions = u.shape[-1]
    u = u.reshape(batch, groups, -1, positions)
    return u, grad_output.reshape(batch, groups, -1, positions)


def unfolded_weight_grad(module: nn.Module, activation: Tensor, grad_output: Tensor) -> Tensor:
    u, g = grouped_patches(module, activation, grad_output)
    return torch.matmul(g, u.transpose(2, 3)).reshape(len(u), *module.weight.shape)


def ghost_sq_norm(module: nn.Module, activation: Tensor, grad_output: Tensor) -> Tensor:
    u, g = grouped_patches(module, activation, grad_output)
    gram_g = torch.matmul(g.transpose(2, 3), g)
    gram_u = torch.matmul(u.transpose(2, 3), u)
    return (gram_g * gram_u).sum((1, 2, 3))


def rank_one_norm(module: nn.Module, activation: Tensor, grad_output: Tensor, kind: str) -> Tensor:
    u, g = grouped_patches(module, activation, grad_output)  # T == 1
    if kind == "sq_l2":
        return (g.square().sum((2, 3)) * u.square().sum((2, 3))).sum(1)
    return (g.abs().sum((2, 3)) * u.abs().sum((2, 3))).sum(1)


UNFOLD_FROM = 1 << 16  # weight size from which building through unfold is faster


def built_norm(module: nn.Module, activation: Tensor, grad_output: Tensor, kind: str) -> Tensor:
    # measured on CPU (ResNet-18 layers): one grouped conv wins for small weights, the
    # batched product of unfolded patches for large ones (2-3x either way)
    large = module.weight.numel() >= UNFOLD_FROM
    build = unfolded_weight_grad if large and activation.dim() <= 4 else grouped_weight_grad
    # B x |W| numbers per chunk; keep each chunk near 2^26 of them
    chunk = max(1, (1 << 26) // module.weight.numel())
    return torch.cat(
        [
            per_sample_norm(build(module, a, g), kind)
            for a, g in zip(activation.split(chunk), grad_output.split(chunk))
        ]
    )


def prefers_ghost(module: nn.Module, grad_output: Tensor, kind: str) -> bool:
    if kind != "sq_l2" or grad_output.dim() > 4:
        return False
    positions = grad_output[0, 0].numel()
    d = module.weight[0].numel()  # C_in / groups x kernel
    p = module.weight.shape[0] // module.groups
    return 2 * positions * positions <= d * p


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, params=("weight", "bias"), check=_check)
def conv_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor, kind: str, wanted: frozenset
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    if "weight" in wanted:
        if grad_output.dim() <= 4 and grad_output[0, 0].numel() == 1:
            out["weight"] = rank_one_norm(module, activation, grad_output, kind)
        elif prefers_ghost(module, grad_output, kind):
            out["weight"] = ghost_sq_norm(module, activation, grad_output)
        else:
            out["weight"] = built_norm(module, activation, grad_output, kind)
    if "bias" in wanted:
        out["bias"] = per_sample_norm(grad_output.flatten(2).sum(2), kind)
    return out
