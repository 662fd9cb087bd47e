"""Per-operation norm rules, keyed by the torch function that consumes a parameter.

The fast backend records every call of a torch function that takes a selected parameter
(or a tensor computed from parameters alone) together with a per-sample input. A rule
receives that call as an ``OpCall``: the arguments bound to the function's signature, with
every per-sample tensor laid out (B, *shape of one sample's value), and the gradient of the
summed per-sample losses at the call's output, also (B, ...), row i belonging to sample i.
For each parameter-side argument it is asked about, it returns either that sample's
gradient norm ("norm", (B,)) or the per-sample gradient itself ("grad", (B, *arg.shape)),
the latter when the argument's gradient must first be added to other uses' or pulled back
to the parameters it was computed from. It never builds the batch-summed gradient.

A call that no rule covers, or whose arguments are not laid out as the rule expects, is
handled by ``per_sample_vjp`` (functional.py): exact, at the cost of a per-sample vjp.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

Want = dict[str, str]  # argument name -> "norm" or "grad"


@dataclass
class OpCall:
    func: Callable
    args: tuple
    kwargs: dict[str, Any]
    per_sample: set[int]
    """ids of the argument tensors laid out (B, ...) per sample."""
    grad_outputs: list[Tensor]
    """(B, ...) gradient at each per-sample output of the call, in output order."""
    bound: dict[str, Any] = field(default_factory=dict)
    """The arguments by name, once a rule's signature has bound them."""

    def is_per_sample(self, value: Any) -> bool:
        return isinstance(value, Tensor) and id(value) in self.per_sample


RuleFn = Callable[[OpCall, Want, str], dict[str, Tensor]]
CheckFn = Callable[[dict[str, Any]], "str | None"]


@dataclass(frozen=True)
class OpRule:
    signature: inspect.Signature
    per_sample: frozenset[str]
    """Arguments that must be per-sample tensors for the rule to apply."""
    params: frozenset[str]
    """Arguments the rule gives per-sample gradients for (the others must be constants)."""
    compute: RuleFn
    check: CheckFn | None = None

    def bind(self, call: OpCall, tracked: set[int]) -> dict[str, Any] | None:
        """The call's arguments by name if the rule applies to this call; None otherwise."""
        try:
            bound = self.signature.bind(*call.args, **call.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        for name, value in arguments.items():
            if not isinstance(value, Tensor):
                continue
            if call.is_per_sample(value) != (name in self.per_sample):
                return None
            if id(value) in tracked and name not in self.params:
                return None
        if len(call.grad_outputs) != 1:
            return None
        return arguments

    def unsupported_reason(self, arguments: dict[str, Any]) -> str | None:
        return self.check(arguments) if self.check else None


RULES: dict[Callable, OpRule] = {}


def register(
    *funcs: Callable,
    signature: Callable,
    per_sample: tuple[str, ...],
    params: tuple[str, ...],
    check: CheckFn | None = None,
) -> Callable[[RuleFn], RuleFn]:
    """``signature`` is a stub with the torch function's argument names and defaults;
    ``check`` names calls outside the rule's closed form (batch statistics, asymmetric
    padding...), which then go to the functional rule."""

    def decorate(fn: RuleFn) -> RuleFn:
        rule = OpRule(
            inspect.signature(signature), frozenset(per_sample), frozenset(params), fn, check
        )
        for func in funcs:
            RULES[func] = rule
        return fn

    return decorate


def rule_for(func: Callable) -> OpRule | None:
    return RULES.get(func)
