"""Linear maps: ``F.linear`` (nn.Linear and anything built on it) and ``torch.addmm`` with a
per-sample left factor (Hugging Face GPT-2's ``Conv1D``, whose weight is stored transposed).

For one sample the weight gradient is G^T A, with G (T, d_out) the output gradients and
A (T, d_in) the inputs over the T positions (T = 1 for a plain batch of vectors).
- T = 1: the gradient is an outer product g a^T, so |g a^T|_2^2 = |g|^2 |a|^2 and
  |g a^T|_1 = |g|_1 |a|_1 (Goodfellow 2015).
- T > 1, squared L2: |G^T A|^2 = <G G^T, A A^T> ("ghost norm", cost ~ T^2 (d_in + d_out)),
  used when 2 T^2 <= d_in d_out; otherwise G^T A is built per sample (Bu, Mao & Xu 2022).
- T > 1, L1: no shortcut; G^T A is built per sample.

What is built is built a block at a time (``built_product_norm``): one buffer of at most
``BLOCK`` elements, reused, never B x |W| at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..losses import per_sample_norm
from .registry import OpCall, Want, register


def outer_product_norm(g: Tensor, a: Tensor, kind: str) -> Tensor:
    if kind == "sq_l2":
        return g.square().sum(1) * a.square().sum(1)
    return g.abs().sum(1) * a.abs().sum(1)


BLOCK = 1 << 20
"""Elements of the buffer that per-sample weight gradients are built in (4 MiB in float32):
a few samples' products, or one sample's in equal row blocks (a ViT-B or BERT-base MLP
layer's in three). Measured on 2 cores: smaller, L2-sized blocks lose on the number of calls
(each one a synchronization of the threads, which a busy machine makes slow), bigger ones on
reading the block back from memory for its norm. One buffer, reused by every block of a
call, is far from the B x |W| that building the whole batch's products at once takes
(600 MB for one ViT-B MLP layer at batch 64, in float32)."""


def built_product_norm(g: Tensor, a: Tensor, kind: str, elements: int = BLOCK) -> Tensor:
    """Per-sample norm of G_b^T A_b for g (B, T, p) and a (B, T, d), built block by block:
    several samples' whole products when they fit in a block of ``elements``, else equal
    row blocks."""
    if a.shape[2] > g.shape[2]:  # the norm of (G^T A)^T: the longer side is cut into rows
        g, a = a, g
    batch, p, d = g.shape[0], g.shape[2], a.shape[2]
    if p * d == 0:
        return g.new_zeros(batch)
    samples = max(1, min(batch, elements // (p * d)))
    rows = -(-p // -(-p * d // elements)) if samples == 1 else p
    gt = g.transpose(1, 2)
    buffer = g.new_empty(samples * rows * d)
    sums = g.new_empty(-(-p // rows), batch)  # one row per row block
    for s0 in range(0, batch, samples):
        s1 = min(batch, s0 + samples)
        for k, r0 in enumerate(range(0, p, rows)):
            r1 = min(p, r0 + rows)
            block = buffer[: (s1 - s0) * (r1 - r0) * d].view(s1 - s0, r1 - r0, d)
            torch.bmm(gt[s0:s1, r0:r1], a[s0:s1], out=block)
            # in place: linalg.vector_norm's L1 kernel is several times slower than abs + sum
            block = block.square_() if kind == "sq_l2" else block.abs_()
            torch.sum(block, (1, 2), out=sums[k, s0:s1])
    return sums.sum(0)


def sequence_product_norm(g: Tensor, a: Tensor, kind: str) -> Tensor:
    """Per-sample norm of G_b^T A_b for g (B, T, p) and a (B, T, d)."""
    t, d, p = a.shape[1], a.shape[2], g.shape[2]
    if kind == "sq_l2" and 2 * t * t <= d * p:
        return (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
    return built_product_norm(g, a, kind)


def product_norms(a: Tensor, g: Tensor, want: Want, kind: str, weight: str, bias: str) -> dict:
    """Norms or gradients of y = a W^T + b per sample, a (B, T, d_in) and g (B, T, d_out)."""
    out: dict[str, Tensor] = {}
    if weight in want:
        if want[weight] == "grad":
            out[weight] = torch.bmm(g.transpose(1, 2), a)
        elif a.shape[1] == 1:
            out[weight] = outer_product_norm(g[:, 0], a[:, 0], kind)
        else:
            out[weight] = sequence_product_norm(g, a, kind)
    if bias in want:
        bias_grad = g.sum(1)
        out[bias] = bias_grad if want[bias] == "grad" else per_sample_norm(bias_grad, kind)
    return out


def _linear(input, weight, bias=None): ...


@register(
    torch.nn.functional.linear, signature=_linear, per_sample=("input",), params=("weight", "bias")
)
def linear_norms(call: OpCall, want: Want, kind: str) -> dict[str, Tensor]:
    x, (g,) = call.bound["input"], call.grad_outputs
    a = x.reshape(len(x), -1, x.shape[-1])
    return product_norms(a, g.reshape(len(g), -1, g.shape[-1]), want, kind, "weight", "bias")


def _addmm(input, mat1, mat2, *, beta=1, alpha=1): ...


def _addmm_check(arguments: dict) -> str | None:
    if arguments["beta"] != 1 or arguments["alpha"] != 1 or arguments["input"].dim() != 1:
        return "addmm with scaling factors or a matrix bias"
    return None


@register(
    torch.addmm,
    signature=_addmm,
    per_sample=("mat1",),
    params=("input", "mat2"),
    check=_addmm_check,
)
def addmm_norms(call: OpCall, want: Want, kind: str) -> dict[str, Tensor]:
    a, (g,) = call.bound["mat1"], call.grad_outputs
    out = product_norms(a, g, want, kind, "mat2", "input")
    if want.get("mat2") == "grad":
        out["mat2"] = out["mat2"].transpose(1, 2)  # the weight is held (d_in, d_out)
    return out
