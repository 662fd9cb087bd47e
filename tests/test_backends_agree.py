"""Property: on any small MLP or CNN the fast backend has rules for, with any batch size,
method and parameter selection, the fast, vmap and loop backends give the same per-sample
gradient norms, and the logits they return are those of a plain forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torchserve_gradnorm import GradNormScorer

RTOL = 1e-6
ATOL = 1e-12
BACKENDS = ("fast", "vmap", "loop")

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every run, so CI is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass
class Case:
    model: nn.Module
    x: torch.Tensor
    method: str
    param_filter: object  # None, "head" or a callable over parameter names
    chosen: tuple[str, ...] | None = None  # the names a callable filter keeps (for reports)

    def __repr__(self) -> str:
        kept = "all" if self.param_filter is None else self.chosen or self.param_filter
        return (
            f"Case(method={self.method!r}, params={kept!r}, x={tuple(self.x.shape)},\n"
            f"model={self.model})"
        )


def randomize_(model: nn.Module, generator: torch.Generator) -> None:
    """Random parameters and BatchNorm running statistics, away from the identity."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) - 0.5)
                m.running_var.copy_(
                    0.5 + 1.5 * torch.rand(m.running_var.shape, generator=generator)
                )


@st.composite
def scoring_options(draw, model: nn.Module, x: torch.Tensor) -> Case:
    """Random method and parameter selection for a built model; float64, eval mode."""
    model = model.double().eval()
    randomize_(model, torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    method = draw(st.sampled_from(["confounding", "kl"]))
    kind = draw(st.sampled_from(["all", "head", "subset"]))
    if kind == "all":
        return Case(model, x, method, None)
    if kind == "head":
        return Case(model, x, method, "head")
    names = [n for n, _ in model.named_parameters()]
    chosen = tuple(draw(st.lists(st.sampled_from(names), min_size=1, unique=True)))
    return Case(model, x, method, lambda name: name in chosen, chosen)


def batch(draw, *shape: int) -> torch.Tensor:
    size = draw(st.integers(1, 5))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(size, *shape, generator=generator, dtype=torch.float64)


@st.composite
def mlp_cases(draw) -> Case:
    """1-3 Linear layers, each followed by Tanh, ReLU, LayerNorm or nothing, then a head."""
    width = draw(st.integers(2, 6))
    x = batch(draw, width)
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(2, 6))
        layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
        after = draw(st.sampled_from(["tanh", "relu", "layernorm", "none"]))
        if after == "tanh":
            layers.append(nn.Tanh())
        elif after == "relu":
            layers.append(nn.ReLU())
        elif after == "layernorm":
            layers.append(nn.LayerNorm(out))
        width = out
    layers.append(nn.Linear(width, draw(st.integers(2, 5))))
    return draw(scoring_options(nn.Sequential(*layers), x))


@st.composite
def cnn_cases(draw) -> Case:
    """Conv2d (random kernel, stride, padding, groups), BatchNorm2d or GroupNorm, ReLU,
    flatten, Linear."""
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    paddings: list[int | str] = [0, 1, 2, "valid"]
    if stride == (1, 1) and all(k % 2 for k in kernel):
        paddings.append("same")  # the fast backend refuses 'same' with an even kernel
    padding = draw(st.sampled_from(paddings))
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=draw(st.booleans()))
    x = batch(draw, c_in, draw(st.integers(3, 6)), draw(st.integers(3, 6)))
    with torch.no_grad():
        positions = conv(x.float()).shape[2:].numel()
    # GroupNorm needs more than one value per group (a torch check, not the scorer's)
    group_counts = [g for g in range(1, c_out + 1) if c_out % g == 0 and c_out // g * positions > 1]
    if draw(st.booleans()) or not group_counts:
        norm: nn.Module = nn.BatchNorm2d(c_out)
    else:
        norm = nn.GroupNorm(draw(st.sampled_from(group_counts)), c_out)
    head = nn.Linear(c_out * positions, draw(st.integers(2, 4)))
    model = nn.Sequential(conv, norm, nn.ReLU(), nn.Flatten(), head)
    return draw(scoring_options(model, x))


def assert_backends_agree(case: Case) -> None:
    with torch.no_grad():
        plain = case.model(case.x)
    results = {}
    for backend in BACKENDS:
        scorer = GradNormScorer(
            case.model, method=case.method, param_filter=case.param_filter, backend=backend
        )
        results[backend] = scorer(case.x)
        assert scorer.backend == backend
        torch.testing.assert_close(
            results[backend].logits,
            plain,
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, b=backend: f"{b} logits differ from a plain forward: {m}",
        )
    for backend in ("fast", "vmap"):
        torch.testing.assert_close(
            results[backend].grad_norm,
            results["loop"].grad_norm,
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, b=backend: f"{b} grad_norm differs from loop: {m}",
        )


@SETTINGS
@given(mlp_cases())
def test_fast_vmap_and_loop_agree_on_random_mlps(case):
    assert_backends_agree(case)


@SETTINGS
@given(cnn_cases())
def test_fast_vmap_and_loop_agree_on_random_cnns(case):
    assert_backends_agree(case)
