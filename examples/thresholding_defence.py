"""Evaluate a defence that shatters gradients, without and with BPDA (runs in about 20 seconds on digits).

The defence binarises the input (``x > 0.5``) before a small CNN: a non-differentiable step,
so the scores do not reach the input through autograd and no gradient attack can run on
it. repulsor evaluates it anyway:

1. as it is: the gradient attacks are recorded as "not applicable", a transfer attack from
   the undefended CNN (the surrogate) still runs, and the ``shattered_gradients`` sanity
   check names the fix;
2. with the threshold wrapped by ``repulsor.bpda``: it still binarises forward, while its
   backward pass is the identity (the straight-through estimator), so every gradient attack
   runs through it. Its predictions are exactly the defence's.

The robust accuracy of (1) overstates the defence; (2) is the number to quote.

    python examples/thresholding_defence.py
    python examples/thresholding_defence.py --suite standard --n 100
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import repulsor


class Threshold(nn.Module):
    """The defence's preprocessing: every pixel becomes 0 or 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0.5).float()


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10))


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        for start in range(0, len(x), 128):
            optimizer.zero_grad()
            F.cross_entropy(model(x[start : start + 128]), y[start : start + 128]).backward()
            optimizer.step()
    model.eval()


def show(title: str, result: dict) -> None:
    print(f"{title}: clean {result['clean_accuracy']:.3f}, robust {result['robust_accuracy']:.3f}")
    for entry in result["attacks"]:
        if entry["status"] == "done":
            print(f"    {entry['name']:<38} accuracy after {entry['accuracy']:.3f}")
        else:
            print(f"    {entry['name']:<38} not applicable: {entry['reason']}")
    for verdict in result.get("sanity", []):
        if not verdict["ok"]:
            print(f"    WARN {verdict['message']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="paper", help="any suite (default: paper, PGD-20 then PGD-100)")
    parser.add_argument("--n", type=int, default=200, help="first N test points (default: 200)")
    parser.add_argument("--eps", type=float, default=0.1, help="L-inf radius in [0, 1] pixel units (default: 0.1)")
    args = parser.parse_args()

    torch.manual_seed(0)
    x_train, y_train = repulsor.load_dataset("digits", "train")
    x_test, y_test = repulsor.load_dataset("digits", "test")
    x, y = x_test[: args.n], y_test[: args.n]
    cnn = small_cnn()
    train_briefly(cnn, x_train, y_train)

    common = dict(suite=args.suite, eps=args.eps, checks=True)
    defended = nn.Sequential(Threshold(), cnn)
    show("thresholding defence, attacked as it is", repulsor.evaluate(defended, x, y, surrogate=cnn, **common))
    with_bpda = nn.Sequential(repulsor.bpda(Threshold()), cnn)
    show("thresholding defence, attacked through BPDA", repulsor.evaluate(with_bpda, x, y, **common))


if __name__ == "__main__":
    main()
