r"""``sum``: the engine's scalar score, no fitting.

:math:`s(x) = -\sum_l \lVert \nabla_{\theta_l} \mathcal{L}(x) \rVert` (the negated sum of
per-layer norms by default: GradNorm, Huang et al., NeurIPS 2021, and the confounding
variant of Lee & AlRegib, ICIP 2020). pytorch-ood's documentation warns it can be near
chance when ID and OOD data are of similar complexity.
"""

from __future__ import annotations

import numpy as np

from .base import Detector, Features


class SumDetector(Detector):
    name = "sum"
    needs_per_layer = False

    def score(self, features: Features) -> np.ndarray:
        return np.asarray(features.ood_score, dtype=np.float64)
