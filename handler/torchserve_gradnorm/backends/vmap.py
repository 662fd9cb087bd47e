"""vmap backend: ``torch.func.vmap`` over ``torch.func.grad`` of the one-sample loss.

Only the selected parameters are differentiated; the others and the buffers go in as
constants. It materializes one gradient per sample (B x |selected| numbers): exact and
general, but memory-hungry, which is what ``micro_batch_size`` bounds.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..losses import per_sample_norm
from ..outputs import Batch, call_args, logits_of, map_batch
from .base import Backend, is_torchscript
from .capture import rows_of, watching


class VmapBackend(Backend):
    name = "vmap"

    @classmethod
    def unsupported_reason(cls, model: nn.Module, selected: list[str]) -> str | None:
        if is_torchscript(model):
            return "torch.func cannot trace a TorchScript model"
        return None

    def __call__(self, x: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        wanted = set(self.selected)
        named = dict(self.model.named_parameters())
        selected = {n: named[n].detach() for n in self.selected}
        constants = {n: p.detach() for n, p in named.items() if n not in wanted}
        constants.update({n: b.detach() for n, b in self.model.named_buffers()})
        model, loss, key, head = self.model, self.loss, self.output, self.head_inputs

        def one_sample(params: dict[str, Tensor], xi: Batch) -> tuple[Tensor, tuple]:
            # vmap hands over one sample without its batch axis (each tensor of a mapping too)
            args, kwargs = call_args(map_batch(xi, lambda v: v.unsqueeze(0)))
            output = functional_call(model, {**params, **constants}, args, kwargs)
            logits = logits_of(output, key)
            # the head's input leaves the transforms beside the logits, as their aux output
            features = () if head is None else (rows_of(head.take(), 1).squeeze(0),)
            return loss(logits).sum(), (logits.squeeze(0), *features)

        with watching(head):
            grads, (logits, *features) = vmap(grad(one_sample, has_aux=True), in_dims=(None, 0))(
                selected, x
            )
        self.penultimate = features[0] if features else None
        kind = self.method.norm
        return logits.detach(), {n: per_sample_norm(g, kind) for n, g in grads.items()}
