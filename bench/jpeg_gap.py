#!/usr/bin/env python
"""Where the JPEG gap lies: what the JPEG-decoded CIFAR-10 training images lack, seen through a
fast_cifar model's patch-whitening layer.

    python bench/jpeg_gap.py                                   # the committed 90.8% prototype model
    python bench/jpeg_gap.py --run results/compare-cifar10-fast-cpu/ce

On the first 1000 CIFAR-10 test images, of which ../shared/data holds both the exact pixels and the
JPEG-decoded copies (quality 75, 4:2:0), it measures:

1. the model's clean accuracy on each (eval mode, fp32, one forward pass);
2. the variance of each of the 12 eigen-directions of the 2x2 RGB patch covariance of the first
   5000 JPEG training images (normalised as the model does), on those training images, on the
   JPEG test copies and on the exact test images, and which directions carry no luminance and no
   patch mean (the chroma detail that 4:2:0 subsampling removes);
3. the accuracy after zeroing the model's whitening filters for the k smallest directions (both
   signs), on both copies of the test images.

Writes bench/jpeg-gap-results.md and prints it. Under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from repulsor.data import DATASETS  # noqa: E402
from repulsor.models.fast import PATCH, WHITEN_EPS, PatchWhitening, patch_directions, patch_rows  # noqa: E402
from repulsor.store.run import load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
JPEG_TRAIN = DATA / "cifar10_jpeg" / "train-00.npz"
JPEG_TEST = DATA / "cifar10_jpeg" / "test.npz"
EXACT_TEST = DATA / "cifar10_test1000_lossless" / "test.npz"
N_TEST = 1000
N_TRAIN = 5000
DROPS = (0, 1, 2, 4, 6)


def images(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images of an npz file as [n, 3, 32, 32] floats in [0, 1], and their labels."""
    with np.load(path, allow_pickle=False) as z:
        return torch.from_numpy(z["x"][:n]).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(z["y"][:n])


def normalised(x: torch.Tensor) -> torch.Tensor:
    """Images [N, C, H, W] in [0, 1] normalised as the model's first layer does."""
    info = DATASETS["cifar10"]
    return (x - torch.tensor(info.mean).view(1, -1, 1, 1)) / torch.tensor(info.std).view(1, -1, 1, 1)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    pred = torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)])
    return (pred == y).float().mean().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "results" / "compare-cifar10-fast-cpu" / "prototype"),
                        help="a fast_cifar run folder with its weights")
    parser.add_argument("--out", default=str(ROOT / "bench" / "jpeg-gap-results.md"))
    args = parser.parse_args(argv)
    for path in (JPEG_TRAIN, JPEG_TEST, EXACT_TEST):
        if not path.is_file():
            sys.exit(f"jpeg_gap: {path} is missing; this benchmark needs ../shared/data beside the repository")
    started = time.time()
    torch.manual_seed(0)
    model = load_model(args.run).eval()
    whitening = [m for m in model.modules() if isinstance(m, PatchWhitening)]
    if len(whitening) != 1:
        sys.exit(f"jpeg_gap: {args.run} is not a fast_cifar model (it has no patch-whitening layer)")
    whitening = whitening[0]
    train_x, _ = images(JPEG_TRAIN, N_TRAIN)
    tests = {"JPEG copies": images(JPEG_TEST, N_TEST), "exact pixels": images(EXACT_TEST, N_TEST)}

    eigenvalues, eigenvectors = patch_directions(normalised(train_x))
    variances = {"JPEG training images": eigenvalues}
    for name, (x, _) in tests.items():
        projected = patch_rows(normalised(x)) @ eigenvectors
        variances[f"test, {name}"] = (projected ** 2).mean(0)
    # The make-up of each direction: its luminance part (the same weight on R, G and B) and its
    # patch-mean part (the same weight on the four pixels of a channel).
    vectors = eigenvectors.T.reshape(-1, 3, PATCH * PATCH)
    luminance = 3 * (vectors.mean(1) ** 2).sum(1)
    patch_mean = PATCH * PATCH * (vectors.mean(2) ** 2).sum(1)

    lines = [
        "# Where the JPEG gap lies (`python bench/jpeg_gap.py`)",
        "",
        f"Run: `{Path(args.run).resolve().relative_to(ROOT) if Path(args.run).resolve().is_relative_to(ROOT) else args.run}`;"
        f" the first {N_TEST} CIFAR-10 test images (exact pixels, and their JPEG-decoded copies);"
        f" patch covariance of the first {N_TRAIN} JPEG training images; eval mode, fp32;"
        f" {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "",
        "## Clean accuracy",
        "",
        "| test images | accuracy |",
        "|---|---|",
    ]
    for name, (x, y) in tests.items():
        lines.append(f"| {name} | {100 * accuracy(model, x, y):.1f}% |")
    lines += ["", "## The 12 directions of the 2x2 patch covariance (smallest first)", "",
              "| direction | luminance share | patch-mean share | whitening gain | "
              + " | ".join(f"variance: {name}" for name in variances) + " | exact / JPEG training |",
              "|---" * (5 + len(variances)) + "|"]
    exact = variances["test, exact pixels"]
    for i in range(len(eigenvalues)):
        gain = 1 / float(torch.sqrt(eigenvalues[i].clamp_min(0) + WHITEN_EPS))
        lines.append(f"| {i + 1} | {luminance[i]:.2f} | {patch_mean[i]:.2f} | {gain:.1f} | "
                     + " | ".join(f"{float(v[i]):.5f}" for v in variances.values())
                     + f" | {float(exact[i] / eigenvalues[i]):.2f} |")
    lines += ["", "## Accuracy with the whitening filters of the k smallest directions zeroed (both signs)", "",
              "| k | " + " | ".join(tests) + " |", "|---" * (1 + len(tests)) + "|"]
    # The model's own filters are eigh's eigenvectors in ascending order, then their negatives.
    original = whitening.weight.clone()
    half = original.shape[0] // 2
    for k in DROPS:
        weight = original.clone()
        weight[:k] = 0
        weight[half:half + k] = 0
        whitening.weight.copy_(weight)
        lines.append(f"| {k} | " + " | ".join(f"{100 * accuracy(model, x, y):.1f}%" for x, y in tests.values()) + " |")
    whitening.weight.copy_(original)
    lines += ["", f"Written in {time.time() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
