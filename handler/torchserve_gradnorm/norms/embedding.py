"""``F.embedding`` with per-sample ids: the weight gradient of one sample adds the output
gradients of the tokens that share an index into that index's row.

With M the (T, T) "same index" matrix of a sample, |grad|_2^2 = sum_ts M_ts <g_t, g_s>;
for L1, each token's row total is (M G)_t, and a row shared by c tokens appears c times.
Tokens at padding_idx get no gradient. Ids that are not per-sample (BERT's (1, T) position
ids) make a batch-free table lookup, whose gradient the backend pulls back from where the
result meets the batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .registry import OpCall, Want, register


def _embedding(
    input,
    weight,
    padding_idx=None,
    max_norm=None,
    norm_type=2.0,
    scale_grad_by_freq=False,
    sparse=False,
): ...


def _check(arguments: dict) -> str | None:
    if arguments["max_norm"] is not None:
        return "max_norm renormalizes the weight in place during forward"
    if arguments["scale_grad_by_freq"]:
        return "scale_grad_by_freq scales gradients by batch-wide counts"
    return None


@register(
    F.embedding,
    signature=_embedding,
    per_sample=("input",),
    params=("weight",),
    check=_check,
)
def embedding_norms(call: OpCall, want: Want, kind: str) -> dict[str, Tensor]:
    a = call.bound
    batch, weight = len(a["input"]), a["weight"]
    ids = a["input"].reshape(batch, -1)
    g = call.grad_outputs[0].reshape(batch, ids.shape[1], -1)
    padding_idx = a["padding_idx"]
    if padding_idx is not None:
        padding_idx = padding_idx % weight.shape[0]
        g = g * (ids != padding_idx).unsqueeze(-1).to(g.dtype)
    if want["weight"] == "grad":
        grad = g.new_zeros(batch, *weight.shape)
        return {"weight": grad.scatter_add_(1, ids.unsqueeze(-1).expand_as(g), g)}
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
    if kind == "sq_l2":
        return {"weight": (same * (g @ g.transpose(1, 2))).sum((1, 2))}
    rows = same @ g
    return {"weight": (rows.abs().sum(2) / same.sum(2)).sum(1)}
