"""On small configurations of every architecture in the benchmark zoo (torchvision, timm,
Hugging Face), ``auto`` keeps the fast backend, and its per-parameter norms equal the loop
backend's in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from zoo_models import ZOO

from torchserve_gradnorm import GradNormScorer

pytest.importorskip("timm")
pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=UserWarning)

RTOL = 1e-6
ATOL = 1e-12


def randomized(model: nn.Module) -> nn.Module:
    """float64, eval mode, every parameter and normalization statistic random, so that
    layer scales (initialized to 1e-6) and zero-initialized tokens carry real gradients."""
    model = model.double().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.2 * torch.rand(m.running_mean.shape, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
    return model


@pytest.mark.parametrize("method", ["confounding", "kl"])
@pytest.mark.parametrize("name", list(ZOO))
def test_auto_scores_the_zoo_on_fast_exactly(name, method):
    model, x = ZOO[name]()
    model = randomized(model)
    x = x.double() if x.is_floating_point() else x
    auto = GradNormScorer(model, method=method, per_layer=True)
    got = auto(x)
    assert auto.backend == "fast"
    want = GradNormScorer(model, method=method, backend="loop", per_layer=True)(x)
    assert list(got.per_layer) == list(want.per_layer)
    for n in want.per_layer:
        torch.testing.assert_close(
            got.per_layer[n],
            want.per_layer[n],
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, n=n: f"{name}, {method}, parameter {n}: {m}",
        )
    torch.testing.assert_close(got.logits, want.logits, rtol=RTOL, atol=ATOL)
