"""Small bodies for the grey-scale data sets: a CNN for 28x28 images, an MLP for 8x8 digits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import init_weights, scaled_channels


class SmallCNN(nn.Module):
    """The TRADES MNIST network with batch norm: conv32-conv32-pool-conv64-conv64-pool-fc200-fc200.

    Convolutions are 3x3 without padding, so a 28x28 image ends as 64 x 4 x 4. Batch norm
    after each convolution lets the same learning rates that train the ResNets (and the
    prototype losses, whose gradients are small) train this net too.

    Args:
        in_channels: image channels C.
        out_dim: size of the output.
        width: multiplier of every channel and hidden-unit count.

    Input [N, C, H, W] (normalised, H and W >= 16; 28x28 is the intended size), output
    [N, out_dim].
    """

    def __init__(self, *, in_channels: int, out_dim: int, width: float = 1.0):
        super().__init__()
        c1, c2 = scaled_channels(32, width), scaled_channels(64, width)
        hidden = scaled_channels(200, width)

        def conv(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            conv(in_channels, c1), conv(c1, c1), nn.MaxPool2d(2),
            conv(c1, c2), conv(c2, c2), nn.MaxPool2d(2),
            # Identity for 28x28 inputs; lets other sizes reach the same 4x4 grid.
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc1 = nn.Linear(c2 * 16, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.features(x), 1)
        out = F.relu(self.fc1(out))
        out = F.relu(self.fc2(out))
        return self.fc3(out)

    def layers(self) -> list[nn.Module]:
        """The same computation as a list of layers applied in order (its own modules), for
        layer-by-layer analyses such as certified bounds."""
        return [*_flat(self.features), nn.Flatten(), self.fc1, nn.ReLU(), self.fc2, nn.ReLU(), self.fc3]


class MLP(nn.Module):
    """Flatten, two hidden layers of 256 * width units with ReLU, linear output.

    Args:
        in_channels: image channels C.
        out_dim: size of the output.
        width: multiplier of the hidden size 256.
        input_size: (H, W) of the images; (8, 8) for the digits data set.

    Input [N, C, H, W] (normalised), output [N, out_dim].
    """

    def __init__(self, *, in_channels: int, out_dim: int, width: float = 1.0,
                 input_size: tuple[int, int] = (8, 8)):
        super().__init__()
        hidden = scaled_channels(256, width)
        self.input_shape = (in_channels, *input_size)
        self.fc1 = nn.Linear(in_channels * input_size[0] * input_size[1], hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"mlp: built for images of shape {self.input_shape}, got {tuple(x.shape[1:])}")
        # flatten copies a channels_last tensor into C, H, W order, so weights mean the same
        # pixels in either memory format.
        out = torch.flatten(x, 1)
        out = F.relu(self.fc1(out))
        out = F.relu(self.fc2(out))
        return self.fc3(out)

    def layers(self) -> list[nn.Module]:
        """The same computation as a list of layers applied in order (its own modules)."""
        return [nn.Flatten(), self.fc1, nn.ReLU(), self.fc2, nn.ReLU(), self.fc3]


def _flat(module: nn.Module) -> list[nn.Module]:
    """The leaves of nested ``nn.Sequential`` containers, in order."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _flat(child)]
    return [module]


def small_cnn(*, in_channels: int, out_dim: int, width: float = 1.0) -> SmallCNN:
    """SmallCNN body for 28x28 images; [N, C, 28, 28] -> [N, out_dim]."""
    return SmallCNN(in_channels=in_channels, out_dim=out_dim, width=width)


def mlp(*, in_channels: int, out_dim: int, width: float = 1.0,
        input_size: tuple[int, int] | None = None) -> MLP:
    """MLP body; ``input_size`` (H, W) defaults to (8, 8); [N, C, H, W] -> [N, out_dim]."""
    return MLP(in_channels=in_channels, out_dim=out_dim, width=width,
               input_size=(8, 8) if input_size is None else tuple(input_size))
