"""Property: for any composition of the pieces the fast backend scores through rules or the
functional fallback (Linear, LayerNorm, GroupNorm, Conv1d, Embedding, MultiheadAttention,
broadcast position tables and layer scales, class tokens, layers reused in one forward,
heads tied to the embedding), any parameter selection and either method, ``auto`` stays on
fast and its per-parameter norms equal the loop backend's.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torchserve_gradnorm import GradNormScorer

RTOL = 1e-6
ATOL = 1e-12
DIM = 4
TOKENS = 3
VOCAB = 6

PIECES = ["linear", "layernorm", "groupnorm", "conv", "attention", "position", "scale", "reuse"]


class Composition(nn.Module):
    def __init__(self, pieces: list[str], embed: bool, class_token: bool, tied: bool) -> None:
        super().__init__()
        self.pieces = pieces
        self.embed = nn.Embedding(VOCAB, DIM) if embed else nn.Linear(2, DIM)
        self.layers = nn.ModuleList()
        for piece in pieces:
            if piece in ("linear", "reuse"):
                layer: nn.Module = nn.Linear(DIM, DIM)
            elif piece == "layernorm":
                layer = nn.LayerNorm(DIM)
            elif piece == "groupnorm":
                layer = nn.GroupNorm(2, DIM)
            elif piece == "conv":
                layer = nn.Conv1d(DIM, DIM, 3, padding=1, groups=2)
            elif piece == "attention":
                layer = nn.MultiheadAttention(DIM, 2, batch_first=True)
            elif piece == "position":
                layer = nn.ParameterList([nn.Parameter(torch.zeros(1, TOKENS, DIM))])
            else:
                layer = nn.ParameterList([nn.Parameter(torch.ones(DIM, 1))])
            self.layers.append(layer)
        self.cls = nn.Parameter(torch.zeros(1, 1, DIM)) if class_token else None
        self.tied = tied and embed
        self.head = None if self.tied else nn.Linear(DIM, 3)

    @staticmethod
    def apply(piece: str, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if piece == "linear":
            return torch.tanh(layer(h))
        if piece == "layernorm":
            return layer(h)
        if piece in ("groupnorm", "conv"):
            return layer(h.transpose(1, 2)).transpose(1, 2)
        if piece == "attention":
            return h + layer(h, h, h, need_weights=False)[0]
        if piece == "position":
            return h + layer[0]
        return h * layer[0].reshape(1, 1, -1)  # scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, T, D)
        first: tuple[str, nn.Module] | None = None  # the first layer, to reuse
        for piece, layer in zip(self.pieces, self.layers):
            if piece == "reuse":  # the first layer again (shared weights), or a new Linear
                h = self.apply(*(first or ("linear", layer)), h)
                continue
            first = first or (piece, layer)
            h = self.apply(piece, layer, h)
        if self.cls is not None:
            h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1)
        pooled = torch.tanh(h.mean(1))
        if self.tied:
            return nn.functional.linear(pooled, self.embed.weight)
        return self.head(pooled)


@st.composite
def compositions(draw):
    pieces = draw(st.lists(st.sampled_from(PIECES), min_size=1, max_size=4))
    embed = draw(st.booleans())
    model = Composition(pieces, embed, draw(st.booleans()), draw(st.booleans()))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    batch = draw(st.integers(1, 4))
    if embed:
        x = torch.randint(0, VOCAB, (batch, TOKENS), generator=generator)
    else:
        x = torch.randn(batch, TOKENS, 2, generator=generator, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    chosen = draw(st.one_of(st.none(), st.lists(st.sampled_from(names), min_size=1, unique=True)))
    method = draw(st.sampled_from(["confounding", "kl"]))
    return model, x, method, chosen


def assert_fast_equals_loop(model, x, method, chosen=None) -> None:
    param_filter = None if chosen is None else set(chosen).__contains__
    auto = GradNormScorer(model, method=method, param_filter=param_filter, per_layer=True)
    got = auto(x)
    assert auto.backend == "fast"
    want = GradNormScorer(
        model, method=method, param_filter=param_filter, backend="loop", per_layer=True
    )(x)
    for name in want.per_layer:
        torch.testing.assert_close(
            got.per_layer[name],
            want.per_layer[name],
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, name=name: f"{model.pieces}, {method}, {name}: {m}",
        )
    torch.testing.assert_close(got.logits, want.logits, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("method", ["confounding", "kl"])
@pytest.mark.parametrize("piece", [p for p in PIECES if p != "reuse"])
def test_fast_equals_loop_when_a_piece_is_used_twice(piece, method):
    """Each rule's per-sample gradient branch ("grad", summed over uses), not only its norm."""
    model = Composition([piece, "linear", "reuse"], embed=False, class_token=False, tied=False)
    model = model.double().eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    x = torch.randn(3, TOKENS, 2, generator=generator, dtype=torch.float64)
    assert_fast_equals_loop(model, x, method)


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(compositions())
def test_fast_equals_loop_on_random_compositions(case):
    model, x, method, chosen = case
    assert_fast_equals_loop(model, x, method, chosen)
