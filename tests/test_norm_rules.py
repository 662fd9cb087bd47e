"""Each norm rule of the fast backend gives the loop backend's per-sample norms, parameter by
parameter, and the fast backend refuses the layers and graphs its rules cannot score exactly.

Every case scores a tiny float64 classifier (the layer under test, tanh, flatten, a Linear
head) with ``per_layer=True`` under both methods, with random weights, biases and BatchNorm
running statistics, so that no norm is trivially zero or one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchserve_gradnorm import BackendUnsupported, GradNormScorer
from torchserve_gradnorm.backends import BatchDependent
from torchserve_gradnorm.norms import conv as conv_rule
from torchserve_gradnorm.norms import linear as linear_rule

METHODS = ("confounding", "kl")
BATCH = 3
CLASSES = 3
RTOL = 1e-7
ATOL = 1e-12  # only matters where an entry is exactly zero (e.g. a sample of padding tokens)


# --- models --------------------------------------------------------------------------------


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and BatchNorm running statistics, all away from the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) - 0.5)
                m.running_var.copy_(
                    0.5 + 1.5 * torch.rand(m.running_var.shape, generator=generator)
                )
    return model


class Classifier(nn.Module):
    """``body`` (the layer under test), then tanh, flatten and a Linear head."""

    def __init__(self, body: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        self.body = body
        with torch.no_grad():
            features = body(example).flatten(1).shape[1]
        self.head = nn.Linear(features, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x).flatten(1)))


def inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *shape, generator=generator, dtype=torch.float64)


def classifier(body: nn.Module, x: torch.Tensor) -> nn.Module:
    body = randomize_(body.double().eval())
    return randomize_(Classifier(body, x).double().eval())


def assert_fast_matches_loop(model: nn.Module, x: torch.Tensor, method: str) -> None:
    fast = GradNormScorer(model, method=method, backend="fast", per_layer=True)
    loop = GradNormScorer(model, method=method, backend="loop", per_layer=True)
    got, want = fast(x), loop(x)
    assert fast.backend == "fast"
    names = [n for n, _ in model.named_parameters()]
    assert list(got.per_layer) == list(want.per_layer) == names
    for name in names:
        # The case must exercise the rule: the layer under test has a non-zero gradient.
        assert want.per_layer[name].abs().sum() > 0, f"{name} has no gradient in this case"
        torch.testing.assert_close(
            got.per_layer[name],
            want.per_layer[name],
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, name=name: f"{method}, parameter {name}: {m}",
        )
    torch.testing.assert_close(got.grad_norm, want.grad_norm, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got.logits, want.logits, rtol=RTOL, atol=ATOL)


def case(body: nn.Module, *shape: int, id: str):
    return pytest.param(body, shape, id=id)


# --- Linear --------------------------------------------------------------------------------

# The squared-L2 weight norm of a Linear on (B, T, d_in) inputs (T > 1) takes the "ghost norm"
# branch when 2 T^2 <= d_in * d_out and builds each sample's G^T A otherwise (linear.py);
# the L1 norm always builds it. d_in * d_out = 24 for Linear(4, 6) and 48 for Linear(6, 8).
LINEAR_CASES = [
    pytest.param(nn.Linear(5, 4), (5,), "outer", id="2d-input"),
    pytest.param(nn.Linear(5, 4, bias=False), (5,), "outer", id="2d-input-no-bias"),
    pytest.param(nn.Linear(4, 6), (2, 4), "ghost", id="3d-input-ghost-T2"),
    pytest.param(nn.Linear(4, 6), (5, 4), "build", id="3d-input-build-T5"),
    pytest.param(nn.Linear(4, 6, bias=False), (3, 4), "ghost", id="3d-input-ghost-T3-no-bias"),
    pytest.param(nn.Linear(6, 8), (2, 2, 6), "ghost", id="4d-input-ghost-T4"),
    pytest.param(nn.Linear(6, 8), (3, 4, 6), "build", id="4d-input-build-T12"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("layer", "shape", "branch"), LINEAR_CASES)
def test_linear_rule_matches_loop(layer, shape, branch, method):
    x = inputs(*shape)
    assert_fast_matches_loop(classifier(layer, x), x, method)


@pytest.fixture
def linear_weight_products(monkeypatch):
    """Records how linear.py got each weight norm: the shapes of outer products it took and
    of per-sample weight gradients it built."""
    seen: dict[str, list[tuple[int, ...]]] = {"outer": [], "built": []}
    outer, built = linear_rule.outer_product_norm, linear_rule.built_product_norm

    def spy_outer(g, a, kind):
        seen["outer"].append((g.shape[1], a.shape[1]))
        return outer(g, a, kind)

    def spy_built(g, a, kind):
        seen["built"].append((g.shape[2], a.shape[2]))
        return built(g, a, kind)

    monkeypatch.setattr(linear_rule, "outer_product_norm", spy_outer)
    monkeypatch.setattr(linear_rule, "built_product_norm", spy_built)
    return seen


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("layer", "shape", "branch"), LINEAR_CASES)
def test_linear_cases_take_the_branch_they_are_named_for(
    layer, shape, branch, method, linear_weight_products
):
    x = inputs(*shape)
    model = classifier(layer, x)
    GradNormScorer(model, method=method, backend="fast")(x)
    d_out, d_in = layer.weight.shape
    if branch == "outer":
        assert (d_out, d_in) in linear_weight_products["outer"]
        return
    assert (d_out, d_in) not in linear_weight_products["outer"]
    positions = x[0].numel() // d_in
    if method == "kl":  # L1: no shortcut, always built
        assert (d_out, d_in) in linear_weight_products["built"]
    elif branch == "ghost":
        assert 2 * positions**2 <= d_in * d_out
        assert (d_out, d_in) not in linear_weight_products["built"]
    else:
        assert 2 * positions**2 > d_in * d_out
        assert (d_out, d_in) in linear_weight_products["built"]


@pytest.mark.parametrize("kind", ("sq_l2", "l1"))
@pytest.mark.parametrize(("d_out", "d_in"), [(7, 4), (4, 7)])
@pytest.mark.parametrize(
    "block",
    [
        pytest.param(4, id="row-blocks-of-one"),
        pytest.param(12, id="row-blocks-of-three-and-a-remainder"),
        pytest.param(56, id="two-samples-a-block-and-a-remainder"),
        pytest.param(1 << 20, id="one-block"),
    ],
)
def test_built_weight_norms_are_the_same_whatever_the_block(block, d_out, d_in, kind, monkeypatch):
    """Per-sample G^T A (7 x 4 or 4 x 7, cut along its longer side) is built a buffer-sized
    block at a time; the blocks (rows of one sample, or several samples) cover each sample's
    product once."""
    generator = torch.Generator().manual_seed(0)
    g = torch.randn(5, 7, d_out, generator=generator, dtype=torch.float64)
    a = torch.randn(5, d_in, 7, generator=generator, dtype=torch.float64).transpose(1, 2)
    whole = torch.bmm(g.transpose(1, 2), a).flatten(1)
    want = whole.square().sum(1) if kind == "sq_l2" else whole.abs().sum(1)
    monkeypatch.setattr(linear_rule, "BLOCK", block)
    torch.testing.assert_close(linear_rule.built_product_norm(g, a, kind), want, rtol=1e-12, atol=0)


# --- convolutions --------------------------------------------------------------------------

CONV_CASES = [
    case(nn.Conv1d(2, 4, 3, stride=2, padding=1), 2, 9, id="1d-stride-pad"),
    case(nn.Conv1d(2, 3, 3, stride=2), 2, 8, id="1d-stride-leaves-last-column-unused"),
    case(nn.Conv1d(3, 2, 4, padding="valid", bias=False), 3, 8, id="1d-valid-no-bias"),
    case(
        nn.Conv1d(4, 6, 3, padding="same", dilation=2, groups=2, padding_mode="circular"),
        4,
        7,
        id="1d-same-dilation-groups-circular",
    ),
    case(nn.Conv1d(2, 3, 3, stride=2, padding=2, padding_mode="reflect"), 2, 8, id="1d-reflect"),
    case(
        nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2),
        4,
        7,
        5,
        id="2d-tuple-kernel-stride-pad-groups",
    ),
    case(nn.Conv2d(3, 4, 3, padding="same"), 3, 5, 6, id="2d-same-odd-kernel"),
    case(
        nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(2, 1)),
        2,
        6,
        5,
        id="2d-same-even-kernel-made-odd-by-dilation",
    ),
    case(nn.Conv2d(2, 4, 3, stride=2, dilation=2, bias=False), 2, 9, 8, id="2d-dilation-no-bias"),
    case(
        nn.Conv2d(3, 3, 3, padding=1, groups=3, padding_mode="reflect"),
        3,
        5,
        5,
        id="2d-depthwise-reflect",
    ),
    case(
        nn.Conv2d(2, 2, 3, padding="same", dilation=2, padding_mode="reflect"),
        2,
        6,
        6,
        id="2d-same-dilation-reflect",
    ),
    case(
        nn.Conv2d(2, 4, 3, stride=(1, 2), padding=(2, 1), padding_mode="circular"),
        2,
        5,
        6,
        id="2d-circular-stride",
    ),
    case(
        nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)),
        2,
        4,
        5,
        6,
        id="3d-stride-pad-dilation",
    ),
    case(
        nn.Conv3d(4, 2, 2, groups=2, padding="valid", bias=False),
        4,
        3,
        3,
        3,
        id="3d-valid-groups-no-bias",
    ),
    case(
        nn.Conv3d(2, 2, 3, padding="same", padding_mode="circular"), 2, 3, 4, 3, id="3d-same-circ"
    ),
    case(
        nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1), groups=1, padding_mode="reflect"),
        2,
        2,
        4,
        4,
        id="3d-reflect",
    ),
    # one output position per sample: the weight gradient is an outer product (rank one)
    case(nn.Conv2d(4, 6, 3), 4, 3, 3, id="2d-single-position"),
    case(nn.Conv2d(4, 6, 3, groups=2, padding=1, stride=3), 4, 2, 2, id="2d-single-pos-groups"),
    case(nn.Conv1d(3, 5, 4, padding_mode="reflect", padding=1), 3, 2, id="1d-single-pos-reflect"),
    # weights large enough that per-sample gradients are built from unfolded patches
    case(nn.Conv2d(128, 128, 3, padding=1, groups=2), 128, 3, 3, id="2d-large-unfold-groups"),
    case(nn.Conv1d(256, 256, 1, stride=2), 256, 4, id="1d-large-unfold"),
    # 1x1 kernels: the patches are the (strided) input itself, no im2col
    case(nn.Conv2d(8, 6, 1), 8, 3, 4, id="2d-1x1"),
    case(nn.Conv2d(8, 6, 1, stride=2, bias=False), 8, 5, 4, id="2d-1x1-stride-2"),
    case(nn.Conv2d(8, 6, 1, stride=(2, 1), groups=2), 8, 5, 4, id="2d-1x1-strides-groups"),
    # many output positions (grouped-convolution build) and depthwise kernels
    case(nn.Conv2d(2, 3, 3, padding=1), 2, 17, 16, id="2d-many-positions"),
    case(nn.Conv2d(8, 8, 5, padding=2, groups=8), 8, 6, 6, id="2d-depthwise"),
    # depthwise (one input channel a group): one forward convolution with the output
    # gradient as the kernel, stride and dilation swapped, cropped to the kernel
    case(nn.Conv2d(4, 4, 7, padding=3, groups=4), 4, 24, 24, id="2d-depthwise-7x7"),
    case(
        nn.Conv2d(3, 3, (3, 5), padding=(0, 1), groups=3, bias=False),
        3,
        25,
        26,
        id="2d-depthwise-uneven",
    ),
    case(nn.Conv2d(4, 4, 5, stride=2, padding=2, groups=4), 4, 9, 10, id="2d-depthwise-stride"),
    case(
        nn.Conv2d(3, 6, 3, stride=(2, 1), dilation=(1, 2), padding=2, groups=3),
        3,
        8,
        9,
        id="2d-depthwise-multiplier-stride-dilation",
    ),
    case(nn.Conv2d(1, 5, 3), 1, 6, 7, id="2d-one-input-channel"),
    case(nn.Conv1d(4, 4, 5, stride=2, padding=2, groups=4), 4, 11, id="1d-depthwise-stride"),
    case(
        nn.Conv3d(2, 4, 3, stride=(1, 2, 1), dilation=(2, 1, 1), padding=1, groups=2),
        2,
        6,
        5,
        4,
        id="3d-depthwise-multiplier",
    ),
]


class Rows(nn.Module):
    """A conv over a sample's several rows (B, 2, C, H, W) -> one norm a sample."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.flatten(0, 1)).unflatten(0, (len(x), -1))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("layer", "shape"), CONV_CASES)
def test_conv_rule_matches_loop(layer, shape, method):
    """Each case runs the branch its shape selects (rank one, ghost or build; see conv.py)."""
    x = inputs(*shape)
    assert_fast_matches_loop(classifier(layer, x), x, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        case(nn.Conv2d(64, 4, 3, padding=1), 64, 3, 3, id="unfold"),
        case(nn.Conv2d(3, 4, 3, padding=1), 3, 5, 5, id="grouped-conv"),
        case(nn.Conv1d(4, 6, 1, stride=2), 4, 7, id="1x1"),
    ],
)
@pytest.mark.parametrize("rows", [1, 2])
def test_conv_rule_builds_in_chunks_of_samples_and_sums_a_samples_rows(
    layer, shape, method, rows, monkeypatch
):
    """With room for one sample's gradient at a time, every chunk reuses one buffer; with
    two rows a sample, both rows' gradients add up before the norm."""
    monkeypatch.setattr(conv_rule, "BUILD_NUMBERS", 1)
    x = inputs(*((rows, *shape) if rows > 1 else shape))
    body = Rows(layer) if rows > 1 else layer
    assert_fast_matches_loop(classifier(body, x), x, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "tile",
    [
        pytest.param(1, id="row-blocks-of-one"),
        pytest.param(130, id="row-blocks-and-a-remainder"),
        pytest.param(2000, id="two-group-products-a-block"),
    ],
)
@pytest.mark.parametrize("rows", [1, 2])
def test_unfolded_build_covers_every_group_and_row_once_whatever_the_tile(
    tile, method, rows, monkeypatch
):
    """A group's product (288 x 3 here) is built a ``TILE_NUMBERS`` block at a time; the
    blocks, the groups and a sample's rows add up to the sample's norm."""
    monkeypatch.setattr(conv_rule, "TILE_NUMBERS", tile)
    x = inputs(*((rows, 64, 3, 3) if rows > 1 else (64, 3, 3)))
    layer = nn.Conv2d(64, 6, 3, padding=1, groups=2)
    body = Rows(layer) if rows > 1 else layer
    assert_fast_matches_loop(classifier(body, x), x, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "tile", [pytest.param(1, id="a-sample-a-block"), pytest.param(1 << 18, id="whole-batch")]
)
@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        case(nn.Conv2d(3, 4, 3, padding=1), 3, 8, 9, id="3x3-pad"),
        case(nn.Conv2d(2, 3, (3, 2), dilation=(2, 1), padding=(1, 0)), 2, 9, 12, id="dilation"),
        case(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), 3, 8, 10, id="reflect"),
        case(nn.Conv2d(2, 3, 5, padding=2, bias=False), 2, 11, 16, id="5x5"),
    ],
)
def test_stride_one_kernels_are_built_offset_by_offset_from_the_padded_input(
    layer, shape, tile, method, monkeypatch
):
    """The input's windows run on past each row's end into the next row (and the last one
    into an extra padded row), where the output gradient's padded zero columns meet them."""
    calls = []
    real = conv_rule.shifted_norm
    monkeypatch.setattr(conv_rule, "shifted_norm", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(conv_rule, "TILE_NUMBERS", tile)
    x = inputs(*shape)
    assert_fast_matches_loop(classifier(layer, x), x, method)
    assert calls, "the layer should take the offset-by-offset build"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_depthwise_kernels_are_built_as_one_forward_convolution(method, layout, monkeypatch):
    """Whichever layout the activations come in (oneDNN hands ConvNeXt's on channels-last)."""
    calls = []
    real = conv_rule.depthwise_weight_grad
    monkeypatch.setattr(conv_rule, "depthwise_weight_grad", lambda *a: calls.append(1) or real(*a))
    x = inputs(4, 24, 24).contiguous(memory_format=layout)
    assert_fast_matches_loop(classifier(nn.Conv2d(4, 4, 7, padding=3, groups=4), x), x, method)
    assert calls, "the depthwise layer should take the forward-convolution build"


# --- normalization layers ------------------------------------------------------------------

NORM_CASES = [
    case(nn.BatchNorm1d(4), 4, id="batchnorm1d-(B,C)"),
    case(nn.BatchNorm1d(4), 4, 5, id="batchnorm1d-(B,C,L)"),
    case(nn.BatchNorm2d(3, eps=1e-3), 3, 4, 5, id="batchnorm2d"),
    case(nn.BatchNorm3d(2), 2, 3, 4, 3, id="batchnorm3d"),
    case(nn.LayerNorm(5), 5, id="layernorm-1-dim-(B,D)"),
    case(nn.LayerNorm(5), 3, 5, id="layernorm-1-dim-over-positions"),
    case(nn.LayerNorm((3, 5)), 3, 5, id="layernorm-2-dims-(B,H,W)"),
    case(nn.LayerNorm((3, 5)), 2, 3, 5, id="layernorm-2-dims-over-positions"),
    case(nn.LayerNorm(5, bias=False), 4, 5, id="layernorm-no-bias"),
    case(nn.LayerNorm((2, 3), elementwise_affine=True, eps=1e-2), 4, 2, 3, id="layernorm-eps"),
    case(nn.GroupNorm(2, 4), 4, 3, 3, id="groupnorm-2d"),
    case(nn.GroupNorm(3, 6), 6, 5, id="groupnorm-1d"),
    case(nn.GroupNorm(1, 3), 3, id="groupnorm-(B,C)"),
    case(nn.GroupNorm(4, 4), 4, 2, 2, 2, id="groupnorm-3d-one-channel-per-group"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("layer", "shape"), NORM_CASES)
def test_normalization_rule_matches_loop(layer, shape, method):
    x = inputs(*shape)
    assert_fast_matches_loop(classifier(layer, x), x, method)


# --- Embedding -----------------------------------------------------------------------------

TOKENS3 = torch.tensor([[1, 2, 2], [3, 4, 5], [0, 0, 1]])
REPEATS = torch.tensor([[1, 2, 1, 3, 1], [4, 4, 4, 4, 4], [5, 6, 7, 0, 2]])
PADDED = torch.tensor([[0, 1, 0, 1, 2], [0, 0, 0, 0, 0], [3, 0, 3, 4, 5]])

EMBEDDING_CASES = [
    pytest.param(nn.Embedding(8, 3), REPEATS, id="repeated-tokens"),
    pytest.param(nn.Embedding(8, 3), REPEATS.reshape(3, 1, 5).repeat(1, 2, 1), id="2d-ids"),
    pytest.param(nn.Embedding(8, 3, padding_idx=0), PADDED, id="padding-idx-0"),
    pytest.param(nn.Embedding(8, 3, padding_idx=-7), REPEATS, id="negative-padding-idx"),
    pytest.param(nn.Embedding(8, 3), REPEATS[:, 0], id="one-token-per-sample"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("layer", "ids"), EMBEDDING_CASES)
def test_embedding_rule_matches_loop(layer, ids, method):
    model = classifier(layer, ids)
    if isinstance(layer.padding_idx, int):
        # a padding row that is not zero must still get no gradient
        assert model.body.weight[layer.padding_idx].abs().sum() > 0
    assert_fast_matches_loop(model, ids, method)


# --- what the per-operation recording scores that per-module hooks could not ----------------


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward is not nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class SharedLayer(nn.Module):
    """One Linear applied ``passes`` times (twice by default) in the same forward."""

    def __init__(self, passes: int = 2) -> None:
        super().__init__()
        self.passes = passes
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.passes):
            x = torch.tanh(self.shared(x))
        return self.head(x)


class TiedFunctionalHead(nn.Module):
    """Token classifier whose head reuses the embedding matrix through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.embed(ids).mean(1)))
        return F.linear(h, self.embed.weight)


class TiedModuleHead(nn.Module):
    """Token classifier whose Linear head holds the embedding's Parameter as its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids).mean(1)))


class PositionsAndClassToken(nn.Module):
    """ViT/BERT-style parameters used outside any layer: a class token expanded over the
    batch and concatenated, a (1, T, D) position table broadcast-added, a per-channel scale
    reshaped and multiplied, a bias table gathered by a constant index and added."""

    def __init__(self, tokens: int = 3, dim: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(2, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.scale = nn.Parameter(torch.ones(dim))
        self.table = nn.Parameter(torch.zeros(5))
        self.register_buffer("index", torch.tensor([[0, 1, 2, 3], [4, 0, 1, 2]] * 2))
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # (B, T, D)
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1) + self.pos
        h = h * self.scale.reshape(1, 1, -1)
        h = h + self.table[self.index]  # (T + 1, D) bias, the same for every sample
        return self.head(torch.tanh(h.mean(1)))


NOW_EXACT = [
    pytest.param(
        lambda: classifier(ScaledLinear(4, 3), inputs(4)), inputs(4), id="subclass-own-forward"
    ),
    pytest.param(
        lambda: classifier(nn.Conv2d(2, 3, 2, padding="same"), inputs(2, 4, 4)),
        inputs(2, 4, 4),
        id="conv2d-same-even-kernel",
    ),
    pytest.param(
        lambda: classifier(nn.BatchNorm2d(2, track_running_stats=False), inputs(2, 3, 3)),
        inputs(2, 3, 3),
        id="batchnorm-without-running-stats",
    ),
    pytest.param(SharedLayer, inputs(4), id="layer-called-twice"),
    pytest.param(
        TiedFunctionalHead, torch.tensor([[1, 2, 2], [3, 4, 5], [0, 0, 1]]), id="tied-F.linear"
    ),
    pytest.param(
        TiedModuleHead, torch.tensor([[1, 2, 2], [3, 4, 5], [0, 0, 1]]), id="tied-Linear-head"
    ),
    pytest.param(PositionsAndClassToken, inputs(3, 2), id="class-token-positions-scale-bias-table"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("make", "x"), NOW_EXACT)
def test_fast_scores_shared_tied_broadcast_and_overridden_layers_exactly(make, x, method):
    model = randomize_(make().double().eval())
    assert_fast_matches_loop(model, x, method)


# --- what the fast backend refuses when it runs --------------------------------------------


class ScriptedPart(nn.Module):
    """A TorchScript submodule inside an eager model: the recorder cannot see its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.jit.script(nn.Linear(4, 4))
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x)))


class ModifiesInputAfterUse(nn.Module):
    """Changes, in place, a tensor that a broadcast add has already consumed (autograd
    itself does not mind: add keeps no input for its backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.shift = nn.Parameter(torch.zeros(4))
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        y = h + self.shift
        h.add_(1.0)
        return self.head(torch.tanh(y * h))


class AsksForAValue(nn.Module):
    """Data-dependent control flow: a per-sample forward cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum().item() > 0 else -self.a(x)


REFUSED_AT_CALL = [
    pytest.param(ScriptedPart, "cannot see", id="parameter-used-inside-torchscript"),
    pytest.param(ModifiesInputAfterUse, "modified in place", id="input-modified-after-use"),
    pytest.param(AsksForAValue, "differs between samples", id="item-in-forward"),
]


@pytest.mark.parametrize(("make", "reason"), REFUSED_AT_CALL)
@pytest.mark.parametrize("method", METHODS)
def test_fast_backend_refuses_what_it_cannot_prove_exact_and_auto_falls_back(make, reason, method):
    model = randomize_(make().double().eval())
    x = inputs(4)
    fast = GradNormScorer(model, method=method, backend="fast")
    with pytest.raises(BackendUnsupported, match=reason) as refused:
        fast(x)
    auto = GradNormScorer(model, method=method, backend="auto", per_layer=True)
    got = auto(x)
    # a batch whose samples branch apart is refused alone; the next batch may not
    assert (auto.backend == "fast") == isinstance(refused.value, BatchDependent)
    want = GradNormScorer(model, method=method, backend="loop", per_layer=True)(x)
    torch.testing.assert_close(got.grad_norm, want.grad_norm, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got.logits, want.logits, rtol=RTOL, atol=ATOL)


def test_fast_backend_refuses_embedding_max_norm_which_rewrites_the_weight_during_forward():
    model = classifier(nn.Embedding(8, 3, max_norm=1.0), TOKENS3)
    with pytest.raises(BackendUnsupported):
        GradNormScorer(model, backend="fast")(TOKENS3)


@pytest.fixture
def fallbacks(monkeypatch) -> list:
    """The torch functions the fast backend sends to its per-sample vjp fallback."""
    from torchserve_gradnorm.backends import fast as fast_backend

    seen = []
    real = fast_backend.per_sample_vjp

    def spy(call, *rest):
        seen.append(call.func)
        return real(call, *rest)

    monkeypatch.setattr(fast_backend, "per_sample_vjp", spy)
    return seen


def test_multihead_attention_is_scored_through_its_projections_not_the_fallback(fallbacks):
    """nn.MultiheadAttention without masks is replayed as its packed in-projection, attention
    and out-projection, so its weights get the linear rule's norms, not a per-sample vjp."""
    from models import TinyTransformer

    model = randomize_(TinyTransformer().double().eval())
    for method in METHODS:
        assert_fast_matches_loop(model, TOKENS3, method)
    assert fallbacks == []


class BroadcastOnEitherSide(nn.Module):
    """Parameters broadcast-added and multiplied with the parameter on either side."""

    def __init__(self, tokens: int = 3, dim: int = 2) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(tokens, 1))
        self.gain = nn.Parameter(torch.ones(()))
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.pos + x)
        h = torch.tanh(torch.add(h, self.shift))
        h = torch.tanh(self.scale * h) * self.gain
        return self.head(h.mean(1))


def test_broadcast_add_and_mul_are_scored_by_their_rule_with_the_parameter_on_either_side(
    fallbacks,
):
    model = randomize_(BroadcastOnEitherSide().double().eval())
    for method in METHODS:
        assert_fast_matches_loop(model, inputs(3, 2), method)
    assert fallbacks == []
