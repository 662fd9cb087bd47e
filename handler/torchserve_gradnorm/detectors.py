"""OOD detectors on top of the gradient norms, fitted at calibration time.

Every detector maps a batch's features to a score where higher means more OOD. Fitted
parameters are plain numbers and arrays (stored in the calibration JSON), never pickled
code.

sum
    The engine's scalar score (``ood_score``: the negated sum of norms by default). No
    fitting. pytorch-ood's documentation warns it can be near chance when ID and OOD data
    are of similar complexity.
mahalanobis
    Unsupervised, ID data only: a Gaussian fitted to the log per-layer norms; the score is
    the Mahalanobis distance to it. Lee & AlRegib's per-layer squared norms used as a feature
    vector, without OOD labels.
mlp
    The classifier of Lee & AlRegib (ICIP 2020, Section 4): a 2-layer fully connected
    binary classifier on the per-layer features, trained on labelled ID and OOD samples; the
    score is its OOD logit. It learns which layers matter and in which direction, but only
    knows the kinds of OOD it was shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

_LOG_FLOOR = 1e-30


@dataclass
class Features:
    per_layer: np.ndarray
    """(N, L) per-parameter norms, in the scorer's ``selected`` order."""
    ood_score: np.ndarray
    """(N,) the engine's oriented scalar score."""

    def __len__(self) -> int:
        return len(self.ood_score)

    @classmethod
    def from_result(cls, result: Any) -> Features:
        """From a ``ScoreResult`` scored with ``per_layer=True``."""
        per_layer = torch.stack([v.detach() for v in result.per_layer.values()], 1)
        return cls(
            per_layer.double().cpu().numpy(), result.ood_score.detach().double().cpu().numpy()
        )

    @classmethod
    def concat(cls, parts: list[Features]) -> Features:
        return cls(
            np.concatenate([p.per_layer for p in parts]),
            np.concatenate([p.ood_score for p in parts]),
        )


def log_features(per_layer: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(per_layer, dtype=np.float64), _LOG_FLOOR))


class Detector:
    name: ClassVar[str]
    needs_ood: ClassVar[bool] = False
    needs_per_layer: ClassVar[bool] = True

    def fit(self, id_features: Features, ood_features: Features | None = None) -> None:
        """Learn from ID features (and OOD features for supervised detectors)."""

    def score(self, features: Features) -> np.ndarray:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Detector:
        return cls()


class SumDetector(Detector):
    name = "sum"
    needs_per_layer = False

    def score(self, features: Features) -> np.ndarray:
        return np.asarray(features.ood_score, dtype=np.float64)


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
        cov = np.atleast_2d(np.cov(x, rowvar=False))
        # shrink towards the diagonal: fewer samples than layers, or layers that move together,
        # leave the sample covariance singular
        shrunk = 0.9 * cov + 0.1 * np.diag(np.diag(cov))
        shrunk += np.eye(len(cov)) * (1e-6 * np.trace(cov) / len(cov) + 1e-12)
        self.precision = np.linalg.inv(shrunk)

    def score(self, features: Features) -> np.ndarray:
        d = log_features(features.per_layer) - self.mean
        return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", d, self.precision, d), 0.0))

    def params(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "precision": self.precision.tolist()}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Detector:
        return cls(np.asarray(params["mean"], float), np.asarray(params["precision"], float))


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


DETECTORS: dict[str, type[Detector]] = {
    d.name: d for d in (SumDetector, MahalanobisDetector, MLPDetector)
}


def get_detector(name: str) -> type[Detector]:
    try:
        return DETECTORS[name]
    except KeyError:
        raise ValueError(
            f"unknown detector {name!r}: expected one of {', '.join(DETECTORS)}"
        ) from None
