"""The penultimate activations: what the classifier's last linear layer receives, kept from
the scoring forward itself (no second forward) for detectors that read hidden features
(``detectors/penultimate_mahalanobis.py``).

A forward pre-hook on that layer keeps a reference to its input while a backend runs its
forward; each backend then lays it out as (B, D), one flattened row per sample: the row-wise
forward hands over the batch itself, the vmap'd forwards return it from the per-sample
function beside the logits, and the loop backend stacks its one-sample forwards. A layer
called more than once in a forward hands over its last input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from torch import Tensor, nn

from ..filters import head_module
from .base import is_torchscript


class HeadInputs:
    """Keeps the input of one module (the classifier's last ``nn.Linear``) during a forward."""

    def __init__(self, model: nn.Module) -> None:
        if is_torchscript(model):
            raise ValueError(
                "penultimate activations: a TorchScript model takes no module hooks, so its "
                "last linear layer's input cannot be kept"
            )
        self.name, self.module = head_module(model, "penultimate activations")
        self.value: Tensor | None = None

    @contextmanager
    def watching(self) -> Iterator[HeadInputs]:
        self.value = None
        handle = self.module.register_forward_pre_hook(self._keep)
        try:
            yield self
        finally:
            handle.remove()

    def _keep(self, module: nn.Module, args: tuple) -> None:
        # a reference only: any torch call here would run under the recorders' modes
        if args and isinstance(args[0], Tensor):
            self.value = args[0]

    def take(self) -> Tensor:
        """The kept input (and forget it, so it does not hold the forward's graph)."""
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(
                f"penultimate activations: the forward never called {self.name or 'the model'}"
                " (the last nn.Linear) with a tensor"
            )
        return value


def watching(head: HeadInputs | None) -> AbstractContextManager:
    """``head.watching()``, or nothing to do without a head to watch."""
    return nullcontext() if head is None else head.watching()


def rows_of(value: Tensor, batch: int) -> Tensor:
    """(B, D) per-sample rows of a (B, ...) tensor, detached."""
    return value.detach().reshape(batch, -1)
