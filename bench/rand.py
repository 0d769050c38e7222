#!/usr/bin/env python
"""The cost of evaluating a randomised defence: repulsor's rand suite beside AutoAttack's.

    python bench/rand.py            # 100 MNIST test points, a few minutes on a quiet 2-core machine
    python bench/rand.py --n 20     # a check that it works

The model is the benchmark's PGD-adversarially-trained MNIST small CNN (``bench/run.py``
finds it under runs/ or trains it, about 100 s), behind a randomised defence: fresh Gaussian
noise (sigma 0.1) added to the input at every forward pass. On the same first N MNIST test
points, L-inf eps 0.3, one process, the machine otherwise idle:

1. repulsor's ``rand`` suite (APGD-CE and APGD-DLR, 100 steps, 20 gradient samples per
   step, a point robust only if all 10 forward passes classify its final example correctly),
   with and without its sanity checks;
2. AutoAttack's rand version as torchattacks ports it (``torchattacks.AutoAttack(version=
   "rand")``: the same two attacks with ``eot_iter=20``, but with torchattacks' default of
   10 APGD steps), and as the original configures it (100 steps), built from torchattacks'
   APGD; their examples scored by us both with one forward pass (as AutoAttack counts) and
   with our 10 votes. The original AutoAttack package is not on the package index this
   machine reaches, so torchattacks stands in for it;
3. the price of EOT itself: APGD-CE-100 with ``eot=1`` against torchattacks' APGD with
   ``eot_iter=1`` on the deterministic model (the ratio shows that ``eot=1`` adds nothing),
   and ``eot=20`` against ``eot=1`` on the randomised one.

Writes bench/rand-results.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402 - the benchmark's plumbing: paths, machine, the PGD-AT model

import torch  # noqa: E402
from torch import nn  # noqa: E402

import repulsor  # noqa: E402
from repulsor.attacks import apgd, correct_every_time, evaluating  # noqa: E402
from repulsor.config import load_config  # noqa: E402
from repulsor.evaluation.cascade import RANDOMISED_VOTES  # noqa: E402
from repulsor.evaluation.run import load_test_split  # noqa: E402

RESULTS = HERE / "rand-results.md"
SIGMA = 0.1


class Noisy(nn.Module):
    """Fresh Gaussian input noise at every forward pass: a randomised defence."""

    def __init__(self, body: nn.Module, sigma: float):
        super().__init__()
        self.body, self.sigma = body, sigma

    def forward(self, x):
        return self.body((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


def bench_training(run: Path) -> str:
    """Precision, training time and selected weights of a run, from its training.json."""
    record = json.loads((run / "training.json").read_text(encoding="utf-8"))
    cost = record.get("cost", {})
    return (f"{cost.get('precision', '?')}, {cost.get('wall_seconds', 0):.0f} s of training;"
            f" weights: {record.get('selected', '?')}")


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="first N MNIST test points (default: 100)")
    args = parser.parse_args(argv)
    info = bench.machine()
    torchattacks, why_not = bench.import_torchattacks()
    run, how = bench.find_or_train_pgd_at()
    if run is None:
        print(f"no PGD-AT MNIST model: {how}", file=sys.stderr)
        return 1
    base = repulsor.load_model(run)
    cfg = load_config(run / "config.toml")
    eps = cfg.train.eps
    x, y, _ = load_test_split(cfg, args.n, str(bench.MNIST_DIR))
    noisy = Noisy(base, SIGMA).eval()
    rows = []

    def add(what, value):
        rows.append((what, value))
        bench.log(f"{what}: {value}")

    # 1. our rand suite
    result, seconds = timed(lambda: repulsor.evaluate(noisy, x, y, suite="rand", eps=eps, checks=False))
    add("repulsor rand suite (APGD-CE + APGD-DLR, eot 20, 10 votes)",
        f"robust {result['robust_accuracy']:.3f} (clean {result['clean_accuracy']:.3f}), {seconds:.0f}s")
    checked, seconds_checked = timed(lambda: repulsor.evaluate(noisy, x, y, suite="rand", eps=eps))
    flags = [v["name"] for v in checked["sanity"] if not v["ok"]]
    add("repulsor rand suite with its sanity checks",
        f"{seconds_checked:.0f}s; warnings: {', '.join(flags) or 'none'}")

    # 2. AutoAttack's rand version (torchattacks' port)
    if torchattacks is not None:
        # As shipped, the port builds its APGDs with torchattacks' default of 10 steps; the
        # original AutoAttack runs 100. Both are measured.
        shipped = torchattacks.AutoAttack(noisy, norm="Linf", eps=eps, version="rand", n_classes=10, seed=0)
        faithful = torchattacks.MultiAttack([
            torchattacks.APGD(noisy, norm="Linf", eps=eps, steps=100, loss=loss, eot_iter=20, n_restarts=1, seed=0)
            for loss in ("ce", "dlr")])
        for label, attack in (("torchattacks AutoAttack(version='rand') as shipped (APGD with 10 steps)", shipped),
                              ("AutoAttack rand as the original (APGD-CE + APGD-DLR, 100 steps, eot_iter 20), "
                               "from torchattacks' APGD", faithful)):
            torch.manual_seed(0)
            with evaluating(noisy):
                x_adv, seconds_aa = timed(lambda: attack(x, y))
                torch.manual_seed(1)
                one_pass = correct_every_time(noisy, x_adv, y, 1).float().mean().item()
                votes = correct_every_time(noisy, x_adv, y, RANDOMISED_VOTES).float().mean().item()
            add(label, f"robust {one_pass:.3f} counted with one pass, {votes:.3f} with {RANDOMISED_VOTES} votes;"
                       f" {seconds_aa:.0f}s ({seconds_aa / seconds:.2f}x the rand suite's time)")
    else:
        add("torchattacks AutoAttack(version='rand')", f"not measured: {why_not}")

    # 3. the price of EOT
    with evaluating(base), evaluating(noisy):
        (_, t_ours) = timed(lambda: apgd(base, x, y, eps=eps, steps=100, loss="ce", eot=1))
        if torchattacks is not None:
            plain = torchattacks.APGD(base, norm="Linf", eps=eps, steps=100, loss="ce", eot_iter=1, seed=0)
            (_, t_theirs) = timed(lambda: plain(x, y))
            add("APGD-CE-100, deterministic model: torchattacks (eot_iter=1) / repulsor (eot=1)",
                f"{t_theirs / t_ours:.2f}x ({t_theirs:.1f}s vs {t_ours:.1f}s)")
        (_, t_one) = timed(lambda: apgd(noisy, x, y, eps=eps, steps=100, loss="ce", eot=1))
        (_, t_twenty) = timed(lambda: apgd(noisy, x, y, eps=eps, steps=100, loss="ce", eot=20))
        add("APGD-CE-100, randomised model: eot=20 / eot=1", f"{t_twenty / t_one:.1f}x ({t_twenty:.1f}s vs {t_one:.1f}s)")

    t, trained = cfg.train, bench_training(run)
    model_line = (f"Model: {run.name}: {cfg.model.name}, {t.method}, eps {t.eps:g}, alpha {t.alpha:g}, "
                  f"PGD-{t.attack_steps}, {t.epochs} epochs, batch {t.batch_size}, lr {t.lr:g}, on the first "
                  f"{cfg.data.train_subset or 'all'} MNIST training images; {trained}.")
    lines = ["# bench/rand.py: the cost of evaluating a randomised defence", "",
             f"Machine: {info['cpu']}, {info['logical cores']} logical cores, torch {info['torch']}, "
             f"{info['torch threads (intra-op)']} threads; load at start {info['load average at start (1, 5, 15 min)']}.",
             "", f"Protocol: the PGD-AT MNIST small CNN ({how}) behind Gaussian input noise (sigma {SIGMA}, fresh at "
             f"every forward pass); the first {len(y)} MNIST test points, unshuffled; L-inf eps {eps:g}; seed 0; fp32; "
             "one process; every timing is one run (minutes-long runs, not micro-benchmarks).", "", model_line, "",
             "| measurement | value |", "| --- | --- |"]
    lines += [f"| {what} | {value} |" for what, value in rows]
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
