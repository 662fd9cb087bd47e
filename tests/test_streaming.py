"""The fast backend takes each recorded call's norms as the backward pass reaches it
(backends/streaming.py), so that it never holds every layer's output gradient at once."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from torchserve_gradnorm import BackendUnsupported
from torchserve_gradnorm.backends import fast as fast_backend
from torchserve_gradnorm.backends.fast import FastBackend
from torchserve_gradnorm.losses import get_method
from torchserve_gradnorm.norms import registry


def deep_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).eval()


def backend(model: nn.Module) -> FastBackend:
    names = [n for n, _ in model.named_parameters()]
    return FastBackend(model, names, get_method("kl"), 1.0)


def test_every_call_but_the_earliest_is_scored_while_the_backward_runs(monkeypatch):
    during_backward = []
    ready = fast_backend.stream_output_grads

    def spy(loss, uses, on_ready):
        def record(use, grads):
            during_backward.append(torch._C._current_autograd_node() is not None)
            on_ready(use, grads)

        ready(loss, uses, record)

    monkeypatch.setattr(fast_backend, "stream_output_grads", spy)
    with torch.enable_grad():
        backend(deep_convnet())(torch.randn(2, 3, 5, 5))
    # calls: conv, batch_norm, conv, linear, scored from the head down; only the first
    # conv's output gradient is returned by the backward, at its end
    assert during_backward == [True, True, True, False]


def test_an_error_in_a_rule_during_the_backward_reaches_the_caller(monkeypatch):
    conv_rule = registry.RULES[torch.nn.functional.conv2d]

    def refuse(call, want, kind):
        if torch._C._current_autograd_node() is not None:  # the second conv, mid-backward
            raise BackendUnsupported("refused for the test")
        return conv_rule.compute(call, want, kind)

    monkeypatch.setitem(
        registry.RULES, torch.nn.functional.conv2d, dataclasses.replace(conv_rule, compute=refuse)
    )
    with torch.enable_grad(), pytest.raises(BackendUnsupported, match="refused for the test"):
        backend(deep_convnet())(torch.randn(2, 3, 5, 5))
