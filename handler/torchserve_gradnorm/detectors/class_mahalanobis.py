r"""``class_mahalanobis``: unsupervised, ID data (and augmented copies of it) only.

Features per sample: the log per-layer gradient norms and two statistics of the logits,

.. math:: z(x) = \bigl(\log \lVert \nabla_{\theta_1} \mathcal{L}(x) \rVert, \dots,
   \log \lVert \nabla_{\theta_L} \mathcal{L}(x) \rVert,\ \max_c f_c(x),\
   \log \textstyle\sum_c e^{f_c(x)}\bigr).

One Gaussian per class :math:`\mathcal{N}(\mu_c, \Sigma)` with a covariance shared by all
classes (shrunk towards its diagonal), fitted with each sample assigned to the class the
model predicts; the score is the distance to the closest class,

.. math:: s(x) = \min_c \sqrt{(z(x) - \mu_c)^\top \Sigma^{-1} (z(x) - \mu_c)}.

Class-conditional Gaussians with a tied covariance are the detector of Lee, Lee, Lee & Shin,
"A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
Attacks" (NeurIPS 2018), here on gradient and logit statistics instead of hidden features.
Why these features: a picture's gradient norms depend on its class (a one and an eight move
different filters), so one Gaussian for all classes must be wide enough for every class and
lets OOD pictures that look like an average class through; the logit statistics (the energy
score of Liu et al. 2020 and the maximum logit) carry the classifier's own confidence, which
changes little under benign re-rendering when the detector is fitted on augmented copies
(``gradnorm-calibrate --augment``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Detector, Features, log_features, log_sum_exp, shrunk_precision


def joint_features(features: Features, name: str) -> np.ndarray:
    logits = features.require_logits(name)
    return np.concatenate(
        [
            log_features(features.per_layer),
            logits.max(1, keepdims=True),
            log_sum_exp(logits)[:, None],
        ],
        axis=1,
    )


class ClassMahalanobisDetector(Detector):
    name = "class_mahalanobis"

    def __init__(self, means: np.ndarray | None = None, precision: np.ndarray | None = None):
        self.means = means
        self.precision = precision

    def vectors(self, features: Features) -> np.ndarray:
        """The per-sample vectors the Gaussians are fitted to."""
        return joint_features(features, self.name)

    def fit(self, id_features: Features, ood_features: Features | None = None) -> None:
        z = self.vectors(id_features)
        predicted = id_features.require_logits(self.name).argmax(1)
        classes = np.unique(predicted)
        if len(z) < len(classes) + 1:
            raise ValueError("class_mahalanobis needs more ID samples than predicted classes")
        self.means = np.full((id_features.logits.shape[1], z.shape[1]), np.nan)
        for c in classes:
            self.means[c] = z[predicted == c].mean(0)
        self.precision = shrunk_precision(z - self.means[predicted])

    def score(self, features: Features) -> np.ndarray:
        z = self.vectors(features)
        means = self.means[~np.isnan(self.means).any(1)]  # classes never predicted at fit time
        d = z[:, None, :] - means[None]
        squared = np.einsum("nci,ij,ncj->nc", d, self.precision, d)
        return np.sqrt(np.maximum(squared.min(1), 0.0))

    def params(self) -> dict[str, Any]:
        # classes never predicted at fit time are stored as null rows (JSON has no NaN)
        return {
            "means": [None if np.isnan(m).any() else m.tolist() for m in self.means],
            "precision": self.precision.tolist(),
        }

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Detector:
        precision = np.asarray(params["precision"], float)
        means = np.array(
            [np.full(len(precision), np.nan) if m is None else m for m in params["means"]], float
        )
        return cls(means, precision)
