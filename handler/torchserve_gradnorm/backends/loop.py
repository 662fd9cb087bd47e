"""loop backend: one forward and one ``torch.autograd.grad`` per sample.

The slowest backend and the most general one: it runs TorchScript models and anything that
``torch.func`` cannot trace, and never writes ``.grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..losses import per_sample_norm
from ..outputs import Batch, batch_size, rows
from .base import Backend, requires_grad_only
from .capture import rows_of, watching


class LoopBackend(Backend):
    name = "loop"
    runs_each_sample_alone = True

    def __call__(self, x: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        kind = self.method.norm
        answers: list[Tensor] = []
        norms: dict[str, list[Tensor]] = {n: [] for n in self.selected}
        head = self.head_inputs
        features: list[Tensor] = []
        with requires_grad_only(self.model, self.selected) as params, watching(head):
            for i in range(batch_size(x)):
                logits = self.logits(rows(x, i, i + 1))
                if head is not None:
                    features.append(rows_of(head.take(), 1))
                grads = torch.autograd.grad(self.loss(logits).sum(), params, allow_unused=True)
                answers.append(logits.detach()[0])
                for name, p, g in zip(self.selected, params, grads):
                    g = torch.zeros_like(p) if g is None else g
                    norms[name].append(per_sample_norm(g.unsqueeze(0), kind))
        self.penultimate = torch.cat(features) if head is not None else None
        return torch.stack(answers), {n: torch.cat(v) for n, v in norms.items()}
