"""Evaluate your own PyTorch model with repulsor's attack suites (runs in seconds on digits).

The model below is a plain ``nn.Module`` defined here, outside repulsor. All that
``repulsor.evaluate`` needs is the RobustBench convention: the model takes images
[N, C, H, W] with pixels in [0, 1] and returns one score per class (logits, or any scores
whose argmax is the prediction); normalisation belongs inside the model.

    python examples/evaluate_your_model.py                  # quick suite: PGD-20
    python examples/evaluate_your_model.py --suite standard # APGD-CE, APGD-T, FAB-T, Square + sanity checks
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import repulsor


class TinyNet(nn.Module):
    """An MLP for 8x8 grey digits, with its input normalisation as the first step."""

    def __init__(self, mean: float = 0.3053, std: float = 0.3760, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 20, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            index = order[start : start + 64]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="quick", help="quick | paper | standard | adaptive (default: quick)")
    parser.add_argument("--n", type=int, default=200, help="first N test points (default: 200)")
    parser.add_argument("--eps", type=float, default=0.1, help="L-inf radius in [0, 1] pixel units (default: 0.1)")
    args = parser.parse_args()

    torch.manual_seed(0)
    x_train, y_train = repulsor.load_dataset("digits", "train")
    x_test, y_test = repulsor.load_dataset("digits", "test")
    model = TinyNet()
    started = time.time()
    train_briefly(model, x_train, y_train)
    print(f"trained {type(model).__name__} on {len(x_train)} digits in {time.time() - started:.1f}s")

    started = time.time()
    result = repulsor.evaluate(model, x_test[: args.n], y_test[: args.n], suite=args.suite, eps=args.eps, norm="linf",
                               seed=0)
    print(f"suite {args.suite} on the first {result['n']} test points, linf eps={args.eps:g}, seed 0 "
          f"({time.time() - started:.1f}s)")
    print(f"  clean accuracy:          {result['clean_accuracy']:.4f}")
    for entry in result["attacks"]:
        print(f"  after {entry['name']:<18} {entry['accuracy']:.4f}  ({entry['n_attacked']} points attacked)")
    print(f"  robust accuracy (worst case): {result['robust_accuracy']:.4f}")
    for verdict in result.get("sanity", []):
        print(("  WARN " if not verdict["ok"] else "  ok   ") + verdict["message"])
    # result["x_adv"] holds the worst-case adversarial examples, for your own analyses.


if __name__ == "__main__":
    main()
