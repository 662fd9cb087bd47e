"""Every param_filter works on TorchScript models as on eager ones: same names, same scores.

TorchScript modules (scripted or traced, saved and loaded as TorchServe loads them) have no
``get_submodule`` and are not ``nn.Linear`` instances, but keep the module tree and each
module's original class name; ``head`` is resolved from those.
"""

from __future__ import annotations

import functools
import io
import warnings

import pytest
import torch
from torchserve_harness import load_demo_model

from torchserve_gradnorm import GradNormScorer
from torchserve_gradnorm.filters import select_parameters

from models import TinyTransformer, mlp, resnet18_32

FILTERS = {
    "all": None,
    "head": "head",
    "globs": {"include": ["*.weight"], "exclude": ["re:.*0\\..*"]},
}


def saved_and_loaded(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer).eval()


def scripted(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still served
        return saved_and_loaded(torch.jit.script(model))


def traced(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return saved_and_loaded(torch.jit.trace(model, x, check_trace=False))


def demo():
    return load_demo_model(), torch.rand(3, 1, 8, 8)


def small_mlp():
    torch.manual_seed(0)
    return mlp().eval(), torch.randn(3, 6)


def resnet():
    torch.manual_seed(0)
    return resnet18_32(), torch.randn(2, 3, 32, 32)


def transformer():
    torch.manual_seed(0)
    return TinyTransformer().eval(), torch.randint(1, 20, (3, 7))


MODELS = {"demo": demo, "mlp": small_mlp, "resnet18": resnet, "transformer": transformer}
CONVERSIONS = {"scripted": scripted, "traced": traced}


@functools.cache
def eager_and_torchscript(model_name: str, conversion: str):
    model, x = MODELS[model_name]()
    return model, CONVERSIONS[conversion](model, x)


@pytest.mark.parametrize("conversion", CONVERSIONS)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("param_filter", FILTERS.values(), ids=FILTERS.keys())
def test_a_filter_selects_the_same_parameters_on_the_torchscript_model(
    model_name, conversion, param_filter
):
    model, torchscript = eager_and_torchscript(model_name, conversion)
    if param_filter == FILTERS["globs"] and model_name == "mlp":
        param_filter = {"include": ["*.weight"], "exclude": ["0.*"]}
    expected = select_parameters(model, param_filter)
    assert select_parameters(torchscript, param_filter) == expected


def test_head_is_the_last_linear_layer_of_a_torchscript_model():
    model, x = demo()
    assert select_parameters(scripted(model, x), "head") == ["head.weight", "head.bias"]


@pytest.mark.parametrize("param_filter", FILTERS.values(), ids=FILTERS.keys())
def test_a_torchscript_model_scores_like_the_eager_one_under_every_filter(param_filter):
    model, x = demo()
    model, x = model.double(), x.double()
    eager = GradNormScorer(model, param_filter=param_filter)(x)
    scorer = GradNormScorer(scripted(model, x), param_filter=param_filter)
    assert scorer.backend == "loop"
    result = scorer(x)
    torch.testing.assert_close(result.logits, eager.logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(result.grad_norm, eager.grad_norm, rtol=1e-9, atol=0)


def test_head_on_a_torchscript_model_without_linear_layers_is_refused():
    conv_only = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        select_parameters(scripted(conv_only, None), "head")
