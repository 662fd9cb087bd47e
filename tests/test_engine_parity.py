"""The engine's scores equal pytorch-ood 0.4.0's (negated), for both methods and every backend."""

from __future__ import annotations

import warnings

import pytest
import torch
from pytorch_ood.detector import GradNorm, GradUncertainty

from torchserve_gradnorm import GradNormScorer

from models import TinyEncoder, TinyTransformer, mlp, resnet18_32

warnings.filterwarnings("ignore", category=UserWarning)

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}


def reference(model, x, method, param_filter, temperature=1.0):
    keep = None
    if param_filter is not None:
        names = GradNormScorer(model, param_filter=param_filter, backend="loop").selected
        keep = set(names).__contains__
    if method == "confounding":
        return -GradUncertainty(model, param_filter=keep).predict(x)
    return -GradNorm(model, param_filter=keep, temperature=temperature).predict(x)


def make_case(name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if name == "mlp":
        model, x = mlp(), torch.randn(7, 6)
    elif name == "resnet18":
        model, x = resnet18_32(), torch.randn(4, 3, 32, 32)
    elif name == "transformer":
        model, x = TinyTransformer(), torch.randint(0, 20, (5, 9))
    else:
        model, x = TinyEncoder(), torch.randint(0, 20, (5, 9))
    model = model.to(dtype).eval()
    return model, (x.to(dtype) if x.is_floating_point() else x)


FILTERS = {
    "all": None,
    "head": "head",
    "globs": {"include": ["*weight"], "exclude": ["re:.*(bn|norm).*"]},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ["fast", "vmap", "loop", "auto"])
@pytest.mark.parametrize("method", ["confounding", "kl"])
@pytest.mark.parametrize("filter_name", list(FILTERS))
@pytest.mark.parametrize("model_name", ["mlp", "resnet18", "transformer", "encoder"])
def test_scores_match_pytorch_ood(model_name, filter_name, method, backend, dtype):
    model, x = make_case(model_name, dtype)
    param_filter = FILTERS[filter_name]
    temperature = 2.0 if method == "kl" else 1.0
    scorer = GradNormScorer(
        model, method=method, param_filter=param_filter, backend=backend, temperature=temperature
    )
    result = scorer(x)
    expected = reference(model, x, method, param_filter, temperature)
    torch.testing.assert_close(result.grad_norm, expected, rtol=TOLERANCE[dtype], atol=0)
    torch.testing.assert_close(result.ood_score, -expected, rtol=TOLERANCE[dtype], atol=0)


def test_auto_keeps_fast_for_multihead_attention():
    model, x = make_case("transformer", torch.float64)
    scorer = GradNormScorer(model)
    result = scorer(x)
    assert scorer.backend == "fast"
    torch.testing.assert_close(result.grad_norm, reference(model, x, "confounding", None))


def test_logits_come_from_the_scoring_pass_and_equal_a_plain_forward():
    model, x = make_case("resnet18", torch.float64)
    for backend in ("fast", "vmap", "loop"):
        result = GradNormScorer(model, backend=backend)(x)
        with torch.no_grad():
            torch.testing.assert_close(result.logits, model(x))
