"""Calibration files: a fitted detector, a threshold at a target ID true-positive rate, and
a fingerprint of what the numbers were computed with.

The threshold is the ``tpr`` quantile of the detector's scores on in-distribution data, so
that a share ``tpr`` of ID samples scores at or below it (``is_ood = score > threshold``).
Augmented copies of the ID pictures (``--augment``) shape the detector's fit only: the
threshold and the reached TPR are those of the ID samples as given, so that ``tpr`` keeps
its meaning (the copies include renderings harsher than most clients send, and counting
them would move the threshold up and let more OOD through).
The fingerprint hashes the weights file and the handler settings that change scores
(method, parameter filter, temperature, direction, input preprocessing); a served model
refuses a calibration whose fingerprint differs from its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, HandlerConfig
from .detectors import Detector, Features, get_detector

FORMAT = "torchserve-gradnorm-calibration/1"
FILENAME = "calibration.json"
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


class CalibrationError(ValueError):
    pass


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scoring_settings(config: HandlerConfig) -> dict[str, Any]:
    """The handler settings that change scores (not threshold, top_k, backend or limits)."""
    settings = {
        "method": config.method,
        "param_filter": config.param_filter,
        "temperature": config.temperature,
        "direction": config.direction,
        "input": asdict(config.input),
    }
    if config.output is not None:  # other logits, other scores (absent: older files match)
        settings["output"] = config.output
    return settings


def fingerprint(weights_sha256: str, config: HandlerConfig) -> str:
    settings = json.dumps(scoring_settings(config), sort_keys=True, default=list)
    return hashlib.sha256(f"{weights_sha256}\n{settings}".encode()).hexdigest()


@dataclass
class Calibration:
    detector: str
    detector_params: dict[str, Any]
    threshold: float
    tpr: float
    achieved_tpr: float
    direction: str
    method: str
    parameters: list[str]
    id_quantiles: dict[str, float]
    n_id: int
    n_ood: int
    fingerprint: str
    n_augmented: int = 0
    """augmented copies of the ``n_id`` ID samples the detector was also fitted on"""
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    format: str = FORMAT

    def build_detector(self) -> Detector:
        return get_detector(self.detector).from_params(self.detector_params)

    @property
    def center(self) -> float:
        """The median ID score: with the threshold, it places a score on a common scale."""
        return self.id_quantiles["0.5"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CalibrationError(f"not a calibration file (format must be {FORMAT!r})")
        try:
            calibration = cls(**data)
            get_detector(calibration.detector)
            calibration.build_detector()
        except (TypeError, KeyError, ValueError) as e:
            raise CalibrationError(f"malformed calibration file: {e}") from None
        if not np.isfinite(calibration.threshold):
            raise CalibrationError("threshold must be finite")
        return calibration

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        return cls.from_json(Path(path).read_text())

    def check_matches(self, expected_fingerprint: str, parameters: list[str]) -> None:
        if self.fingerprint != expected_fingerprint:
            raise CalibrationError(
                "calibration was made for other weights or scoring settings (fingerprint "
                f"{self.fingerprint[:12]}..., this model {expected_fingerprint[:12]}...); "
                "run gradnorm-calibrate again"
            )
        if list(self.parameters) != list(parameters):
            raise CalibrationError("calibration was made with another parameter selection")


def threshold_at_tpr(id_scores: np.ndarray, tpr: float) -> float:
    """The score at or below which a share ``tpr`` of the ID scores lies."""
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    return float(np.quantile(np.asarray(id_scores, dtype=np.float64), tpr, method="higher"))


def calibrate(
    detector: Detector,
    id_features: Features,
    ood_features: Features | None,
    *,
    tpr: float,
    config: HandlerConfig,
    parameters: list[str],
    weights_sha256: str,
    n_augmented: int = 0,
) -> Calibration:
    detector.fit(id_features, ood_features)
    # the augmented copies come last
    id_scores = detector.score(id_features)[: len(id_features) - n_augmented]
    threshold = threshold_at_tpr(id_scores, tpr)
    return Calibration(
        detector=detector.name,
        detector_params=detector.params(),
        threshold=threshold,
        tpr=tpr,
        achieved_tpr=float((id_scores <= threshold).mean()),
        direction=config.direction,
        method=config.method,
        parameters=list(parameters),
        id_quantiles={f"{q:g}": float(np.quantile(id_scores, q)) for q in QUANTILES},
        n_id=len(id_features) - n_augmented,
        n_ood=0 if ood_features is None else len(ood_features),
        fingerprint=fingerprint(weights_sha256, config),
        n_augmented=n_augmented,
    )


def shipped_calibration(model_dir: str | Path, config: HandlerConfig) -> Calibration | None:
    """The calibration file inside an extracted archive: ``handler.calibration``, else
    ``calibration.json`` when present."""
    name = config.calibration or FILENAME
    path = Path(model_dir) / name
    if not path.is_file():
        if config.calibration is not None:
            raise ConfigError("handler.calibration", f"{name} is not in the archive")
        return None
    try:
        return Calibration.load(path)
    except CalibrationError as e:
        raise ConfigError("handler.calibration", f"{name}: {e}") from None
