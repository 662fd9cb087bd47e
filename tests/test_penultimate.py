"""The penultimate activations (the input of the model's last nn.Linear), kept from the
scoring forward when asked: the same numbers as a plain forward's, on every backend and both
of the fast backend's recorders and on the zoo, without changing the norms; nothing kept, and
no hook left on the model, otherwise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from test_backends_agree import ATOL, RTOL, SETTINGS, Case, cnn_cases, mlp_cases
from test_zoo_exact import randomized
from torch import nn
from zoo_models import ZOO

from torchserve_gradnorm import GradNormScorer
from torchserve_gradnorm.filters import head_module

from models import TinyTransformer, mlp, resnet18_32

BACKENDS = ("fast", "vmap", "loop")


def plain_head_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    kept = []
    handle = head_module(model)[1].register_forward_pre_hook(lambda m, a: kept.append(a[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return kept[-1].reshape(len(x), -1)


def scorer(model: nn.Module, backend: str, recorder: str | None = None, **kwargs):
    """A scorer on ``backend``; for ``fast``, ``recorder`` forces the row-wise or vmap one."""
    s = GradNormScorer(model, backend=backend, **kwargs)
    if recorder == "vmap":

        def refuse(x):
            raise RuntimeError("this test runs the vmap recorder")

        s._candidates[0]._rowwise_forward = refuse
    return s


RUNS = [("fast", "rowwise"), ("fast", "vmap"), ("vmap", None), ("loop", None)]


def assert_kept_everywhere(model: nn.Module, x: torch.Tensor, **kwargs) -> None:
    expected = plain_head_input(model, x)
    without = GradNormScorer(model, backend="loop", **kwargs)(x)
    for backend, recorder in RUNS:
        s = scorer(model, backend, recorder, penultimate=True, **kwargs)
        result = s(x)
        if backend == "fast":
            assert s._candidates[0].last_forward == recorder
        where = f"{backend} ({recorder})" if recorder else backend
        torch.testing.assert_close(
            result.penultimate,
            expected,
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, w=where: f"{w} penultimate activations differ from a plain forward: {m}",
        )
        torch.testing.assert_close(result.grad_norm, without.grad_norm, rtol=RTOL, atol=ATOL)
        assert not head_module(model)[1]._forward_pre_hooks  # the hook went with the call


@SETTINGS
@given(mlp_cases())
def test_every_backend_keeps_the_head_input_of_random_mlps(case: Case):
    assert_kept_everywhere(case.model, case.x, method=case.method, param_filter=case.param_filter)


@SETTINGS
@given(cnn_cases())
def test_every_backend_keeps_the_head_input_of_random_cnns(case: Case):
    assert_kept_everywhere(case.model, case.x, method=case.method, param_filter=case.param_filter)


def test_a_model_outside_the_row_wise_calls_hands_over_its_head_input_through_vmap():
    torch.manual_seed(0)
    model = TinyTransformer().double().eval()
    ids = torch.randint(1, 20, (3, 7))
    expected = plain_head_input(model, ids)
    for backend in BACKENDS:
        s = GradNormScorer(model, backend=backend, penultimate=True)
        torch.testing.assert_close(s(ids).penultimate, expected, rtol=RTOL, atol=ATOL)
        if backend == "fast":
            assert s._candidates[0].last_forward == "vmap"


def test_the_head_input_is_flattened_per_sample_and_kept_across_micro_batches():
    torch.manual_seed(0)
    model = resnet18_32().double()
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    result = GradNormScorer(model, param_filter="head", micro_batch_size=2, penultimate=True)(x)
    assert result.penultimate.shape == (5, 512)
    torch.testing.assert_close(result.penultimate, plain_head_input(model, x), rtol=RTOL, atol=ATOL)


def test_nothing_is_kept_unless_asked():
    model = mlp().double().eval()
    s = GradNormScorer(model)
    assert s(torch.randn(3, 6, dtype=torch.float64)).penultimate is None
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_torchscript_model_cannot_hand_over_its_head_input():
    scripted = torch.jit.script(mlp().eval())
    with pytest.raises(ValueError, match="penultimate activations: a TorchScript model"):
        GradNormScorer(scripted, penultimate=True)


def test_a_model_without_a_linear_layer_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten())
    with pytest.raises(ValueError, match="penultimate activations: the model has no nn.Linear"):
        GradNormScorer(model, penultimate=True)


@pytest.mark.parametrize("name", list(ZOO))
def test_the_zoo_hands_over_its_head_input_on_fast(name):
    model, x = ZOO[name]()
    model = randomized(model)
    x = x.double() if x.is_floating_point() else x
    s = GradNormScorer(model, penultimate=True)
    result = s(x)
    assert s.backend == "fast"
    torch.testing.assert_close(
        result.penultimate, plain_head_input(model, x), rtol=RTOL, atol=ATOL, msg=name
    )
