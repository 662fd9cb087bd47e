"""The rule for any other call: each sample's vector-Jacobian product of the call itself.

``torch.func.vmap`` runs the call once per sample (batched) under ``torch.func.vjp`` with
respect to its parameter-side arguments, giving (B, *arg.shape) per-sample gradients.
Exact for any function the per-sample forward could run; it costs about one more forward
and backward of that call, and B times the argument's size in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .registry import OpCall


def per_sample_vjp(call: OpCall, tracked: list[Tensor], outputs: list[int]) -> list[Tensor]:
    """(B, *t.shape) per-sample gradients for each tensor of ``tracked`` (arguments of the
    call); ``outputs`` are the positions of the per-sample outputs among the call's output
    leaves, in the order of ``call.grad_outputs``."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    per_sample = [i for i, v in enumerate(leaves) if call.is_per_sample(v)]
    ids = {id(t): k for k, t in enumerate(tracked)}
    slots = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and id(v) in ids]
    func = call.func

    def one_sample(values: list[Tensor], cotangents: list[Tensor]) -> tuple[Tensor, ...]:
        def run(*params: Tensor) -> tuple[Tensor, ...]:
            filled = list(leaves)
            for i, v in zip(per_sample, values):
                filled[i] = v
            for i in slots:
                filled[i] = params[ids[id(leaves[i])]]
            args, kwargs = tree_unflatten(filled, spec)
            result, _ = tree_flatten(func(*args, **kwargs))
            return tuple(result[i] for i in outputs)

        _, vjp = torch.func.vjp(run, *tracked)
        return vjp(tuple(cotangents))

    values = [leaves[i] for i in per_sample]
    return list(torch.func.vmap(one_sample)(values, list(call.grad_outputs)))
