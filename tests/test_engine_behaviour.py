"""How the scorer behaves around the numbers: errors, side effects, modes, devices, memory."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from torchserve_gradnorm import GradNormScorer
from torchserve_gradnorm.backends import BatchDependent
from torchserve_gradnorm.losses import confounding_loss, uniform_kl_loss
from torchserve_gradnorm.scorer import BATCH_DEPENDENT_LIMIT

from models import TinyTransformer, mlp


def small_model():
    torch.manual_seed(0)
    return mlp().double()


def batch(n=5):
    return torch.randn(n, 6, dtype=torch.float64)


class TestErrors:
    def test_unknown_method_is_refused_with_the_choices(self):
        with pytest.raises(ValueError, match="unknown method 'grad'.*confounding, kl"):
            GradNormScorer(small_model(), method="grad")

    def test_unknown_backend_is_refused_with_the_choices(self):
        with pytest.raises(ValueError, match="unknown backend 'cuda'.*auto, fast, vmap, loop"):
            GradNormScorer(small_model(), backend="cuda")

    def test_unknown_direction_is_refused(self):
        with pytest.raises(ValueError, match="unknown direction"):
            GradNormScorer(small_model(), direction="up")

    @pytest.mark.parametrize("value", [0, -3, 2.5, True])
    def test_micro_batch_size_must_be_a_positive_integer(self, value):
        with pytest.raises(ValueError, match="micro_batch_size"):
            GradNormScorer(small_model(), micro_batch_size=value)

    @pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan")])
    def test_temperature_must_be_positive_and_finite(self, value):
        with pytest.raises(ValueError, match="temperature"):
            GradNormScorer(small_model(), method="kl", temperature=value)

    def test_filter_that_selects_nothing_lists_available_names(self):
        with pytest.raises(ValueError, match=r"selects no parameter.*0\.weight, 0\.bias"):
            GradNormScorer(small_model(), param_filter={"include": ["nothing*"]})

    def test_filter_mapping_with_unknown_key_is_refused(self):
        with pytest.raises(ValueError, match="unknown key"):
            GradNormScorer(small_model(), param_filter={"includes": ["*"]})

    def test_empty_batch_is_refused(self):
        with pytest.raises(ValueError, match="non-empty batch"):
            GradNormScorer(small_model())(torch.zeros(0, 6, dtype=torch.float64))


class TestParameterFilter:
    def test_head_selects_the_last_linear_layer(self):
        assert GradNormScorer(small_model(), param_filter="head").selected == ["4.weight", "4.bias"]

    def test_include_and_exclude_globs_and_regular_expressions(self):
        scorer = GradNormScorer(
            small_model(),
            param_filter={"include": ["*.weight", "4.*"], "exclude": ["re:[02]\\..*"]},
        )
        assert scorer.selected == ["4.weight", "4.bias"]

    def test_callable_filter_as_in_pytorch_ood(self):
        scorer = GradNormScorer(small_model(), param_filter=lambda name: name.endswith("bias"))
        assert scorer.selected == ["0.bias", "2.bias", "4.bias"]

    def test_frozen_parameters_are_scored_too(self):
        model = small_model()
        expected = GradNormScorer(model, backend="loop")(x := batch()).grad_norm
        for p in model.parameters():
            p.requires_grad_(False)
        for backend in ("fast", "vmap", "loop"):
            torch.testing.assert_close(
                GradNormScorer(model, backend=backend)(x).grad_norm, expected
            )


class TestNoSideEffects:
    @pytest.mark.parametrize("backend", ["fast", "vmap", "loop"])
    def test_model_state_is_left_as_it_was(self, backend):
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
        model.double().train()
        model[0].weight.requires_grad_(False)
        model[2].eval()  # a submodule whose mode differs from its parent's
        before = {k: v.clone() for k, v in model.state_dict().items()}
        GradNormScorer(model, backend=backend)(batch())
        assert all(p.grad is None for p in model.parameters())
        assert [p.requires_grad for p in model.parameters()] == [
            False,
            True,
            True,
            True,
            True,
            True,
        ]
        assert model.training and model[1].training and not model[2].training
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k  # BatchNorm running stats untouched

    def test_training_mode_model_is_scored_as_in_eval_mode(self):
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
        model.double()
        x = batch()
        model.eval()
        expected = GradNormScorer(model)(x).grad_norm
        model.train()
        torch.testing.assert_close(GradNormScorer(model)(x).grad_norm, expected)


class TestGradModes:
    @pytest.mark.parametrize("backend", ["fast", "vmap", "loop"])
    def test_scores_inside_inference_mode_equal_scores_outside(self, backend):
        model, x = small_model(), batch()
        expected = GradNormScorer(model, backend=backend)(x).grad_norm
        with torch.inference_mode():
            inference_x = x.clone()  # an inference tensor, as TorchServe's preprocess makes
            got = GradNormScorer(model, backend=backend)(inference_x).grad_norm
        torch.testing.assert_close(got, expected)

    def test_scores_inside_no_grad_equal_scores_outside(self):
        model, x = small_model(), batch()
        expected = GradNormScorer(model)(x).grad_norm
        with torch.no_grad():
            torch.testing.assert_close(GradNormScorer(model)(x).grad_norm, expected)


class TestOrientationAndOutputs:
    def test_default_ood_score_is_the_negated_norm(self):
        result = GradNormScorer(small_model())(batch())
        torch.testing.assert_close(result.ood_score, -result.grad_norm)

    def test_high_norm_is_ood_keeps_the_norm_as_score(self):
        result = GradNormScorer(small_model(), direction="high_norm_is_ood")(batch())
        torch.testing.assert_close(result.ood_score, result.grad_norm)

    @pytest.mark.parametrize("method", ["confounding", "kl"])
    def test_a_uniform_prediction_has_zero_norm_and_the_highest_ood_score(self, method):
        x = batch()
        peaked = GradNormScorer(small_model(), method=method)(x)
        model = small_model()
        with torch.no_grad():
            model[4].weight.zero_()
            model[4].bias.zero_()
        uniform = GradNormScorer(model, method=method)(x)  # every parameter, not just the head
        assert torch.all(uniform.grad_norm == 0) and torch.all(uniform.ood_score == 0)
        # a norm is >= 0, so 0 is the largest score there is; any peaked prediction is below
        assert torch.all(peaked.grad_norm > 0)
        assert torch.all(peaked.ood_score < uniform.ood_score)

    def test_per_layer_entries_sum_to_the_grad_norm(self):
        model = small_model()
        result = GradNormScorer(model, per_layer=True)(batch())
        assert list(result.per_layer) == [n for n, _ in model.named_parameters()]
        torch.testing.assert_close(sum(result.per_layer.values()), result.grad_norm)

    def test_per_layer_is_none_unless_asked(self):
        assert GradNormScorer(small_model())(batch()).per_layer is None


class TestNumerics:
    @pytest.mark.parametrize("backend", ["fast", "vmap", "loop"])
    @pytest.mark.parametrize("method", ["confounding", "kl"])
    def test_saturated_logits_score_the_closed_form(self, backend, method):
        # logits ~1e4 in float32: the softmax is one-hot to the last bit. One Linear layer W x
        # + b: the per-sample gradient is g x^T and g, with g = dL/dz, so the confounding norm
        # is |g|_2^2 (|x|_2^2 + 1) and the kl norm |g|_1 (|x|_1 + 1).
        torch.manual_seed(0)
        model = nn.Linear(4, 10)
        with torch.no_grad():
            model.weight.mul_(1e4)
        x = torch.randn(6, 4)
        z = model(x).detach().double()
        p = torch.softmax(z, dim=1)
        if method == "confounding":
            closed_form = (10 * p - 1).square().sum(1) * (x.double().square().sum(1) + 1)
        else:
            closed_form = (p - 0.1).abs().sum(1) * (x.double().abs().sum(1) + 1)
        assert torch.all(p.max(1).values == 1.0)  # saturated indeed
        result = GradNormScorer(model, method=method, backend=backend)(x)
        torch.testing.assert_close(result.grad_norm.double(), closed_form, rtol=1e-5, atol=0)

    def test_saturated_confounding_score_equals_the_closed_form(self):
        # one Linear layer on x: grad wrt W is (C p - 1) x^T, so |.|^2 = |C p - 1|^2 |x|^2
        model = nn.Linear(4, 10, bias=False).double()
        with torch.no_grad():
            model.weight.mul_(1e4)
        x = torch.randn(6, 4, dtype=torch.float64)
        p = torch.softmax(model(x), dim=1).detach()
        closed_form = (10 * p - 1).square().sum(1) * x.square().sum(1)
        torch.testing.assert_close(GradNormScorer(model)(x).grad_norm, closed_form)

    def test_losses_have_the_documented_logit_gradients(self):
        z = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
        p = torch.softmax(z, 1)
        (g,) = torch.autograd.grad(confounding_loss(z).sum(), z)
        torch.testing.assert_close(g, 7 * p - 1)
        (g,) = torch.autograd.grad(uniform_kl_loss(z, 2.0).sum(), z)
        torch.testing.assert_close(g, (torch.softmax(z / 2.0, 1) - 1 / 7) / 2.0)


class TestBackendsChoice:
    def test_auto_uses_fast_when_every_layer_has_a_rule(self):
        assert GradNormScorer(small_model()).backend == "fast"

    def test_torchscript_models_are_scored_by_loop(self):
        model, x = small_model(), batch()
        expected = GradNormScorer(model, backend="loop")(x).grad_norm
        scripted = torch.jit.script(model)
        scorer = GradNormScorer(scripted)
        assert scorer.backend == "loop"
        torch.testing.assert_close(scorer(x).grad_norm, expected)
        with pytest.raises(ValueError, match="TorchScript"):
            GradNormScorer(scripted, backend="vmap")

    def test_a_model_whose_samples_always_branch_apart_moves_auto_to_loop_for_good(self, caplog):
        class DataDependent(nn.Module):  # .item() cannot be traced by vmap
            def __init__(self):
                super().__init__()
                self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
                self.head = nn.Linear(6, 3)

            def forward(self, x):
                h, _ = self.attn(x, x, x)
                scale = float(h.abs().max().item()) + 1.0
                return self.head(h.mean(1)) / scale

        model = DataDependent().double()
        x = torch.randn(4, 5, 6, dtype=torch.float64)
        scorer = GradNormScorer(model)
        assert scorer.backend == "fast"
        expected = GradNormScorer(model, backend="loop")(x).grad_norm
        with caplog.at_level(logging.WARNING, logger="torchserve_gradnorm"):
            for _ in range(BATCH_DEPENDENT_LIMIT - 1):
                torch.testing.assert_close(scorer(x).grad_norm, expected)
                assert scorer.backend == "fast"  # another batch may not branch apart
            torch.testing.assert_close(scorer(x).grad_norm, expected)
            torch.testing.assert_close(scorer(x).grad_norm, expected)
        assert scorer.backend == "loop"
        assert sum("using loop from now on" in r.message for r in caplog.records) == 1
        assert any("differs between samples" in r.message for r in caplog.records)

    def test_a_batch_that_branches_apart_is_scored_by_loop_and_the_next_by_fast(self):
        class SkipsAllOnes(nn.Module):  # like transformers' mask.all() shortcut
            def __init__(self):
                super().__init__()
                self.head = nn.Linear(4, 3)

            def forward(self, x, mask):
                h = x if mask.all() else x * mask
                return self.head(h)

        model = SkipsAllOnes().double()
        x = torch.randn(3, 4, dtype=torch.float64)
        apart = {"x": x, "mask": torch.tensor([[1.0] * 4, [1.0, 1, 1, 0], [1.0] * 4]).double()}
        together = {"x": x, "mask": torch.tensor([[1.0, 1, 0, 0]] * 3).double()}
        scorer = GradNormScorer(model)
        for inputs in (apart, together, apart, together):
            loop = GradNormScorer(model, backend="loop")(inputs).grad_norm
            torch.testing.assert_close(scorer(inputs).grad_norm, loop)
            assert scorer.backend == "fast"
        only_fast = GradNormScorer(model, backend="fast")
        only_fast(together)
        with pytest.raises(BatchDependent, match="differs between samples"):
            only_fast(apart)

    def test_a_bad_input_does_not_demote_the_backend(self):
        scorer = GradNormScorer(small_model())
        with pytest.raises(RuntimeError):
            scorer(torch.randn(3, 5, dtype=torch.float64))  # wrong feature size
        assert scorer.backend == "fast"


class TestMemory:
    def test_micro_batches_give_the_same_scores_as_one_batch(self):
        model = TinyTransformer().double()
        x = torch.randint(0, 20, (7, 6))
        whole = GradNormScorer(model, backend="vmap")(x)
        chunked = GradNormScorer(model, backend="vmap", micro_batch_size=3)(x)
        torch.testing.assert_close(chunked.grad_norm, whole.grad_norm)
        torch.testing.assert_close(chunked.logits, whole.logits)

    def test_out_of_memory_halves_the_chunk_and_retries(self, monkeypatch, caplog):
        model, x = small_model(), batch(8)
        expected = GradNormScorer(model)(x).grad_norm
        scorer = GradNormScorer(model)
        backend = scorer._candidates[0]
        real_call = type(backend).__call__
        seen = []

        def call_with_small_memory(self, chunk):
            seen.append(len(chunk))
            if len(chunk) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_call(self, chunk)

        monkeypatch.setattr(type(backend), "__call__", call_with_small_memory)
        with caplog.at_level(logging.WARNING, logger="torchserve_gradnorm"):
            got = scorer(x).grad_norm
        torch.testing.assert_close(got, expected)
        assert seen[:3] == [8, 4, 2] and scorer.micro_batch_size == 2
        assert scorer.backend == "fast"  # an OOM is not a reason to change backend


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_on_cuda_equal_scores_on_cpu():
    model, x = small_model(), batch()
    expected = GradNormScorer(model)(x).grad_norm
    cuda_model = small_model().cuda()
    for backend in ("fast", "vmap", "loop"):
        got = GradNormScorer(cuda_model, backend=backend)(x)
        assert got.grad_norm.device.type == "cuda"
        torch.testing.assert_close(got.grad_norm.cpu(), expected)
