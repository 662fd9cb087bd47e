r"""``energy``: the energy score, no fitting.

:math:`s(x) = E(x) = -T \log \sum_c e^{f_c(x) / T}` with :math:`T = 1` (free energy of the
logits; ID data has lower energy). Liu, Wang, Owens & Li, "Energy-based Out-of-distribution
Detection", NeurIPS 2020.
"""

from __future__ import annotations

import numpy as np

from .base import Detector, Features, log_sum_exp


class EnergyDetector(Detector):
    name = "energy"
    needs_per_layer = False

    def score(self, features: Features) -> np.ndarray:
        return -log_sum_exp(features.require_logits(self.name))
