"""fast backend: exact per-sample norms from one forward and one backward to layer outputs.

Forward hooks keep each selected module's input and the autograd edge of its output; one
``torch.autograd.grad`` of the summed per-sample losses with respect to those edges gives
every sample's output gradient, and a per-layer rule (``norms/``) turns input and output
gradient into the per-sample norm without building a per-sample gradient of the whole
model. Autograd computes no weight gradients, and stops at the earliest selected layer.

The output *edge* (not the output tensor) is what is differentiated, so a later in-place
op on the output (ResNet's ``relu(inplace=True)``, ``out += identity``) does not change
which gradient we get.

Exactness conditions, checked on every call (hooks) or on the first one (graph):
every selected parameter lives in a module with a rule, that module runs exactly once per
forward, its input is not modified in place afterwards, and the parameter feeds the graph
only through that module. Anything else raises ``BackendUnsupported`` and ``auto`` moves on.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from ..norms import rule_for
from ..outputs import Batch, batch_size
from .base import Backend, BackendUnsupported, is_torchscript, requires_grad_only


def _owners(model: nn.Module, selected: list[str]) -> dict[str, dict[str, str]]:
    """{module name: {local parameter name: full name}} for the selected parameters."""
    owners: dict[str, dict[str, str]] = defaultdict(dict)
    for full in selected:
        module_name, _, local = full.rpartition(".")
        owners[module_name][local] = full
    return dict(owners)


class FastBackend(Backend):
    name = "fast"

    @classmethod
    def unsupported_reason(cls, model: nn.Module, selected: list[str]) -> str | None:
        if is_torchscript(model):
            return "forward hooks cannot be attached to a TorchScript model"
        for module_name, params in _owners(model, selected).items():
            module = model.get_submodule(module_name)
            label = module_name or "the root module"
            rule = rule_for(module)
            if rule is None:
                return f"no norm rule for {type(module).__name__} ({label})"
            unknown = set(params) - rule.params
            if unknown:
                return (
                    f"{type(module).__name__} ({label}) has parameters {sorted(unknown)} "
                    "that its rule does not cover"
                )
            reason = rule.unsupported_reason(module)
            if reason:
                return f"{label}: {reason}"
        return None

    def __init__(self, model, selected, method, temperature, output=None) -> None:
        super().__init__(model, selected, method, temperature, output)
        self._owners = _owners(model, selected)
        self._modules = {name: model.get_submodule(name) for name in self._owners}
        self._rules = {name: rule_for(m) for name, m in self._modules.items()}
        self._graph_checked = False

    def __call__(self, x: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        calls: dict[str, list[tuple[Tensor, int, object]]] = defaultdict(list)

        def hook_for(name: str):
            def hook(module: nn.Module, inputs: tuple, output: object) -> None:
                if not isinstance(output, Tensor) or output.grad_fn is None:
                    raise BackendUnsupported(f"{name}: output is not a differentiable tensor")
                if not inputs or not isinstance(inputs[0], Tensor):
                    raise BackendUnsupported(f"{name}: called without a positional input tensor")
                calls[name].append((inputs[0], inputs[0]._version, get_gradient_edge(output)))

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in self._modules.items()]
        try:
            with requires_grad_only(self.model, self.selected) as params:
                logits = self.logits(x)
                loss = self.loss(logits).sum()
                if not self._graph_checked:
                    self._check_graph(loss, params)
        finally:
            for h in handles:
                h.remove()

        names = list(self._modules)
        for name in names:
            if len(calls[name]) != 1:
                raise BackendUnsupported(
                    f"{name} ran {len(calls[name])} times in one forward (shared weights?)"
                )
            activation, version, _ = calls[name][0]
            if activation._version != version:
                raise BackendUnsupported(f"the input of {name} was modified in place after use")
        edges = [calls[n][0][2] for n in names]
        grads = torch.autograd.grad(loss, edges, allow_unused=True, materialize_grads=True)

        kind = self.method.norm
        samples = batch_size(x)
        norms: dict[str, Tensor] = {}
        for name, grad_output in zip(names, grads):
            activation = calls[name][0][0]
            wanted = frozenset(self._owners[name])
            local = self._rules[name].compute(
                self._modules[name], activation.detach(), grad_output, kind, wanted
            )
            for local_name, full in self._owners[name].items():
                norms[full] = local[local_name]
                # an input broadcast over the batch (BERT's (1, T) position ids) gives a rule
                # fewer rows than samples: refuse rather than return a wrong shape
                if norms[full].shape != (samples,):
                    raise BackendUnsupported(
                        f"{name}: the {local_name} rule gave shape {list(norms[full].shape)} "
                        f"for {samples} samples (an input broadcast over the batch?)"
                    )
        return logits.detach(), {n: norms[n] for n in self.selected}

    def _check_graph(self, loss: Tensor, params: list[Tensor]) -> None:
        """Each selected parameter must reach the loss through exactly one graph edge."""
        uses = {id(p): 0 for p in params}
        seen: set[int] = set()
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                var = getattr(nxt, "variable", None)
                if var is not None and id(var) in uses:
                    uses[id(var)] += 1
                stack.append(nxt)
        for name, p in zip(self.selected, params):
            if uses[id(p)] > 1:
                raise BackendUnsupported(
                    f"parameter {name} is used {uses[id(p)]} times in the graph "
                    "(tied or used outside its module)"
                )
        self._graph_checked = True
