"""The fast backend's row-wise forward (backends/rowwise.py): models made of calls that treat
each sample's rows apart are scored from their own batched forward, without vmap, exactly;
a model that mixes the samples, reads the batch size or calls anything else is scored
through the vmap recorder instead, exactly too, and its input shape is remembered."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchserve_gradnorm import BackendUnsupported, GradNormScorer

RTOL = 1e-6
ATOL = 1e-12


def _scores(model: nn.Module, x: torch.Tensor, backend: str, param_filter=None, method="kl"):
    scorer = GradNormScorer(
        model.double(), method=method, backend=backend, param_filter=param_filter, per_layer=True
    )
    return scorer, scorer(x.double())


def _fast_equals_loop(model: nn.Module, x: torch.Tensor, param_filter=None, method="kl") -> str:
    """The fast backend's per-parameter norms equal loop's; returns how fast recorded."""
    scorer, fast = _scores(model, x, "fast", param_filter, method)
    _, loop = _scores(model, x, "loop", param_filter, method)
    torch.testing.assert_close(fast.logits, loop.logits, rtol=RTOL, atol=ATOL)
    for name, norm in loop.per_layer.items():
        torch.testing.assert_close(fast.per_layer[name], norm, rtol=RTOL, atol=ATOL)
    return scorer._candidates[0].last_forward


class SmallCnn(nn.Module):
    """Every row-wise piece at once: conv, batch norm, group norm, pools, a residual sum,
    a constant broadcast, a per-channel reduction (squeeze-excite), layer norm over
    permuted channels, flatten / view / transpose, dropout in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.se = nn.Conv2d(4, 4, 1)
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.ln = nn.LayerNorm(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 2 * 2, 6)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = h + self.gn(h)
        h = h * torch.sigmoid(self.se(h.mean((2, 3), keepdim=True)))
        h = self.scale * nn.functional.max_pool2d(h, 2)
        h = self.ln(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = nn.functional.adaptive_avg_pool2d(h, 2)
        h = self.drop(h.flatten(1).view(-1, 4, 4).transpose(1, 2).reshape(-1, 16))
        return self.head(nn.functional.gelu(self.fc(h)))


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 2, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("param_filter", [None, "head"])
@pytest.mark.parametrize("method", ["confounding", "kl"])
def test_a_model_of_row_wise_calls_is_scored_from_its_batched_forward(param_filter, method):
    torch.manual_seed(0)
    assert _fast_equals_loop(SmallCnn().eval(), _images(), param_filter, method) == "rowwise"


class Mixing(nn.Module):
    """A linear model behind a step that the row-wise forward must not take on trust."""

    def __init__(self, step) -> None:
        super().__init__()
        self.step = step
        self.fc = nn.Linear(4, 3)
        self.offset = torch.ones(4)  # a plain attribute: a tensor the model does not register

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.step(self, x))


STEPS = {
    # each sample's forward centres on its own mean (zero): the batch's mean would mix them
    "a reduction over the samples": lambda m, x: x - x.mean(0, keepdim=True),
    "a reduction over everything": lambda m, x: x / x.abs().amax(),
    "the batch size read by the model": lambda m, x: x.view(x.shape[0], -1) * 2,
    "a reshape whose sizes depend on the batch size": lambda m, x: x.reshape(2, -1).reshape(-1, 4),
    "a call not known to be row-wise": lambda m, x: torch.cumsum(x, 1),
    "a tensor of unknown origin": lambda m, x: x + m.offset,
    "indexing": lambda m, x: x[:, [1, 0, 3, 2]],
}


@pytest.mark.parametrize("step", list(STEPS), ids=list(STEPS))
def test_a_step_outside_the_row_wise_calls_goes_through_vmap_and_stays_exact(step):
    torch.manual_seed(0)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    assert _fast_equals_loop(Mixing(STEPS[step]), x) == "vmap"


@pytest.mark.parametrize("then", ["returns", "goes on"])
def test_a_model_that_catches_the_stop_is_not_followed_further(then):
    def swallow(m, x):
        y = x * 2
        try:
            y = torch.cumsum(x, 1)
        except Exception:
            pass
        return y if then == "returns" else y * 3

    class Swallowing(Mixing):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return swallow(self, self.fc(x))  # the logits themselves come from the step

    torch.manual_seed(0)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    assert _fast_equals_loop(Swallowing(swallow), x) == "vmap"


def test_an_input_shape_that_stopped_once_goes_straight_to_vmap():
    calls = []

    def counted(m, x):
        calls.append(None)
        return torch.cumsum(x, 1)

    torch.manual_seed(0)
    scorer = GradNormScorer(Mixing(counted), backend="fast")
    x = torch.randn(3, 4)
    scorer(x)
    first = len(calls)  # the row-wise forward up to the stop, then the vmap one
    scorer(x)
    assert first == 2 and len(calls) == 3
    assert scorer._candidates[0].last_forward == "vmap"
    scorer(torch.randn(5, 4))  # another shape: the row-wise forward is tried again
    assert len(calls) == 5


def test_batch_statistics_are_each_samples_own():
    class BatchStats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4, track_running_stats=False)
            self.fc = nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(x).flatten(1))

    torch.manual_seed(0)
    x = torch.randn(3, 4, 3, generator=torch.Generator().manual_seed(1))
    assert _fast_equals_loop(BatchStats(), x) == "vmap"


def test_a_constant_with_one_row_per_sample_is_refused_as_each_sample_would_see_it():
    # each sample's forward broadcasts its (1, 4) row against the (2, 1) constant: two rows
    # of logits for one sample, which the batched forward hides when the batch has two
    model = Mixing(lambda m, x: x * torch.arange(2.0).view(2, 1))
    with pytest.raises(BackendUnsupported, match="logits"):
        GradNormScorer(model, backend="fast")(torch.randn(2, 4))


class Folded(SmallCnn):
    """The calls the vmap forward folds into one batched call (batch norm, group norm,
    linear on sequences, layer norm, addmm as in GPT-2's Conv1D), behind a batch-size read
    that keeps the model off the row-wise forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Linear(4, 4)
        self.conv1d_weight = nn.Parameter(torch.randn(4, 3))
        self.conv1d_bias = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        h = super().forward(x)  # (B, 3)
        tokens = self.seq(x.mean(1).reshape(batch, 16, 4))  # (B, 16, 4): linear on a sequence
        mixed = torch.addmm(self.conv1d_bias, tokens.reshape(-1, 4), self.conv1d_weight)
        return h + mixed.view(batch, 16, 3).mean(1)


@pytest.mark.parametrize("param_filter", [None, "head"])
def test_the_vmap_forward_folds_norms_and_linear_maps_exactly(param_filter):
    torch.manual_seed(0)
    assert _fast_equals_loop(Folded().eval(), _images(), param_filter) == "vmap"


def test_the_models_tensors_are_listed_once_and_again_when_one_is_replaced(monkeypatch):
    from torchserve_gradnorm.backends import fast

    listed = []
    real = fast.model_constants
    monkeypatch.setattr(fast, "model_constants", lambda m: listed.append(m) or real(m))
    torch.manual_seed(0)
    model = SmallCnn().eval().double()
    x = _images().double()
    scorer = GradNormScorer(model, method="kl", backend="fast", per_layer=True)
    scorer(x)
    scorer(x)
    assert len(listed) == 1  # not one walk of the modules per call

    # a parameter replaced by a new tensor is of unknown origin to the listed ones: listed
    # again, still row-wise, and the new value scored
    model.scale = nn.Parameter(torch.rand(4, 1, 1, dtype=torch.float64) + 2.0)
    fast_result = scorer(x)
    assert len(listed) == 2 and scorer._candidates[0].last_forward == "rowwise"
    loop = GradNormScorer(model, method="kl", backend="loop", per_layer=True)(x)
    for name, norm in loop.per_layer.items():
        torch.testing.assert_close(fast_result.per_layer[name], norm, rtol=RTOL, atol=ATOL)


def test_a_tensor_of_unknown_origin_caught_by_the_model_still_stops_it():
    class Catching(Mixing):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            try:
                x = x + self.offset  # a plain attribute: of unknown origin
            except Exception:
                pass
            return self.fc(x * 2)

    torch.manual_seed(0)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    assert _fast_equals_loop(Catching(None), x) == "vmap"
