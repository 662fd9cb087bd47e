"""Convolutions: ``F.conv1d`` / ``conv2d`` / ``conv3d`` (any stride, padding, dilation,
groups; nn.Conv*d pads separately for non-zero padding modes, so the call sees the padded
input).

Per sample and per group, the weight gradient is G U^T, with G (p, T) the output gradient
over the T output positions and U (d, T) the unfolded input (d = C_in/groups x kernel).
Three ways to its norm, chosen per call (Bu, Mao & Xu 2022, mixed ghost clipping):
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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import per_sample_norm
from .registry import OpCall, Want, register


@dataclass(frozen=True)
class ConvSpec:
    weight: Tensor
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def conv_spec(arguments: dict) -> ConvSpec:
    weight = arguments["weight"]
    dims = weight.dim() - 2
    dilation = _tuple(arguments["dilation"], dims)
    padding = arguments["padding"]
    if padding == "valid":
        padding = (0,) * dims
    elif padding == "same":
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, weight.shape[2:]))
    return ConvSpec(
        weight,
        _tuple(arguments["stride"], dims),
        _tuple(padding, dims),
        dilation,
        arguments["groups"],
    )


def _check(arguments: dict) -> str | None:
    weight = arguments["weight"]
    if arguments["padding"] == "same":
        dilation = _tuple(arguments["dilation"], weight.dim() - 2)
        if any(d * (k - 1) % 2 for d, k in zip(dilation, weight.shape[2:])):
            return "padding='same' with an even effective kernel (asymmetric padding)"
    return None


def grouped_weight_grad(spec: ConvSpec, activation: Tensor, grad_output: Tensor) -> Tensor:
    """(N, C_out, C_in / groups, *kernel) weight gradients of N input rows, for any conv, as
    one grouped-convolution backward call with the rows folded into the channels."""
    rows, w = activation.shape[0], spec.weight
    x = activation.reshape(1, rows * activation.shape[1], *activation.shape[2:])
    g = grad_output.reshape(1, rows * grad_output.shape[1], *grad_output.shape[2:])
    weight_shape = (rows * w.shape[0], *w.shape[1:])
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        g.contiguous(),
        x.contiguous(),
        w.detach().new_empty(weight_shape),
        None,
        list(spec.stride),
        list(spec.padding),
        list(spec.dilation),
        False,
        [0] * (activation.dim() - 2),
        spec.groups * rows,
        [False, True, False],
    )
    return grad_w.reshape(rows, *w.shape)


def _unfold(spec: ConvSpec, x: Tensor) -> Tensor:
    """(N, C_in * prod(kernel), T) patches, for 1-D and 2-D convolutions."""
    if x.dim() == 3:  # a 1-D conv is a 2-D conv of height 1
        return F.unfold(
            x.unsqueeze(2),
            (1, spec.kernel_size[0]),
            dilation=(1, spec.dilation[0]),
            padding=(0, spec.padding[0]),
            stride=(1, spec.stride[0]),
        )
    return F.unfold(
        x, spec.kernel_size, dilation=spec.dilation, padding=spec.padding, stride=spec.stride
    )


def grouped_patches(
    spec: ConvSpec, activation: Tensor, grad_output: Tensor, batch: int
) -> tuple[Tensor, Tensor]:
    """U (B, groups, d, T) and G (B, groups, p, T) of a 1-D or 2-D convolution, with the
    positions of a sample's rows (when one sample holds several) side by side in T."""
    groups = spec.groups
    u = _unfold(spec, activation)
    positions = u.shape[-1]
    u = u.reshape(batch, -1, groups, u.shape[1] // groups, positions)
    g = grad_output.reshape(batch, -1, groups, grad_output.shape[1] // groups, positions)

    def side_by_side(t: Tensor) -> Tensor:
        return t.permute(0, 2, 3, 1, 4).reshape(batch, groups, t.shape[3], -1)

    return side_by_side(u), side_by_side(g)


def unfolded_weight_grad(spec: ConvSpec, activation: Tensor, grad_output: Tensor) -> Tensor:
    u, g = grouped_patches(spec, activation, grad_output, len(activation))
    return torch.matmul(g, u.transpose(2, 3)).reshape(len(u), *spec.weight.shape)


def ghost_sq_norm(spec: ConvSpec, activation: Tensor, grad_output: Tensor, batch: int) -> Tensor:
    u, g = grouped_patches(spec, activation, grad_output, batch)
    gram_g = torch.matmul(g.transpose(2, 3), g)
    gram_u = torch.matmul(u.transpose(2, 3), u)
    return (gram_g * gram_u).sum((1, 2, 3))


def rank_one_norm(
    spec: ConvSpec, activation: Tensor, grad_output: Tensor, kind: str, batch: int
) -> Tensor:
    u, g = grouped_patches(spec, activation, grad_output, batch)  # T == 1
    if kind == "sq_l2":
        return (g.square().sum((2, 3)) * u.square().sum((2, 3))).sum(1)
    return (g.abs().sum((2, 3)) * u.abs().sum((2, 3))).sum(1)


UNFOLD_FROM = 1 << 16  # weight size from which building through unfold is faster


def weight_grads(spec: ConvSpec, activation: Tensor, grad_output: Tensor) -> Tensor:
    """(N, *weight.shape) per-row weight gradients."""
    # measured on CPU (ResNet-18 layers): one grouped conv wins for small weights, the
    # batched product of unfolded patches for large ones (2-3x either way)
    large = spec.weight.numel() >= UNFOLD_FROM
    build = unfolded_weight_grad if large and activation.dim() <= 4 else grouped_weight_grad
    return build(spec, activation, grad_output)


def built_norm(
    spec: ConvSpec, activation: Tensor, grad_output: Tensor, kind: str, batch: int
) -> Tensor:
    rows = len(activation) // batch
    # B x |W| numbers per chunk; keep each chunk near 2^26 of them
    chunk = rows * max(1, (1 << 26) // (spec.weight.numel() * rows))
    norms = []
    for a, g in zip(activation.split(chunk), grad_output.split(chunk)):
        grads = weight_grads(spec, a, g)
        norms.append(per_sample_norm(grads.reshape(-1, rows, *grads.shape[1:]).sum(1), kind))
    return torch.cat(norms)


def prefers_ghost(spec: ConvSpec, grad_output: Tensor, kind: str, rows: int) -> bool:
    if kind != "sq_l2" or grad_output.dim() > 4:
        return False
    positions = rows * grad_output[0, 0].numel()
    d = spec.weight[0].numel()  # C_in / groups x kernel
    p = spec.weight.shape[0] // spec.groups
    return 2 * positions * positions <= d * p


def _conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...


@register(
    F.conv1d,
    F.conv2d,
    F.conv3d,
    signature=_conv,
    per_sample=("input",),
    params=("weight", "bias"),
    check=_check,
)
def conv_norms(call: OpCall, want: Want, kind: str) -> dict[str, Tensor]:
    spec = conv_spec(call.bound)
    x, (g,) = call.bound["input"], call.grad_outputs
    batch, dims = len(x), spec.weight.dim() - 1
    # one sample's value is (rows, C, *spatial), usually one row; the rule works on rows
    activation = x.reshape(-1, *x.shape[-dims:])
    grad_output = g.reshape(-1, *g.shape[-dims:])
    rows = len(activation) // batch
    out: dict[str, Tensor] = {}
    if "weight" in want:
        if want["weight"] == "grad":
            grads = weight_grads(spec, activation, grad_output)
            out["weight"] = grads.reshape(batch, rows, *grads.shape[1:]).sum(1)
        elif grad_output.dim() <= 4 and rows * grad_output[0, 0].numel() == 1:
            out["weight"] = rank_one_norm(spec, activation, grad_output, kind, batch)
        elif prefers_ghost(spec, grad_output, kind, rows):
            out["weight"] = ghost_sq_norm(spec, activation, grad_output, batch)
        else:
            out["weight"] = built_norm(spec, activation, grad_output, kind, batch)
    if "bias" in want:
        bias_grad = grad_output.reshape(batch, -1, grad_output.shape[1], *grad_output.shape[2:])
        bias_grad = bias_grad.transpose(1, 2).flatten(2).sum(2)
        out["bias"] = bias_grad if want["bias"] == "grad" else per_sample_norm(bias_grad, kind)
    return out
