"""OOD detection metrics, with pytorch-ood's ``OODMetrics`` definitions.

OOD samples are the positive class and larger scores mean more OOD. Ties enter the curves
together (one point per unique score).
- AUROC: area under the ROC curve (trapezoids).
- AUPR-OUT: area under the precision-recall curve with OOD positive; AUPR-IN: with ID
  positive and the scores negated (sklearn's precision_recall_curve points).
- FPR@95TPR: the share of ID samples flagged at the first threshold that flags >= 95 % of
  the OOD samples.
"""

from __future__ import annotations

import numpy as np


def _counts(scores: np.ndarray, is_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_ood = np.asarray(is_ood, dtype=bool).reshape(-1)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if is_ood.all() or not is_ood.any():
        raise ValueError("metrics need both ID and OOD samples")
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    last = np.append(ranked[1:] != ranked[:-1], True)
    idx = np.nonzero(last)[0]
    tps = np.cumsum(is_ood[order])[idx]
    return tps, idx + 1 - tps


def _area(x: np.ndarray, y: np.ndarray) -> float:
    return float(((x[1:] - x[:-1]) * (y[1:] + y[:-1])).sum() / 2)


def _roc(tps: np.ndarray, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.append(0, fps) / fps[-1], np.append(0, tps) / tps[-1]


def _aupr(tps: np.ndarray, fps: np.ndarray) -> float:
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return -_area(np.append(recall[::-1], 0.0), np.append(precision[::-1], 1.0))


def ood_metrics(scores: np.ndarray, is_ood: np.ndarray, tpr: float = 0.95) -> dict[str, float]:
    tps, fps = _counts(scores, is_ood)
    fpr_curve, tpr_curve = _roc(tps, fps)
    n_pos, n_neg = tps[-1], fps[-1]
    # ID as the positive class: samples with a score <= t_j, thresholds in increasing order
    tps_in = (n_neg - np.append(0, fps[:-1]))[::-1]
    fps_in = (n_pos - np.append(0, tps[:-1]))[::-1]
    at = min(int(np.searchsorted(tpr_curve, tpr, side="left")), len(fpr_curve) - 1)
    return {
        "AUROC": _area(fpr_curve, tpr_curve),
        "AUPR-IN": _aupr(tps_in, fps_in),
        "AUPR-OUT": _aupr(tps, fps),
        f"FPR{tpr * 100:g}TPR": float(fpr_curve[at]),
    }
