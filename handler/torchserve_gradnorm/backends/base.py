"""What every backend provides, and the model-state helpers they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..losses import Method
from ..outputs import Batch, OutputKey, forward_logits


class BackendUnsupported(RuntimeError):
    """The backend cannot score this model exactly; ``auto`` moves on to the next backend."""


class BatchDependent(BackendUnsupported):
    """The backend cannot score this batch: its samples take different paths through the
    model (a branch on a value that differs between them). Other batches of the same model
    may not, so ``auto`` scores this one with the next backend without giving up on this one.
    """


class Backend(ABC):
    """Per-sample gradient norms for one model, parameter selection and method.

    ``__call__`` receives a batch already on the model's device, with grad mode on and the
    model in eval mode (the scorer arranges both), and returns the logits of that batch and,
    for every selected parameter name, its (B,) contribution to the norm. A batch is a
    Tensor or a mapping of batched tensors (``outputs.Batch``); ``logits`` calls the model
    and finds its logits.
    """

    name: str = ""
    runs_each_sample_alone: bool = False
    """Each sample gets its own forward: branches that differ between samples are fine."""
    head_inputs = None
    """A ``capture.HeadInputs`` when the scorer wants the penultimate activations."""
    penultimate: Tensor | None = None
    """(B, D) penultimate activations of the last call's forward, with ``head_inputs``."""

    def __init__(
        self,
        model: nn.Module,
        selected: list[str],
        method: Method,
        temperature: float,
        output: OutputKey = None,
    ) -> None:
        reason = self.unsupported_reason(model, selected)
        if reason:
            raise BackendUnsupported(reason)
        self.model = model
        self.selected = selected
        self.method = method
        self.temperature = temperature
        self.output = output

    @classmethod
    def unsupported_reason(cls, model: nn.Module, selected: list[str]) -> str | None:
        """Why this backend cannot serve the model, found without running it; None if it can."""
        return None

    @abstractmethod
    def __call__(self, x: Batch) -> tuple[Tensor, dict[str, Tensor]]: ...

    def logits(self, x: Batch) -> Tensor:
        return forward_logits(self.model, x, self.output)

    def loss(self, logits: Tensor) -> Tensor:
        return self.method.loss(logits, self.temperature)


def is_torchscript(model: nn.Module) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


@contextmanager
def requires_grad_only(model: nn.Module, selected: list[str]) -> Iterator[list[Tensor]]:
    """Temporarily make exactly the selected parameters require grad.

    Frozen parameters can then be scored, and autograd records nothing upstream of the
    earliest selected layer. The flags are restored on exit, whatever happens.
    """
    wanted = set(selected)
    params = list(model.named_parameters())
    flipped = [(p, p.requires_grad) for n, p in params if p.requires_grad != (n in wanted)]
    try:
        for p, flag in flipped:
            p.requires_grad_(not flag)
        yield [p for n, p in params if n in wanted]
    finally:
        for p, flag in flipped:
            p.requires_grad_(flag)
