"""Per-layer norm rules for the fast backend, one module per layer family."""

from . import conv, embedding, linear, normalization  # noqa: F401  (they register themselves)
from .registry import RULES, NormRule, register, rule_for

__all__ = ["RULES", "NormRule", "register", "rule_for"]
