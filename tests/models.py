"""Small models the engine tests score."""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_features: int = 6, classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, classes)
    )


def resnet18_32(classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with BatchNorm statistics that are not the identity."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=classes)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.1, 0.1, generator=generator)
    return model.eval()


class TinyTransformer(nn.Module):
    """Embedding + LayerNorm + MultiheadAttention classifier over token ids."""

    def __init__(self, vocab: int = 20, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + a)
        h = h + torch.relu(self.ff(h))
        return self.head(h.mean(dim=1))


class TinyEncoder(nn.Module):
    """Token classifier built only from layers the fast backend has rules for."""

    def __init__(self, vocab: int = 20, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Linear(dim, 32)
        self.group = nn.GroupNorm(4, 32)
        self.conv = nn.Conv1d(32, 16, 3, padding=1, groups=2)
        self.head = nn.Linear(16, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids))  # (B, T, D)
        h = torch.relu(self.ff(h)).transpose(1, 2)  # (B, 32, T)
        h = self.conv(self.group(h))
        return self.head(h.mean(dim=2))
