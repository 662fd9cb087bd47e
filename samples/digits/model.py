"""Small CNN for scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``).

This file is loaded standalone by TorchServe as the archive's model file, so it imports only
torch and defines exactly one ``nn.Module`` subclass: ``DigitsCNN``.

Input: ``(B, 1, 8, 8)`` float, where each pixel ``v`` in ``[0, 1]`` (sklearn's 0..16 divided by
16, or an 8-bit grayscale pixel divided by 255; high value = ink) has been normalized as
``(v - MEAN) / STD``. Output: ``(B, 10)`` logits for the digits 0..9.
"""

import torch
from torch import nn

# Mean and standard deviation of all pixels (scaled to [0, 1]) of the training split
# (stratified 70/15/15 split of load_digits with random_state=0, see train.py), computed once:
# mean = 0.30555451968973746, std = 0.3761244633054805.
MEAN = 0.3056
STD = 0.3761


def _conv_bn(in_ch: int, out_ch: int, relu: bool = True) -> nn.Sequential:
    layers = [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """conv-BN-ReLU x2, one residual block, 2x2 average pool, MLP head with 10 logits.

    No in-place operations, so gradients and hooks work on every layer.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(1, 16), _conv_bn(16, 32))
        # Residual block: conv-BN-ReLU-conv-BN, plus the identity, then ReLU (res_act, in forward).
        self.res = nn.Sequential(_conv_bn(32, 32), _conv_bn(32, 32, relu=False))
        self.res_act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Sequential(nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.res_act(x + self.res(x))
        x = torch.flatten(self.pool(x), 1)
        return self.head(self.fc(x))
