r"""``msp``: the maximum-softmax-probability baseline, no fitting.

:math:`s(x) = -\max_c \operatorname{softmax}(f(x))_c`. Hendrycks & Gimpel, "A Baseline for
Detecting Misclassified and Out-of-Distribution Examples in Neural Networks", ICLR 2017.
"""

from __future__ import annotations

import numpy as np

from .base import Detector, Features, log_sum_exp


class MSPDetector(Detector):
    name = "msp"
    needs_per_layer = False

    def score(self, features: Features) -> np.ndarray:
        logits = features.require_logits(self.name)
        return -np.exp(logits.max(1) - log_sum_exp(logits))
