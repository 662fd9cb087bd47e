"""torchserve-gradnorm: gradient-norm out-of-distribution scores for served classifiers."""

from .backends import BackendUnsupported
from .filters import select_parameters
from .losses import METHODS
from .scorer import DIRECTIONS, GradNormScorer, ScoreResult

__version__ = "0.1.0"

__all__ = [
    "DIRECTIONS",
    "METHODS",
    "BackendUnsupported",
    "GradNormScorer",
    "ScoreResult",
    "select_parameters",
]
