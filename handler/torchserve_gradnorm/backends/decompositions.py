"""Calls that the fast backend replays as the covered calls they are made of, so that the
parameters inside them get rule-based norms instead of a per-sample vjp of the whole call.

``multi_head_attention_forward`` (nn.MultiheadAttention) without masks or extras is the
packed in-projection (one ``linear`` with the (3E, E) weight), scaled dot-product
attention and the out-projection ``linear``: the steps torch itself takes on that path.
Anything else returns ``NotImplemented`` and is recorded as one call.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None,
    static_v: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
):
    extras = (key_padding_mask, attn_mask, bias_k, bias_v, static_k, static_v)
    if (
        need_weights
        or is_causal
        or add_zero_attn
        or use_separate_proj_weight
        or in_proj_weight is None
        or any(e is not None for e in extras)
        or (training and dropout_p > 0)
        or query.dim() != 3
        or query.shape[-1] != embed_dim_to_check
    ):
        return NotImplemented
    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, None, 0.0, False)
    out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    return out.view(tgt_len, bsz, out.size(1)), None


DECOMPOSITIONS = {F.multi_head_attention_forward: multi_head_attention}
