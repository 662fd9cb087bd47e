"""The benchmarked models: builders with random weights, full size or tiny (``quick``).

torchvision, timm and transformers are imported inside the builders, so that a machine
without one of them can still run the other models.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters that are not the identity.

    A freshly initialized network has running mean 0 / variance 1 and weight 1 / bias 0;
    the norms are then unusually regular. Perturbing them keeps every rule exercised.
    """
    g = seeded(seed + 1)

    def uniform(t: Tensor, low: float, high: float) -> None:
        # drawn on the CPU, so that a model built on a GPU gets the same values
        t.copy_(torch.empty(t.shape, device="cpu").uniform_(low, high, generator=g))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                uniform(m.running_mean, -0.1, 0.1)
                uniform(m.running_var, 0.5, 1.5)
                uniform(m.weight, 0.5, 1.5)
                uniform(m.bias, -0.1, 0.1)
    return model


# ------------------------------------------------------------------------ vision


def torchvision_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    import torchvision

    return randomize_batchnorm(getattr(torchvision.models, arch)(num_classes=num_classes, **kwargs))


def tiny_resnet(bottleneck: bool, num_classes: int) -> nn.Module:
    """One block per stage: the ResNet-18 / -50 module types at a test's cost."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    block = Bottleneck if bottleneck else BasicBlock
    return randomize_batchnorm(ResNet(block, [1, 1, 1, 1], num_classes=num_classes))


def cifar_resnet18(num_classes: int = 10, quick: bool = False) -> nn.Module:
    """ResNet-18 as trained on CIFAR: a 3x3 stride-1 stem and no max-pool, so a 32x32 input
    keeps 32x32 maps in the first stage (the ImageNet stem shrinks them to 8x8)."""
    model = tiny_resnet(False, num_classes) if quick else torchvision_model("resnet18", num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def tiny_vit(num_classes: int) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=num_classes,
    )  # fmt: skip


def tiny_swin(num_classes: int) -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
        num_classes=num_classes,
    )  # fmt: skip


def tiny_convnext(num_classes: int) -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    blocks = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
    return ConvNeXt(blocks, num_classes=num_classes)


def timm_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    return randomize_batchnorm(model)


# -------------------------------------------------------------------------- text


class SequenceClassifierLogits(nn.Module):
    """A Hugging Face sequence classifier called with a (B, T) input_ids tensor, returning
    the (B, C) logits: the form the scorer takes (dict inputs are another feature)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits


def bert_classifier(num_labels: int, quick: bool) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = BertConfig(num_labels=num_labels, **(size if quick else {}))
    return SequenceClassifierLogits(BertForSequenceClassification(config))


def gpt2_classifier(num_labels: int, quick: bool) -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    size = dict(n_embd=32, n_layer=2, n_head=2)
    # The classifier reads the last non-padding token; inputs never hold the pad id.
    config = GPT2Config(num_labels=num_labels, pad_token_id=50256, **(size if quick else {}))
    return SequenceClassifierLogits(GPT2ForSequenceClassification(config))


# -------------------------------------------------------------------------- toys


def mlp(quick: bool) -> nn.Module:
    width, inp = (32, 64) if quick else (512, 784)
    return nn.Sequential(
        nn.Linear(inp, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention from two nn.Linear layers (no fused kernel, no parameters
    outside Linear modules), so that every backend, and BackPACK's hooks, can see them."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        y = att.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class SmallEncoder(nn.Module):
    """Pre-norm transformer encoder classifier over token ids, mean-pooled.

    Built only from Embedding, Linear and LayerNorm modules; the positions are an
    nn.Embedding looked up with (B, T) ids, so the fast backend covers every parameter.
    """

    def __init__(
        self, vocab: int, seq_len: int, dim: int, heads: int, layers: int, classes: int = 10
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, 4 * dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: Tensor) -> Tensor:
        b, t = ids.shape
        pos = torch.arange(t, device=ids.device).expand(b, t)
        x = self.tokens(ids) + self.positions(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


TOY_ENCODER_SHAPES = {
    False: dict(vocab=1000, seq_len=32, dim=128, heads=4, layers=2),
    True: dict(vocab=50, seq_len=8, dim=32, heads=2, layers=1),
}


def toy_encoder(quick: bool) -> nn.Module:
    return SmallEncoder(**TOY_ENCODER_SHAPES[quick])
