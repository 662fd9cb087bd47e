"""``mlp``: supervised, ID and labelled OOD data.

The classifier of Lee & AlRegib, "Gradients as a Measure of Uncertainty in Neural Networks"
(ICIP 2020, Section 4): a 2-layer fully connected
binary classifier :math:`g` on the standardized log per-layer norms :math:`z(x)`, trained
with binary cross-entropy (classes balanced); the score is its OOD logit
:math:`s(x) = g(z(x))`. It learns which layers matter and in which direction, but only knows
the kinds of OOD it was shown.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import Detector, Features, log_features


class MLPDetector(Detector):
    name = "mlp"
    needs_ood = True
    hidden = 32

    def __init__(self, weights: dict[str, np.ndarray] | None = None):
        self.weights = weights

    def fit(self, id_features: Features, ood_features: Features | None = None) -> None:
        if ood_features is None or len(ood_features) == 0:
            raise ValueError("the mlp detector is trained on labelled OOD data: give --ood")
        x = np.concatenate(
            [log_features(id_features.per_layer), log_features(ood_features.per_layer)]
        )
        y = np.concatenate([np.zeros(len(id_features)), np.ones(len(ood_features))])
        center, scale = x.mean(0), x.std(0) + 1e-6
        generator = torch.Generator().manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], self.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(self.hidden, 1),
        ).double()
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1)
        inputs = torch.from_numpy((x - center) / scale)
        targets = torch.from_numpy(y)
        balance = torch.tensor(len(id_features) / len(ood_features), dtype=torch.float64)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(500):
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                net(inputs).squeeze(1), targets, pos_weight=balance
            )
            loss.backward()
            optimizer.step()
        w1, w2 = net[0], net[2]
        self.weights = {
            "center": center,
            "scale": scale,
            "w1": w1.weight.detach().numpy(),
            "b1": w1.bias.detach().numpy(),
            "w2": w2.weight.detach().numpy()[0],
            "b2": w2.bias.detach().numpy(),
        }

    def score(self, features: Features) -> np.ndarray:
        w = self.weights
        x = (log_features(features.per_layer) - w["center"]) / w["scale"]
        hidden = np.maximum(x @ w["w1"].T + w["b1"], 0.0)
        return hidden @ w["w2"] + w["b2"][0]

    def params(self) -> dict[str, Any]:
        return {k: np.asarray(v).tolist() for k, v in self.weights.items()}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Detector:
        return cls({k: np.asarray(v, dtype=np.float64) for k, v in params.items()})
