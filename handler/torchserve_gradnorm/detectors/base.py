"""What every detector sees and provides: per-sample features in, an OOD score out."""

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
    logits: np.ndarray | None = None
    """(N, C) logits of the scoring forward pass (detectors that read them need them)."""
    penultimate: np.ndarray | None = None
    """(N, D) input of the model's last linear layer in the scoring forward (scored with
    ``penultimate=True``; detectors with ``needs_penultimate`` read it)."""

    def __len__(self) -> int:
        return len(self.ood_score)

    @classmethod
    def from_result(cls, result: Any) -> Features:
        """From a ``ScoreResult`` (``per_layer`` empty unless scored with ``per_layer=True``)."""
        logits = result.logits.detach().double().cpu().numpy()
        if result.per_layer:
            per_layer = torch.stack([v.detach() for v in result.per_layer.values()], 1)
            per_layer = per_layer.double().cpu().numpy()
        else:
            per_layer = np.zeros((len(logits), 0))
        penultimate = getattr(result, "penultimate", None)
        return cls(
            per_layer,
            result.ood_score.detach().double().cpu().numpy(),
            logits,
            None if penultimate is None else penultimate.detach().double().cpu().numpy(),
        )

    @classmethod
    def concat(cls, parts: list[Features]) -> Features:
        def joined(arrays: list[np.ndarray | None]) -> np.ndarray | None:
            return None if any(a is None for a in arrays) else np.concatenate(arrays)

        return cls(
            np.concatenate([p.per_layer for p in parts]),
            np.concatenate([p.ood_score for p in parts]),
            joined([p.logits for p in parts]),
            joined([p.penultimate for p in parts]),
        )

    def require_logits(self, detector: str) -> np.ndarray:
        if self.logits is None:
            raise ValueError(f"the {detector} detector reads the logits; these features lack them")
        return np.asarray(self.logits, dtype=np.float64)

    def require_penultimate(self, detector: str) -> np.ndarray:
        if self.penultimate is None:
            raise ValueError(
                f"the {detector} detector reads the penultimate activations; these features "
                "lack them (score with penultimate=True)"
            )
        return np.asarray(self.penultimate, dtype=np.float64)


def log_features(per_layer: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(per_layer, dtype=np.float64), _LOG_FLOOR))


def log_sum_exp(logits: np.ndarray) -> np.ndarray:
    top = logits.max(1)
    return top + np.log(np.exp(logits - top[:, None]).sum(1))


def shrunk_precision(centered: np.ndarray) -> np.ndarray:
    """Inverse of the sample covariance of ``centered`` rows, shrunk towards its diagonal:
    fewer samples than features, or features that move together, leave it singular."""
    cov = np.atleast_2d(np.cov(centered, rowvar=False))
    shrunk = 0.9 * cov + 0.1 * np.diag(np.diag(cov))
    shrunk += np.eye(len(cov)) * (1e-6 * np.trace(cov) / len(cov) + 1e-12)
    return np.linalg.inv(shrunk)


class Detector:
    name: ClassVar[str]
    needs_ood: ClassVar[bool] = False
    needs_per_layer: ClassVar[bool] = True
    needs_penultimate: ClassVar[bool] = False
    """Reads ``Features.penultimate``: the scorer keeps the last linear layer's input."""

    def fit(self, id_features: Features, ood_features: Features | None = None) -> None:
        """Learn from ID features (and OOD features for supervised detectors)."""

    def score(self, features: Features) -> np.ndarray:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Detector:
        return cls()
