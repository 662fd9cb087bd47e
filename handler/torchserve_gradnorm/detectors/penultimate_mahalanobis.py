r"""``penultimate_mahalanobis``: unsupervised, ID data (and augmented copies of it) only.

The detector of Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks" (NeurIPS 2018), on its own features:
the penultimate activations :math:`h(x)`, the input of the classifier's last linear layer
(flattened per sample), kept from the scoring forward (``GradNormScorer(penultimate=True)``,
no second forward). One Gaussian per class :math:`\mathcal{N}(\mu_c, \Sigma)` with a
covariance shared by all classes (shrunk towards its diagonal: ReLU features with units that
never fire leave the sample covariance singular), and the score is the distance to the closest
class,

.. math:: s(x) = \min_c \sqrt{(h(x) - \mu_c)^\top \Sigma^{-1} (h(x) - \mu_c)}.

The paper fits each class on the training samples of that class; calibration folders carry
no labels, so each sample is assigned to the class the model predicts (as
``class_mahalanobis`` does). The paper's input preprocessing and its ensemble over layers
need extra forwards and are left out. It reads no gradient: with a calibration file of this
detector the handler keeps the penultimate activations but not the per-layer norms.
"""

from __future__ import annotations

import numpy as np

from .base import Features
from .class_mahalanobis import ClassMahalanobisDetector


class PenultimateMahalanobisDetector(ClassMahalanobisDetector):
    name = "penultimate_mahalanobis"
    needs_per_layer = False
    needs_penultimate = True

    def vectors(self, features: Features) -> np.ndarray:
        return features.require_penultimate(self.name)
