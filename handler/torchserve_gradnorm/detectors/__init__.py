"""OOD detectors on top of the gradient norms (and logits), one per file, fitted at
calibration time.

Every detector maps a batch's features to a score where higher means more OOD. Fitted
parameters are plain numbers and arrays (stored in the calibration JSON), never pickled
code. ``msp``, ``energy`` and ``sum`` need no fitting; ``mahalanobis``,
``class_mahalanobis``, ``predicted_mahalanobis`` and ``penultimate_mahalanobis`` (on the
penultimate activations instead of gradients) are fitted on ID data only; ``mlp`` also needs
labelled OOD data.
"""

from __future__ import annotations

from .base import Detector, Features, log_features
from .class_mahalanobis import ClassMahalanobisDetector
from .energy import EnergyDetector
from .mahalanobis import MahalanobisDetector
from .mlp import MLPDetector
from .msp import MSPDetector
from .penultimate_mahalanobis import PenultimateMahalanobisDetector
from .predicted_mahalanobis import PredictedMahalanobisDetector
from .sum import SumDetector

DETECTORS: dict[str, type[Detector]] = {
    d.name: d
    for d in (
        SumDetector,
        MSPDetector,
        EnergyDetector,
        MahalanobisDetector,
        ClassMahalanobisDetector,
        PredictedMahalanobisDetector,
        PenultimateMahalanobisDetector,
        MLPDetector,
    )
}


def get_detector(name: str) -> type[Detector]:
    try:
        return DETECTORS[name]
    except KeyError:
        raise ValueError(
            f"unknown detector {name!r}: expected one of {', '.join(DETECTORS)}"
        ) from None


__all__ = [
    "DETECTORS",
    "ClassMahalanobisDetector",
    "Detector",
    "EnergyDetector",
    "Features",
    "MLPDetector",
    "MSPDetector",
    "MahalanobisDetector",
    "PenultimateMahalanobisDetector",
    "PredictedMahalanobisDetector",
    "SumDetector",
    "get_detector",
    "log_features",
]
