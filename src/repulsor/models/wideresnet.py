"""WideResNet (Zagoruyko and Komodakis 2016), the body of the TRADES and PGD-AT baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .resnet import PreActBlock, init_weights, scaled_channels


class WideBlock(PreActBlock):
    """Pre-activation block with optional dropout between its two convolutions."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__(cin, cout, stride)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + skip


class WideResNet(nn.Module):
    """WRN-depth-widen_factor: three stages of (depth - 4) / 6 pre-activation blocks.

    Args:
        depth: 6n + 4 (e.g. 34 for WRN-34-10, 10 for a tiny test net).
        widen_factor: multiplier of the stage widths 16, 32, 64.
        in_channels: image channels C.
        out_dim: size of the output.
        width: extra channel multiplier (applied on top of widen_factor), for tiny variants.
        dropout: dropout probability inside each block (0 in the robustness baselines).

    Input [N, C, H, W] (normalised), output [N, out_dim].
    """

    def __init__(self, *, depth: int = 34, widen_factor: int = 10, in_channels: int, out_dim: int,
                 width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise UserError(f"wrn: depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth!r}")
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise UserError(f"wrn: widen_factor must be an integer >= 1, got {widen_factor!r}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"wrn: dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        stem = scaled_channels(16, width)
        chans = [scaled_channels(c * widen_factor, width) for c in (16, 32, 64)]
        self.stem = nn.Conv2d(in_channels, stem, kernel_size=3, padding=1, bias=False)
        stages, cin = [], stem
        for i, cout in enumerate(chans):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, dropout))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, out_dim)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        out = F.relu(self.final_bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def wrn(*, in_channels: int, out_dim: int, width: float = 1.0, depth: int | None = None,
        widen_factor: int | None = None) -> WideResNet:
    """WideResNet body; ``depth`` defaults to 34 and ``widen_factor`` to 10 (WRN-34-10)."""
    return WideResNet(depth=34 if depth is None else depth,
                      widen_factor=10 if widen_factor is None else widen_factor,
                      in_channels=in_channels, out_dim=out_dim, width=width)
