"""CIFAR-style ResNet-18 and PreActResNet-18 bodies.

Both map normalised images [N, C, H, W] to [N, out_dim]. The stem is a 3x3 convolution with
stride 1 and no max-pool (the CIFAR variant), and the head pools adaptively, so 32x32, 28x28
and even 8x8 inputs all work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_CHANNELS = 4


def scaled_channels(channels: float, width: float) -> int:
    """``channels * width`` rounded, but never below MIN_CHANNELS: a 1- or 2-channel layer
    makes batch norm and ReLU degenerate (whole layers dead), even in a tiny test model."""
    return max(MIN_CHANNELS, int(round(channels * width)))


def init_weights(module: nn.Module) -> None:
    """He initialisation for convolutions (the ReLU networks' standard), unit batch norm,
    zero linear biases. Uses the global RNG, which the training code seeds."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every convolution here is followed by batch norm, which has its own.
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block (He et al. 2015): conv-bn-relu-conv-bn, add, relu."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): bn-relu-conv-bn-relu-conv, add.

    The projection shortcut, when needed, reads the pre-activated input, as in the
    PreActResNet-18 used by Rice et al. and Wong et al.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class ResNet(nn.Module):
    """ResNet with four stages of blocks and a linear output layer.

    Args:
        block: ``BasicBlock`` or ``PreActBlock``.
        num_blocks: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        in_channels: image channels C.
        out_dim: size of the output.
        width: multiplier of the channel counts 64, 128, 256, 512.

    Input [N, C, H, W] (normalised), output [N, out_dim].
    """

    def __init__(self, block: type[nn.Module], num_blocks, *, in_channels: int, out_dim: int,
                 width: float = 1.0):
        super().__init__()
        chans = [scaled_channels(c, width) for c in (64, 128, 256, 512)]
        self.preact = block is PreActBlock
        self.stem = _conv3x3(in_channels, chans[0])
        # Post-activation nets normalise the stem output; pre-activation nets leave that to
        # the first block's bn1.
        self.stem_bn = nn.Identity() if self.preact else nn.BatchNorm2d(chans[0])
        stages, cin = [], chans[0]
        for i, (cout, n) in enumerate(zip(chans, num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # Pre-activation blocks end on an addition; the net needs one last bn-relu.
        self.final_bn = nn.BatchNorm2d(cin) if self.preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, out_dim)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        if not self.preact:
            out = F.relu(self.stem_bn(out))
        out = self.stages(out)
        if self.preact:
            out = F.relu(self.final_bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet18(*, in_channels: int, out_dim: int, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-18 (BasicBlocks [2, 2, 2, 2]); [N, C, H, W] -> [N, out_dim]."""
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels=in_channels, out_dim=out_dim, width=width)


def preact_resnet18(*, in_channels: int, out_dim: int, width: float = 1.0) -> ResNet:
    """PreActResNet-18 (pre-activation blocks [2, 2, 2, 2]); [N, C, H, W] -> [N, out_dim]."""
    return ResNet(PreActBlock, (2, 2, 2, 2), in_channels=in_channels, out_dim=out_dim, width=width)
