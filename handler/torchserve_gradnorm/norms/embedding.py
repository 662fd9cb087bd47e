"""nn.Embedding: the weight gradient of one sample adds the output gradients of the tokens
that share an index into that index's row.

With M the (T, T) "same index" matrix of a sample, |grad|_2^2 = sum_ts M_ts <g_t, g_s>;
for L1, each token's row total is (M G)_t, and a row shared by c tokens appears c times.
Tokens at padding_idx get no gradient.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register


def _check(module: nn.Module) -> str | None:
    if module.max_norm is not None:
        return "Embedding with max_norm renormalizes its weight in place during forward"
    if module.scale_grad_by_freq:
        return "Embedding with scale_grad_by_freq scales gradients by batch-wide counts"
    return None


@register(nn.Embedding, params=("weight",), check=_check)
def embedding_norms(
    module: nn.Module, activation: Tensor, grad_output: Tensor, kind: str, wanted: frozenset
) -> dict[str, Tensor]:
    batch = activation.shape[0]
    ids = activation.reshape(batch, -1)
    g = grad_output.reshape(batch, ids.shape[1], -1)
    if module.padding_idx is not None:
        g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
    if kind == "sq_l2":
        return {"weight": (same * (g @ g.transpose(1, 2))).sum((1, 2))}
    rows = same @ g
    return {"weight": (rows.abs().sum(2) / same.sum(2)).sum(1)}
