r"""``mahalanobis``: unsupervised, ID data only.

A Gaussian :math:`\mathcal{N}(\mu, \Sigma)` fitted to the log per-layer norms

.. math:: z(x) = \bigl(\log \lVert \nabla_{\theta_l} \mathcal{L}(x) \rVert\bigr)_{l=1..L},

with :math:`\Sigma` shrunk towards its diagonal; the score is the Mahalanobis distance
:math:`s(x) = \sqrt{(z - \mu)^\top \Sigma^{-1} (z - \mu)}`. Lee & AlRegib's per-layer
squared norms ("Gradients as a Measure of Uncertainty in Neural Networks", ICIP 2020) used
as a feature vector, without OOD labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Detector, Features, log_features, shrunk_precision


class MahalanobisDetector(Detector):
    name = "mahalanobis"

    def __init__(self, mean: np.ndarray | None = None, precision: np.ndarray | None = None):
        self.mean = mean
        self.precision = precision

    def fit(self, id_features: Features, ood_features: Features | None = None) -> None:
        x = log_features(id_features.per_layer)
        if len(x) < 2:
            raise ValueError("mahalanobis needs at least 2 ID samples")
        self.mean = x.mean(0)
        self.precision = shrunk_precision(x - self.mean)

    def score(self, features: Features) -> np.ndarray:
        d = log_features(features.per_layer) - self.mean
        return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", d, self.precision, d), 0.0))

    def params(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "precision": self.precision.tolist()}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Detector:
        return cls(np.asarray(params["mean"], float), np.asarray(params["precision"], float))
