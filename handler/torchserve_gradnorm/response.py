"""The answer shape (documented in docs/response.schema.json)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def label_for(labels: Mapping[str, Any] | None, index: int) -> str:
    if labels is None:
        return str(index)
    value = labels.get(str(index), index)
    # TorchServe's index_to_name.json convention allows [synset, name] pairs
    if isinstance(value, (list, tuple)) and value:
        value = value[-1]
    return str(value)


def prediction_answers(
    logits: torch.Tensor,
    grad_norm: torch.Tensor,
    ood_score: torch.Tensor,
    *,
    method: str,
    top_k: int,
    threshold: float | None,
    labels: Mapping[str, Any] | None = None,
    per_layer: Mapping[str, torch.Tensor] | None = None,
    detector: str | None = None,
) -> list[dict[str, Any]]:
    """One answer per row of the batch."""
    probs = torch.softmax(logits.detach().float(), dim=1).cpu()
    k = min(top_k, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    scores = ood_score.detach().double().cpu().tolist()
    norms = grad_norm.detach().double().cpu().tolist()
    layers = (
        {name: v.detach().double().cpu().tolist() for name, v in per_layer.items()}
        if per_layer is not None
        else None
    )
    answers = []
    for row in range(probs.shape[0]):
        ood: dict[str, Any] = {
            "score": scores[row],
            "grad_norm": norms[row],
            "is_ood": None if threshold is None else bool(scores[row] > threshold),
            "threshold": threshold,
            "method": method,
        }
        if detector is not None:
            ood["detector"] = detector
        if layers is not None:
            ood["per_layer"] = {name: v[row] for name, v in layers.items()}
        answers.append(
            {
                "predictions": [
                    {"index": int(i), "label": label_for(labels, int(i)), "probability": float(p)}
                    for p, i in zip(top_p[row].tolist(), top_i[row].tolist())
                ],
                "ood": ood,
            }
        )
    return answers


def error_answer(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message}}
