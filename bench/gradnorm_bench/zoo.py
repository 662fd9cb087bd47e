"""The zoo: which models are benchmarked, with which input, at which batch size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import models as m

IMAGENET_CLASSES = 1000
TEXT_LABELS = 2


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    """How tables name the model."""
    build: Callable[[bool], nn.Module]
    """quick -> the model (random weights): full size, or tiny for the tests."""
    shape: tuple[int, ...]
    """One sample's input: (C, H, W) / (features,) floats, or (T,) token ids."""
    quick_shape: tuple[int, ...]
    batch: dict[str, int]
    """Per device type."""
    quick_batch: int = 4
    token_ids: tuple[int, int] | None = None
    """[low, high) of the token ids for a text model (None: float inputs)."""
    needs: tuple[str, ...] = ()
    backpack_converter: bool = False
    """BackPACK needs its module converter (residual additions in a ResNet)."""
    vmap_by_default: bool = True
    loop_by_default: bool = False
    default: bool = True
    """In the zoo run when --models is not given."""
    targets: bool = True
    """The issue's targets apply (the realistic zoo; not the toys nor the easy-case row)."""
    cost: float = 1.0
    """Rough CPU cost of a forward+backward relative to the CIFAR ResNet-18's: the cheap
    models run first within each pass, so that a run cut short loses the dearest cases."""

    def input_desc(self, quick: bool) -> str:
        shape = "x".join(str(s) for s in (self.quick_shape if quick else self.shape))
        return f"{shape} tokens" if self.token_ids else shape

    def batch_for(self, device: str, quick: bool) -> int:
        return self.quick_batch if quick else self.batch[device]

    def make_input(self, batch: int, quick: bool, device: torch.device) -> Tensor:
        g = m.seeded(1234)
        shape = (batch, *(self.quick_shape if quick else self.shape))
        if self.token_ids:
            low, high = self.token_ids
            return torch.randint(
                low, high if not quick else min(high, low + 40), shape, generator=g
            ).to(device)
        return torch.randn(shape, generator=g).to(device)


def _image(name: str, title: str, build: Callable[[bool], nn.Module], **kw) -> ModelSpec:
    kw.setdefault("needs", ("torchvision",))
    return ModelSpec(
        name, title, build, shape=(3, 224, 224), quick_shape=(3, 32, 32),
        batch={"cpu": 16, "cuda": 64}, quick_batch=2, vmap_by_default=False, **kw,
    )  # fmt: skip


def _text(name: str, title: str, build: Callable[[bool], nn.Module], ids: tuple[int, int]):
    # Batch 8 on CPU: 1,024 tokens a batch already cost a ViT-B/16's batch of 16 images.
    return ModelSpec(
        name, title, build, shape=(128,), quick_shape=(16,), batch={"cpu": 8, "cuda": 64},
        quick_batch=2, token_ids=ids, needs=("transformers",), vmap_by_default=False, cost=2.5,
    )  # fmt: skip


ZOO: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "cifar-resnet18",
            "ResNet-18, CIFAR stem (3x3, no max-pool)",
            lambda q: m.cifar_resnet18(10, quick=q),
            shape=(3, 32, 32),
            quick_shape=(3, 16, 16),
            batch={"cpu": 64, "cuda": 64},
            needs=("torchvision",),
            backpack_converter=True,
            vmap_by_default=False,
        ),
        ModelSpec(
            "resnet18-imagenet-stem",
            "ResNet-18, ImageNet stem at 32x32 (8x8 maps after the stem: the easy case)",
            lambda q: m.tiny_resnet(False, 10) if q else m.torchvision_model("resnet18", 10),
            shape=(3, 32, 32),
            quick_shape=(3, 16, 16),
            batch={"cpu": 64, "cuda": 64},
            needs=("torchvision",),
            backpack_converter=True,
            default=False,
            targets=False,
            cost=0.1,
        ),
        _image(
            "resnet50",
            "ResNet-50",
            lambda q: (
                m.tiny_resnet(True, 10) if q else m.torchvision_model("resnet50", IMAGENET_CLASSES)
            ),
            backpack_converter=True,
            cost=1.9,
        ),
        _image(
            "convnext-t",
            "ConvNeXt-T",
            lambda q: (
                m.tiny_convnext(10) if q else m.torchvision_model("convnext_tiny", IMAGENET_CLASSES)
            ),
            cost=2.2,
        ),
        _image(
            "vit-b16",
            "ViT-B/16",
            lambda q: m.tiny_vit(10) if q else m.torchvision_model("vit_b_16", IMAGENET_CLASSES),
            cost=8.0,
        ),
        _image(
            "swin-t",
            "Swin-T",
            lambda q: m.tiny_swin(10) if q else m.torchvision_model("swin_t", IMAGENET_CLASSES),
            cost=2.2,
        ),
        _image(
            "efficientnet-b0",
            "EfficientNet-B0 (timm)",
            lambda q: m.timm_model("efficientnet_b0", 10 if q else IMAGENET_CLASSES),
            needs=("timm",),
            cost=0.6,
        ),
        _text(
            "bert-base",
            "BERT-base classifier (Hugging Face)",
            lambda q: m.bert_classifier(TEXT_LABELS, q),
            ids=(1000, 30522),
        ),
        _text(
            "gpt2-small",
            "GPT-2 small classifier (Hugging Face)",
            lambda q: m.gpt2_classifier(TEXT_LABELS, q),
            ids=(0, 50000),
        ),
        ModelSpec(
            "mlp",
            "MLP 784-512-512-10",
            m.mlp,
            shape=(784,),
            quick_shape=(64,),
            batch={"cpu": 64, "cuda": 64},
            quick_batch=8,
            loop_by_default=True,
            targets=False,
            cost=0.01,
        ),
        ModelSpec(
            "toy-encoder",
            "toy transformer encoder (2 layers, dim 128)",
            m.toy_encoder,
            shape=(m.TOY_ENCODER_SHAPES[False]["seq_len"],),
            quick_shape=(m.TOY_ENCODER_SHAPES[True]["seq_len"],),
            batch={"cpu": 64, "cuda": 64},
            token_ids=(0, m.TOY_ENCODER_SHAPES[False]["vocab"]),
            targets=False,
            cost=0.05,
        ),
    )
}


def build_model(spec: ModelSpec, quick: bool, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    # Parameters are created (and randomly initialized) on the device itself: on a GPU,
    # initializing a ViT-B on the CPU first would cost seconds per case.
    with device:
        return spec.build(quick).to(device).eval()
