"""A fast CIFAR body: the network of the fastest published CIFAR-10 recipes (airbench, Jordan 2024).

Written from the published facts, not from its code: a frozen 2x2 patch-whitening
convolution initialised from the training data's patch covariance, then three groups of
conv3x3 -> max-pool -> batch norm -> GELU -> conv3x3 -> batch norm -> GELU of widths
64/256/256, a max-pool over what is left of the image and a linear layer. About 0.12 GMAC per
32x32 image forward, so that a CIFAR-10 model above 90% clean accuracy trains in well under an
hour on two CPU cores. It is one deterministic forward pass like every other body: no
test-time augmentation anywhere.

Training recipe pieces that belong to the body live here too: the batch-norm scale is frozen
at 1 (only its shift is learned), batch-norm statistics follow the batch quickly (momentum
0.4 in torch's sense), and every convolution starts as a partial identity (Dirac) so that the
signal passes through the untrained network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import scaled_channels

WIDTHS = (64, 256, 256)
PATCH = 2  # side of the whitening patches
WHITEN_EPS = 5e-4  # added to the patch-covariance eigenvalues before the inverse square root
OUTPUT_SCALE = 1 / 9  # the published factor on the output (small initial logits)
WHITEN_SAMPLES = 5000  # training images whose patches give the covariance


def patch_rows(x: torch.Tensor) -> torch.Tensor:
    """The ``PATCH x PATCH`` patches of images ``x`` [N, C, H, W], stride 1, as float64 rows
    [N * (H-1) * (W-1), C * PATCH**2], each ordered (channel, row, column) as a whitening filter is."""
    c = x.shape[1]
    patches = x.double().unfold(2, PATCH, 1).unfold(3, PATCH, 1)  # [N, C, H-1, W-1, P, P]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * PATCH * PATCH)


def patch_directions(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenvalues (ascending) and eigenvectors (columns) of the patch covariance of images
    ``x`` [N, C, H, W] (second moments: normalised images have a mean near zero)."""
    rows = patch_rows(x)
    return torch.linalg.eigh(rows.T @ rows / len(rows))


class PatchWhitening(nn.Module):
    """A frozen ``PATCH x PATCH`` convolution that whitens image patches, and a learned bias.

    ``fit(x)`` sets the filters from normalised training images [N, C, H, W]: the
    eigenvectors of the patch covariance scaled by ``1 / sqrt(eigenvalue + WHITEN_EPS)``,
    each with both signs, so the output has ``2 * directions`` channels. ``directions`` of the
    ``C * PATCH**2`` eigenvectors are kept, those of the largest eigenvalues (0 or None: all).
    Dropping the smallest suits training images that lack them: JPEG's 4:2:0 chroma subsampling
    leaves the 6 chroma directions inside a 2x2 RGB patch nearly empty, while exact test images
    fill them (``bench/jpeg_gap.py``). Until ``fit`` is called the filters are a random
    projection. The filters are a buffer (never trained, but in the state dict), so a trained
    model loads without any data.
    """

    def __init__(self, in_channels: int, directions: int | None = None):
        super().__init__()
        features = in_channels * PATCH * PATCH
        directions = directions or features
        if not 1 <= directions <= features:
            raise ValueError(f"a {PATCH}x{PATCH} patch of {in_channels} channels has {features} directions,"
                             f" not {directions}")
        self.register_buffer("weight", torch.randn(2 * directions, in_channels, PATCH, PATCH) / features ** 0.5)
        self.bias = nn.Parameter(torch.zeros(2 * directions))

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Whitening filters from the 2x2 patches of normalised images ``x`` [N, C, H, W]."""
        c = x.shape[1]
        eigenvalues, eigenvectors = patch_directions(x)  # ascending
        kept = self.out_channels // 2
        eigenvalues, eigenvectors = eigenvalues[-kept:], eigenvectors[:, -kept:]
        filters = eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + WHITEN_EPS)[:, None]
        filters = torch.cat([filters, -filters]).view(-1, c, PATCH, PATCH)
        self.weight.copy_(filters.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)


class ShiftBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (running statistics tracked, ``momentum`` set) whose scale is a tensor of
    ones: CUDA's batch-norm backward gives an empty shift gradient when the weight is None (and the
    scale one changes no bit on the CPU). No weight in the state dict, as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, torch.ones_like(self.bias), self.bias,
                            self.training, self.momentum, self.eps)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    """Batch norm whose scale stays 1 (no weight) and whose shift is learned."""
    norm = ShiftBatchNorm(channels, momentum=0.4, eps=1e-12, affine=False)
    norm.bias = nn.Parameter(torch.zeros(channels))  # F.batch_norm takes a bias without a weight
    return norm


def _conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])  # a partial identity: the signal passes at init
    return conv


class ConvGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _conv(cin, cout)
        self.norm1 = _batch_norm(cout)
        self.conv2 = _conv(cout, cout)
        self.norm2 = _batch_norm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class FastCIFAR(nn.Module):
    """Patch whitening, GELU, three ``ConvGroup`` of widths 64/256/256 (times ``width``), a
    max-pool over the remaining grid, a batch norm that centres the pooled features (no scale,
    no shift; our addition to the published network, for prototype heads), and a bias-free
    linear layer whose output is scaled by 1/9 (small initial logits).

    Args:
        in_channels: image channels C.
        out_dim: size of the output (k logits, or D for a prototype head).
        width: multiplier of the three group widths.
        centre_features: the batch norm over the pooled features (off: the published network).
        whiten_directions: the patch directions the whitening keeps, largest first (0: all ``C * 4``).
        output_scale: the factor on the linear layer's output (the published 1/9: small initial
            logits). A loss whose targets are large (the authors' unbounded prototypes, about +-77)
            needs a larger one: with 1/9 the weights must grow nine times as far.

    Input [N, C, H, W] normalised (32x32 is the intended size; at least 16x16), output
    [N, out_dim]. Call ``fit(x)`` with normalised training images before training.
    """

    def __init__(self, *, in_channels: int, out_dim: int, width: float = 1.0, centre_features: bool = True,
                 whiten_directions: int = 0, output_scale: float = OUTPUT_SCALE):
        super().__init__()
        self.whiten = PatchWhitening(in_channels, whiten_directions)
        widths = [scaled_channels(w, width) for w in WIDTHS]
        cin = self.whiten.out_channels
        groups = []
        for cout in widths:
            groups.append(ConvGroup(cin, cout))
            cin = cout
        self.groups = nn.Sequential(*groups)
        # The pooled features come out of GELU and a max-pool, so they are nearly all positive and
        # share one large mean direction. A softmax head absorbs it (each logit gets a constant);
        # a cosine head cannot, and every embedding starts close to one direction. A batch norm
        # without scale or shift centres the features for every head alike.
        self.pool_norm = nn.BatchNorm1d(cin, momentum=0.4, affine=False) if centre_features else None
        self.linear = nn.Linear(cin, out_dim, bias=False)
        self.scale = output_scale

    fit_samples = WHITEN_SAMPLES  # training images ``fit`` needs (models.fit_to_data passes no more)

    def fit(self, x: torch.Tensor) -> None:
        """Set the whitening filters from normalised training images (``fit_samples`` of them suffice)."""
        self.whiten.fit(x[: self.fit_samples])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        x = torch.amax(x, dim=(2, 3))  # the max-pool over what is left of the image (3x3 at 32x32)
        if self.pool_norm is None:
            pass
        elif self.training and len(x) == 1:  # one feature vector has no batch statistics: use the running ones
            x = F.batch_norm(x, self.pool_norm.running_mean, self.pool_norm.running_var, training=False,
                             eps=self.pool_norm.eps)
        else:
            x = self.pool_norm(x)
        return self.linear(x) * self.scale


def fast_cifar(*, in_channels: int, out_dim: int, width: float = 1.0, centre_features: bool = True,
               whiten_directions: int = 0, output_scale: float = OUTPUT_SCALE) -> FastCIFAR:
    return FastCIFAR(in_channels=in_channels, out_dim=out_dim, width=width, centre_features=centre_features,
                     whiten_directions=whiten_directions, output_scale=output_scale)
