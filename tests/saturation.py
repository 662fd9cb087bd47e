"""pytorch-ood's confounding score against the exact value at saturated logits.

    python tests/saturation.py

pytorch-ood's ``GradUncertainty`` evaluates the confounding loss as
``binary_cross_entropy(softmax(z), 1)``, whose backward clamps ``p (1 - p)`` at 1e-12, so a
class whose probability saturates drops out of the gradient. With one Linear layer without
bias on the input x = 1, the logits are the weight column and the score has the closed form
-|C p - 1|^2 (p = softmax(z)): the reference, our engine and that closed form side by side,
in float64. The README's "Saturated logits" figures are this command's output.
"""

from __future__ import annotations

import warnings

import torch
from pytorch_ood.detector import GradUncertainty
from torch import nn

from torchserve_gradnorm import GradNormScorer

C = 10
CASES = {  # name -> the logits over C classes
    "(4, 2, 0, ..., 0)": [4.0, 2.0] + [0.0] * (C - 2),
    "(40, 20, 0, ..., 0)": [40.0, 20.0] + [0.0] * (C - 2),
    "(40, 0, ..., 0)": [40.0] + [0.0] * (C - 1),
    "(1e4, 0, ..., 0)": [1e4] + [0.0] * (C - 1),
}


def scores(logits: list[float]) -> dict[str, float]:
    """pytorch-ood's score, ours and the closed form for a model whose logits are ``logits``."""
    z = torch.tensor(logits, dtype=torch.float64)
    model = nn.Linear(1, len(logits), bias=False).double()
    with torch.no_grad():
        model.weight.copy_(z[:, None])
    x = torch.ones(1, 1, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = GradUncertainty(model).predict(x).item()
    ours = GradNormScorer(model, method="confounding")(x).ood_score.item()
    exact = -(len(logits) * torch.softmax(z, 0) - 1).square().sum().item()
    return {"pytorch-ood": reference, "ours": ours, "exact": exact}


def main() -> None:
    print(f"{'logits (C = 10)':22} {'pytorch-ood':>12} {'ours':>10} {'exact':>10}")
    for name, logits in CASES.items():
        s = scores(logits)
        print(f"{name:22} {s['pytorch-ood']:12.4g} {s['ours']:10.4g} {s['exact']:10.4g}")


if __name__ == "__main__":
    main()
