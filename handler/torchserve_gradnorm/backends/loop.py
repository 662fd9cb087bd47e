"""loop backend: one forward and one ``torch.autograd.grad`` per sample.

The slowest backend and the most general one: it runs TorchScript models and anything that
``torch.func`` cannot trace, and never writes ``.grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..losses import per_sample_norm
from .base import Backend, requires_grad_only


class LoopBackend(Backend):
    name = "loop"

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        kind = self.method.norm
        rows: list[Tensor] = []
        norms: dict[str, list[Tensor]] = {n: [] for n in self.selected}
        with requires_grad_only(self.model, self.selected) as params:
            for xi in x:
                logits = self.model(xi.unsqueeze(0))
                grads = torch.autograd.grad(self.loss(logits).sum(), params, allow_unused=True)
                rows.append(logits.detach()[0])
                for name, p, g in zip(self.selected, params, grads):
                    g = torch.zeros_like(p) if g is None else g
                    norms[name].append(per_sample_norm(g.unsqueeze(0), kind))
        return torch.stack(rows), {n: torch.cat(v) for n, v in norms.items()}
