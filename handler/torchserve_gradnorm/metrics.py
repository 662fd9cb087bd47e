"""Per-batch OOD metrics through TorchServe's metrics API (``context.metrics``).

The handler calls :func:`record_batch` from ``postprocess`` once per server-side batch.
Every metric carries the dimensions ``ModelName`` and ``Level`` (always ``"Model"``), in
this order, as declared in the top-level ``metrics.yaml``; TorchServe's frontend adds
``Hostname`` and, in ``metrics_mode=prometheus``, exports only declared metrics:

=====================  =========  ====================================================
``OODRequests``        counter    requests scored (status 200; an ``instances`` request
                                  counts once)
``OODFlagged``         counter    scored requests with ``is_ood`` true for at least one
                                  sample (always 0 without a threshold)
``OODScoringTime``     counter    milliseconds spent in the batched scoring pass, added
                                  once per batch (TorchServe's own latency convention)
``OODBatches``         counter    batches with at least one scored request
``OODScoringSeconds``  histogram  seconds per scored batch
``OODScore``           histogram  one observation per scored sample of
                                  ``(score - center) / (threshold - center)`` clipped to
                                  [0, 10] -- only with a calibrated score reference
=====================  =========  ====================================================

TorchServe's Prometheus histograms have fixed buckets from 0.005 to 10, so the raw score
(unbounded, of either sign) cannot be observed as is. With a reference ``(center,
threshold)`` -- ``center`` the median score of in-distribution calibration data and
``threshold`` the decision threshold -- the observed ratio is 0 at or below the typical
in-distribution score, 1 exactly at the threshold (so the 1.0 bucket splits flagged from
unflagged samples) and saturates at 10. Without a reference the ratio would be
meaningless, so ``OODScore`` is not recorded at all.

Metrics are best effort: an error here is logged and never fails a request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("torchserve_gradnorm")

REQUESTS = "OODRequests"
FLAGGED = "OODFlagged"
SCORING_TIME = "OODScoringTime"
BATCHES = "OODBatches"
SCORING_SECONDS = "OODScoringSeconds"
SCORE = "OODScore"

SCORE_MAX = 10.0
"""Upper clip of the OOD score ratio: TorchServe's largest finite histogram bucket."""

# Units as declared in metrics.yaml (the declared metric's unit is what gets emitted).
_UNITS = {
    REQUESTS: "Count",
    FLAGGED: "Count",
    SCORING_TIME: "Milliseconds",
    BATCHES: "Count",
    SCORING_SECONDS: "Seconds",
    SCORE: "ratio",
}


def score_ratio(score: float, center: float, threshold: float) -> float:
    """``(score - center) / (threshold - center)`` clipped to [0, 10].

    0 at or below ``center`` (the in-distribution median), 1 at ``threshold``; NaN scores
    map to 0 and +-inf to the bounds. Needs ``threshold > center``.
    """
    if not threshold > center:
        raise ValueError(f"threshold {threshold} must be above the center {center}")
    if math.isnan(score):
        return 0.0
    ratio = (score - center) / (threshold - center)
    return min(max(ratio, 0.0), SCORE_MAX)


def reference_pair(reference: Any) -> tuple[float, float] | None:
    """``(center, threshold)`` from a pair or an object with those attributes; None if unusable."""
    if reference is None:
        return None
    try:
        if hasattr(reference, "center") and hasattr(reference, "threshold"):
            center, threshold = reference.center, reference.threshold
        else:
            center, threshold = reference
        center, threshold = float(center), float(threshold)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(center) and math.isfinite(threshold) and threshold > center):
        return None
    return center, threshold


def _dimensions(model_name: str) -> list[Any]:
    from ts.metrics.dimension import Dimension  # TorchServe only: keep the module importable

    # order matters: the frontend maps values to the declared dimension names by position
    return [Dimension("ModelName", model_name), Dimension("Level", "Model")]


def _metric_types() -> Any:
    from ts.metrics.metric_type_enum import MetricTypes

    return MetricTypes


def _number(value: float) -> float | int:
    # the frontend parses values with [0-9\-,.e]+: no "+" exponents, no inf or nan
    if isinstance(value, int):
        return value
    return round(float(value), 6)


def record_batch(
    metrics: Any,
    model_name: str,
    replies: Sequence[Any],
    scoring_ms: float,
    reference: Any = None,
) -> None:
    """Record one batch's OOD metrics; ``replies`` are ``service.Reply`` objects.

    ``reference`` is the service's ``score_reference``: ``(center, threshold)`` or None.
    """
    if metrics is None:
        return
    try:
        _record(metrics, model_name, replies, scoring_ms, reference)
    except Exception as e:  # metrics must never fail a request
        log.warning("gradnorm: could not record metrics: %s: %s", type(e).__name__, e)


def _record(metrics, model_name, replies, scoring_ms, reference) -> None:
    scored = [r for r in replies if r.status == 200 and r.ood_scores]
    if not scored:
        return
    types = _metric_types()
    flagged = sum(1 for r in scored if any(f is True for f in r.flags))
    ms = max(float(scoring_ms), 0.0)

    def emit(name: str, value: float, kind: Any) -> None:
        metrics.add_metric(
            name,
            _number(value),
            _UNITS[name],
            dimensions=_dimensions(model_name),
            metric_type=kind,
        )

    emit(REQUESTS, len(scored), types.COUNTER)
    emit(FLAGGED, flagged, types.COUNTER)  # zeros too: the series exists from the start
    emit(SCORING_TIME, ms, types.COUNTER)
    emit(BATCHES, 1, types.COUNTER)
    emit(SCORING_SECONDS, ms / 1000.0, types.HISTOGRAM)
    pair = reference_pair(reference)
    if pair is None:
        return
    center, threshold = pair
    for reply in scored:
        for score in reply.ood_scores:
            emit(SCORE, score_ratio(float(score), center, threshold), types.HISTOGRAM)
