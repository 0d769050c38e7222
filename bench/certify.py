#!/usr/bin/env python
"""The cost of certified bounds: IBP, CROWN-IBP and CROWN on the MNIST test set (issue 25, item 6).

    python bench/certify.py                  # the whole test set; IBP and CROWN-IBP on 10,000 points,
                                             # full CROWN on as many as --crown-seconds allows
    python bench/certify.py --n 500 --crown-n 20   # a check that it works

The model is the committed IBP-trained small CNN (``results/certified-mnist/ibp``, trained by
``configs/mnist-ibp.toml``; the bench says how to make it when it is missing). On the first N MNIST
test points, L-inf eps 0.1 and 0.3, one process, the machine otherwise idle, it times
``repulsor.certify.certify`` per method and records the certified accuracy each reaches.
Targets: 10,000 points in under a minute with IBP and under 10 minutes with CROWN "with the tightest
intermediate bounds that fit in that time". Full CROWN computes every ReLU's input bounds by a
backward pass per neuron, so its cost grows with the square of the network's neurons; it runs on the
first points until ``--crown-seconds`` is spent, and the table gives its time per point and the
10,000-point time that implies. Writes bench/certify-results.md and prints it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402 - the benchmark's plumbing: paths and machine

import torch  # noqa: E402

import repulsor  # noqa: E402
from repulsor.certify import certify  # noqa: E402
from repulsor.config import load_config  # noqa: E402
from repulsor.evaluation.run import load_test_split  # noqa: E402

RESULTS = HERE / "certify-results.md"
RUN = bench.ROOT / "results" / "certified-mnist" / "ibp"
EPS = (0.1, 0.3)
BATCH = 32  # points per bound computation (IBP and CROWN-IBP): 500 ran slower here (17 s and 186 s at eps 0.1)
CROWN_BATCH = 1


def timed_certify(model, x, y, *, eps: float, method: str, batch_size: int) -> dict:
    started = time.perf_counter()
    result = certify(model, x, y, eps=eps, method=method, batch_size=batch_size)
    return dict(result, wall=time.perf_counter() - started)


def crown_until(model, x, y, *, eps: float, seconds: float, limit: int) -> dict:
    """Full CROWN on the first points, a batch at a time, until ``seconds`` are spent or ``limit`` points."""
    started, done, certified = time.perf_counter(), 0, 0
    while done < min(limit, len(y)) and time.perf_counter() - started < seconds:
        xb, yb = x[done:done + CROWN_BATCH], y[done:done + CROWN_BATCH]
        certified += sum(certify(model, xb, yb, eps=eps, method="crown", batch_size=CROWN_BATCH)["certified"])
        done += len(yb)
    return {"n": done, "certified_accuracy": certified / done if done else 0.0, "wall": time.perf_counter() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=RUN, help="the certified model's run folder")
    parser.add_argument("--n", type=int, default=10000, help="test points for IBP and CROWN-IBP (default 10,000)")
    parser.add_argument("--crown-n", type=int, default=10000, help="at most this many points for full CROWN")
    parser.add_argument("--crown-seconds", type=float, default=300.0, help="time given to full CROWN per eps")
    args = parser.parse_args(argv)
    if not (args.run / "model.safetensors").exists():
        print(f"bench/certify.py: no model in {args.run}: train it first with\n  repulsor train --config "
              f"configs/mnist-ibp.toml --out {args.run}", file=sys.stderr)
        return 2
    info = bench.machine()
    model = repulsor.load_model(args.run)
    cfg = load_config(args.run / "config.toml")
    x, y, _ = load_test_split(cfg, args.n, str(bench.MNIST_DIR))
    rows, attacked = [], {}
    for eps in EPS:
        # the other side of the bracket on the same points: PGD-20 (the quick suite), an upper bound
        attacked[eps] = repulsor.evaluate(model, x, y, suite="quick", eps=eps, batch_size=BATCH)["robust_accuracy"]
        print(f"eps {eps}: PGD-20 leaves {attacked[eps]:.4f}", flush=True)
        for method in ("ibp", "crown-ibp"):
            r = timed_certify(model, x, y, eps=eps, method=method, batch_size=BATCH)
            rows.append((eps, method, r["n"], r["certified_accuracy"], r["wall"]))
            print(f"eps {eps}: {method} {r['certified_accuracy']:.4f} on {r['n']} in {r['wall']:.1f} s", flush=True)
        r = crown_until(model, x, y, eps=eps, seconds=args.crown_seconds, limit=args.crown_n)
        rows.append((eps, "crown", r["n"], r["certified_accuracy"], r["wall"]))
        print(f"eps {eps}: crown {r['certified_accuracy']:.4f} on {r['n']} in {r['wall']:.1f} s", flush=True)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    write(args, info, clean, len(y), rows, attacked)
    print(RESULTS.read_text())
    return 0


def write(args, info: dict, clean: float, n: int, rows: list, attacked: dict) -> None:
    lines = [
        "# Certified bounds: what they cost (bench/certify.py)",
        "",
        f"Model: `{args.run.relative_to(bench.ROOT) if args.run.is_relative_to(bench.ROOT) else args.run}` (IBP-trained"
        f" small CNN, `configs/mnist-ibp.toml`), clean accuracy {100 * clean:.2f}% on the first {n} MNIST test points."
        f" L-inf threat model, the image box [0, 1] included. One process; IBP and CROWN-IBP in batches of {BATCH},"
        f" full CROWN in batches of {CROWN_BATCH} for at most {args.crown_seconds:g} s per eps.",
        "",
        "| eps | method | points | certified (lower bound) | PGD-20 on the first N (upper bound) | wall time |"
        " per 1,000 points | 10,000 points would take |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for eps, method, points, certified, wall in rows:
        per = wall / points * 1000 if points else float("nan")
        lines.append(f"| {eps:g} | {method} | {points} | {100 * certified:.2f}% | {100 * attacked[eps]:.2f}% |"
                     f" {wall:.1f} s | {per:.1f} s | {per * 10:.0f} s |")
    lines += ["", "Targets (issue 25): 10,000 points in under 60 s with IBP and under 600 s with CROWN.", "",
              "Machine:", ""] + [f"- {k}: {v}" for k, v in info.items()]
    lines.append(f"- load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
