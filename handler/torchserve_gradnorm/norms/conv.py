"""Convolutions: ``F.conv1d`` / ``conv2d`` / ``conv3d`` (any stride, padding, dilation,
groups; nn.Conv*d pads separately for non-zero padding modes, so the call sees the padded
input).

Per sample and per group, the weight gradient is G U^T, with G (p, T) the output gradient
over the T output positions and U (d, T) the unfolded input (d = C_in/groups x kernel).
Three ways to its norm, chosen per call (Bu, Mao & Xu 2022, mixed ghost clipping):
- ghost (squared L2, 1-D and 2-D convs, when T^2 (d + p) < T d p multiply-adds): |G U^T|^2 =
  <G^T G, U^T U>, two (T, T) Gram matrices per sample; nothing of the weight's size is built.
- rank one (any norm, 1-D and 2-D convs with a single output position, T = 1, as in the
  last stage of a ResNet on small inputs): G U^T is an outer product g u^T, so the norms
  are |g|^2 |u|^2 and |g|_1 |u|_1, as for a Linear layer.
- build: G U^T per sample, a few samples at a time (a large layer's B x |W| is never held
  whole) and, where a number built costs few multiply-adds, an L2-sized block at a time
  into one reused buffer, its norm taken while the block is still in L2: for stride-1 2-D
  kernels with few output positions, one kernel offset at a time as G times a strided
  window of the zero-padded input (no im2col copy); as batched matrix products of the
  unfolded input (1x1 kernels, whose patches are the input itself, and other layers with
  few output positions); or as the weight gradient of a convolution, which is itself a
  convolution of the input with the output gradient: folding the batch into the channel
  axis and multiplying ``groups`` by B gives all per-sample weight gradients in one
  grouped-convolution backward call (many output positions, 3-D); a depthwise kernel's
  (one input channel a group: ConvNeXt's 7x7, EfficientNet's 3x3 and 5x5) as one forward
  depthwise convolution of each row's input with its own output gradient as the kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import per_sample_norm, scratch_norm
from .linear import built_product_norm
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
    if all(k == 1 for k in spec.kernel_size) and not any(spec.padding):
        # a 1x1 convolution's patches are the input itself (strided): no im2col copy
        strided = x[(..., *(slice(None, None, s) for s in spec.stride))]
        return strided.flatten(2)
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


def unfolded_weight_grad(
    spec: ConvSpec, activation: Tensor, grad_output: Tensor, samples: int
) -> Tensor:
    """(samples, *weight.shape) per-sample weight gradients as one batched product of the
    unfolded input."""
    u, g = grouped_patches(spec, activation, grad_output, samples)
    u, g = u.flatten(0, 1), g.flatten(0, 1)
    return torch.bmm(g, u.transpose(1, 2)).reshape(samples, *spec.weight.shape)


def unfolded_norm(
    spec: ConvSpec, activation: Tensor, grad_output: Tensor, kind: str, batch: int
) -> Tensor:
    """Per-sample norms of G U^T from the unfolded patches, a few samples' patches at a time,
    each product built a ``TILE_NUMBERS`` block at a time."""
    positions = len(activation) // batch * grad_output[0, 0].numel()
    patches = positions * (spec.weight[0].numel() * spec.groups + grad_output.shape[1])
    norms = []
    for samples, a, g in sample_chunks(activation, grad_output, batch, patches):
        u, g = grouped_patches(spec, a, g, samples)
        u, g = u.flatten(0, 1).transpose(1, 2), g.flatten(0, 1).transpose(1, 2)
        per_group = built_product_norm(g, u, kind, TILE_NUMBERS)
        norms.append(per_group.view(samples, spec.groups).sum(1))
    return torch.cat(norms)


def sample_chunks(
    activation: Tensor, grad_output: Tensor, batch: int, numbers: int
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(samples, activation rows, output-gradient rows) of consecutive chunks of whole
    samples, as many a chunk as keep ``numbers`` built per sample within ``BUILD_NUMBERS``."""
    rows = len(activation) // batch
    chunk = min(batch, max(1, BUILD_NUMBERS // numbers))
    for start in range(0, batch, chunk):
        samples = min(chunk, batch - start)
        rows_of = slice(start * rows, (start + samples) * rows)
        yield samples, activation[rows_of], grad_output[rows_of]


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


BUILD_NUMBERS = 1 << 22
"""Numbers of per-sample gradient (or unfolded patches) built at once: small enough that a
chunk is written and reduced while still in cache, and that a large layer's B x |W| is never
held whole."""

TILE_NUMBERS = 1 << 18
"""Numbers of a block of the offset-by-offset and unfolded builds (1 MiB in float32, half a
core's L2): a layer with few positions has few multiply-adds per number built (16 for a
CIFAR ResNet's last stage), so writing the product and reading it back for its norm is
most of its cost, and a block this size is still in L2 when its norm is taken. Measured
against whole samples in chunks of ``BUILD_NUMBERS`` (same process, L1 norm, 1 / 2
threads): CIFAR ResNet-18's unfolded 3x3 layers on 4x4 maps 0.6-0.8x / 0.87x the time,
its 1x1 ones 0.35x; ResNet-50's, ConvNeXt-T's and EfficientNet-B0's unfolded layers
0.33-0.92x, but for one (16 -> 96 channels at 112x112, a small product of long sums)
1.02-1.10x. Quarter- and half-sized blocks lose on the number of calls, 4 MiB ones on L2
misses."""


def _unfolds(spec: ConvSpec, activation: Tensor, grad_output: Tensor) -> bool:
    """Whether the batched product of unfolded patches builds this layer's per-sample
    gradients faster than the grouped convolution (measured on CPU, ResNet-18/50 and
    depthwise layers: 1.5-4x either way)."""
    if activation.dim() > 4 or _depthwise(spec):
        return False
    if all(k == 1 for k in spec.kernel_size) and not any(spec.padding):
        return True  # the patches are the input itself
    # few output positions: the grouped convolution's per-group overhead dominates; many:
    # im2col's copy and thin products lose
    return grad_output[0, 0].numel() < 256 and spec.weight[0].numel() >= 64


def _depthwise(spec: ConvSpec) -> bool:
    return spec.weight.shape[1] == 1  # one input channel a group


def depthwise_weight_grad(spec: ConvSpec, activation: Tensor, grad_output: Tensor) -> Tensor:
    """(N, C_out, 1, *kernel) per-row weight gradients of a depthwise convolution (one input
    channel a group, any channel multiplier), as one forward convolution: every row's channel
    convolved with its own output gradient as the kernel, stride and dilation swapped, the
    result cropped to the kernel. oneDNN runs that depthwise convolution 3-20x faster than the
    grouped backward or offset-by-offset sums (measured on CPU: ConvNeXt-T's 7x7 layers,
    EfficientNet-B0's 5x5 ones), and as fast on 3x3 kernels."""
    rows, spatial = len(activation), activation.shape[2:]
    x = activation.contiguous().view(1, -1, *spatial)
    g = grad_output.contiguous().view(-1, 1, *grad_output.shape[2:])
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(spatial) - 1]
    grads = conv(
        x, g, stride=spec.dilation, padding=spec.padding, dilation=spec.stride, groups=x.shape[1]
    )
    crop = tuple(slice(0, k) for k in spec.kernel_size)
    return grads[(0, slice(None), *crop)].reshape(rows, -1, 1, *spec.kernel_size)


def weight_grads(spec: ConvSpec, activation: Tensor, grad_output: Tensor, samples: int) -> Tensor:
    """(samples, *weight.shape) per-sample weight gradients, summed over each sample's rows."""
    if _depthwise(spec):
        grads = depthwise_weight_grad(spec, activation, grad_output)
    elif _unfolds(spec, activation, grad_output):
        return unfolded_weight_grad(spec, activation, grad_output, samples)
    else:
        grads = grouped_weight_grad(spec, activation, grad_output)
    if len(grads) != samples:
        grads = grads.reshape(samples, -1, *grads.shape[1:]).sum(1)
    return grads


def _shifts(spec: ConvSpec, grad_output: Tensor, rows: int) -> bool:
    """Whether ``shifted_norm`` builds this layer's products faster than the unfolded patches
    or the grouped convolution: a stride-1 2-D kernel, one group, one row a sample, 256
    positions or fewer and an output row at least 4 times the kernel's overhang. Measured on
    CIFAR ResNet-18's and ResNet-50's 3x3 layers (same process, L1 norm): on 8x8 to 16x16
    maps 0.46-0.79x the time of the grouped convolution or of unfolded patches in whole
    samples at 1 thread, 0.58-0.64x at 2, and 0.62-0.64x that of unfolded patches in
    ``TILE_NUMBERS`` blocks; on 28x28 maps 0.92-0.97x, on 32x32 and larger 1.2-1.8x (the
    grouped convolution wins); on 4x4 maps, whose padded columns are a third of the
    products' length, 1.0-1.5x the blocked unfolded patches."""
    if grad_output.dim() != 4 or rows != 1 or spec.groups != 1:
        return False
    if _depthwise(spec) or any(s != 1 for s in spec.stride) or spec.weight[0, 0].numel() == 1:
        return False
    overhang = spec.dilation[1] * (spec.kernel_size[1] - 1)
    return grad_output[0, 0].numel() <= 256 and grad_output.shape[3] >= 4 * overhang


def shifted_norm(spec: ConvSpec, activation: Tensor, grad_output: Tensor, kind: str) -> Tensor:
    """Per-sample norms of a stride-1 2-D convolution's weight gradient, built one kernel
    offset at a time with no im2col copy: the offset's (C_out, C_in) slice is G times the
    input shifted by the offset, and with G padded by zero columns to the padded input's
    width, that shifted input is a plain strided matrix of the padded input (each window
    runs on past its rows' ends into the next row, where G's zeros meet it)."""
    (kh, kw), (dh, dw), (ph, pw) = spec.kernel_size, spec.dilation, spec.padding
    x = F.pad(activation, (pw, pw, ph, ph + 1)).contiguous()  # a row more: the last overhang
    width, length = x.shape[3], x.shape[2] * x.shape[3]
    g = F.pad(grad_output, (0, width - grad_output.shape[3])).flatten(2)  # (B, C_out, T')
    batch, c, (p, t) = len(x), x.shape[1], g.shape[1:]
    windows = [
        x.as_strided((batch, t, c), (c * length, 1, length), x.storage_offset() + start)
        for start in (i * dh * width + j * dw for i in range(kh) for j in range(kw))
    ]
    samples = max(1, min(batch, TILE_NUMBERS // (p * c)))
    buffer = x.new_empty(samples * p * c)
    sums = x.new_empty(len(windows), batch)
    for s0 in range(0, batch, samples):
        s1 = min(batch, s0 + samples)
        for k, u in enumerate(windows):
            block = buffer[: (s1 - s0) * p * c].view(s1 - s0, p, c)
            torch.bmm(g[s0:s1], u[s0:s1], out=block)
            block = block.square_() if kind == "sq_l2" else block.abs_()
            torch.sum(block, (1, 2), out=sums[k, s0:s1])
    return sums.sum(0)


def built_norm(
    spec: ConvSpec, activation: Tensor, grad_output: Tensor, kind: str, batch: int
) -> Tensor:
    if _shifts(spec, grad_output, len(activation) // batch):
        return shifted_norm(spec, activation, grad_output, kind)
    if _unfolds(spec, activation, grad_output):
        return unfolded_norm(spec, activation, grad_output, kind, batch)
    norms = []
    for samples, a, g in sample_chunks(activation, grad_output, batch, spec.weight.numel()):
        grads = weight_grads(spec, a, g, samples)
        norms.append(scratch_norm(grads, kind))  # grads: this chunk's own
    return torch.cat(norms)


def prefers_ghost(spec: ConvSpec, grad_output: Tensor, kind: str, rows: int) -> bool:
    """Ghost norms cost T^2 (d + p) multiply-adds a sample and group, building G U^T costs
    T d p: the cheaper one wins (the ghost's Gram matrices are then smaller than a gradient)."""
    if kind != "sq_l2" or grad_output.dim() > 4:
        return False
    positions = rows * grad_output[0, 0].numel()
    d = spec.weight[0].numel()  # C_in / groups x kernel
    p = spec.weight.shape[0] // spec.groups
    return positions * (d + p) < d * p


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
            out["weight"] = weight_grads(spec, activation, grad_output, batch)
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
