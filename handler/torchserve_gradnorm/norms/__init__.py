"""Per-operation norm rules for the fast backend, one module per family of torch functions."""

from . import conv, elementwise, embedding, linear, normalization  # noqa: F401  (they register)
from .functional import per_sample_vjp
from .registry import RULES, OpCall, OpRule, register, rule_for

__all__ = ["RULES", "OpCall", "OpRule", "per_sample_vjp", "register", "rule_for"]
