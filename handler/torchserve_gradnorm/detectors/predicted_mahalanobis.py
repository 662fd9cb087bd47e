r"""``predicted_mahalanobis``: unsupervised, ID data (and augmented copies of it) only.

The features of ``class_mahalanobis``: the log per-layer gradient norms and two statistics
of the logits, the maximum logit and the log-sum-exp,

.. math:: z(x) = \bigl(g(x), c(x)\bigr),\quad
   g(x) = \bigl(\log \lVert \nabla_{\theta_l} \mathcal{L}(x) \rVert\bigr)_{l=1..L},\quad
   c(x) = \bigl(\max_k f_k(x),\ \log \textstyle\sum_k e^{f_k(x)}\bigr),

and one Gaussian per class with a covariance :math:`\Sigma` shared by all classes (shrunk
towards its diagonal), fitted with each sample assigned to the class :math:`\hat y(x)` the
model predicts. Two differences make it the full-spectrum detector:

- **The predicted class's Gaussian.** The score is the distance to the Gaussian of the class
  the model predicts, the one the sample would have been fitted to,

  .. math:: s(x) = \sqrt{(z(x) - \mu_{\hat y(x)})^\top \Sigma^{-1} (z(x) - \mu_{\hat y(x)})},

  not to the closest class: a picture answered "8" whose gradients look like a typical "1"
  is unlike every ID sample the model answers "8" for (a class never predicted at fit time
  falls back to the closest class).
- **Confidence on one scale for every class.** The means of :math:`c(x)` are shared by all
  classes (the mean over all ID samples); only the gradient norms get per-class means. The
  log-sum-exp of the logits is the classifier's log density of :math:`x` up to a constant,
  marginal over classes (the energy score, Liu, Wang, Owens & Li, "Energy-based
  Out-of-distribution Detection", NeurIPS 2020; Grathwohl et al., "Your Classifier is Secretly
  an Energy Based Model", ICLR 2020), and the maximum logit is read on the same scale
  (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML
  2022). Per-class means would excuse a sample predicted as a class the model is usually less
  sure of: an unsure answer is unsure whatever the class.

Gradient norms do get per-class means: they depend on the class (a one and an eight move
different filters). Class-conditional Gaussians with a tied covariance are the detector of
Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks" (NeurIPS 2018), here on gradient and logit statistics; fitting them on
augmented copies of the ID pictures (``gradnorm-calibrate --augment``) makes benign
re-rendering part of the ID spread (full-spectrum OOD detection, Yang et al., IJCV 2023).
Parameters are stored as ``class_mahalanobis`` stores them (the shared confidence means
repeated in every class's row).
"""

from __future__ import annotations

import numpy as np

from .base import Features, shrunk_precision
from .class_mahalanobis import ClassMahalanobisDetector, joint_features

# the last columns of joint_features: max logit and log-sum-exp
_CONFIDENCE = 2


class PredictedMahalanobisDetector(ClassMahalanobisDetector):
    name = "predicted_mahalanobis"

    def fit(self, id_features: Features, ood_features: Features | None = None) -> None:
        z = joint_features(id_features, self.name)
        predicted = id_features.require_logits(self.name).argmax(1)
        classes = np.unique(predicted)
        if len(z) < len(classes) + 1:
            raise ValueError(f"{self.name} needs more ID samples than predicted classes")
        self.means = np.full((id_features.logits.shape[1], z.shape[1]), np.nan)
        for c in classes:
            self.means[c] = z[predicted == c].mean(0)
        self.means[classes, -_CONFIDENCE:] = z[:, -_CONFIDENCE:].mean(0)
        self.precision = shrunk_precision(z - self.means[predicted])

    def score(self, features: Features) -> np.ndarray:
        z = joint_features(features, self.name)
        predicted = features.require_logits(self.name).argmax(1)
        fitted = ~np.isnan(self.means).any(1)
        d = z[:, None, :] - self.means[fitted][None]
        squared = np.einsum("nci,ij,ncj->nc", d, self.precision, d)
        # column of each sample's predicted class among the fitted ones (-1: never predicted)
        column = np.cumsum(fitted) - 1
        own = np.where(fitted[predicted], column[predicted], -1)
        chosen = np.where(own >= 0, squared[np.arange(len(z)), np.maximum(own, 0)], squared.min(1))
        return np.sqrt(np.maximum(chosen, 0.0))
