"""Per-layer norm rules, keyed by module type.

A rule receives the module, the input it was called with (``activation``), the gradient of
the summed per-sample losses at its output (``grad_output``, row i belongs to sample i) and
the norm kind, and returns ``{local parameter name: (B,) per-sample norm}`` for the names
asked. It never builds the batch-summed weight gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

RuleFn = Callable[[nn.Module, Tensor, Tensor, str, frozenset], dict[str, Tensor]]
CheckFn = Callable[[nn.Module], "str | None"]


@dataclass(frozen=True)
class NormRule:
    module_type: type[nn.Module]
    params: frozenset[str]
    compute: RuleFn
    check: CheckFn | None = None

    def unsupported_reason(self, module: nn.Module) -> str | None:
        # A subclass with its own forward may compute something else from the same weights.
        if type(module).forward is not self.module_type.forward:
            return f"{type(module).__name__} overrides forward()"
        return self.check(module) if self.check else None


RULES: dict[type[nn.Module], NormRule] = {}


def register(
    *module_types: type[nn.Module], params: tuple[str, ...], check: CheckFn | None = None
) -> Callable[[RuleFn], RuleFn]:
    def decorate(fn: RuleFn) -> RuleFn:
        for t in module_types:
            RULES[t] = NormRule(t, frozenset(params), fn, check)
        return fn

    return decorate


def rule_for(module: nn.Module) -> NormRule | None:
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
    return None
