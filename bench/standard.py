#!/usr/bin/env python
"""The standard suite against AutoAttack's cascade on robust models: strength and time (issue 24).

    python bench/standard.py                          # every robust committed model: n = 500 (MNIST), 200 (CIFAR-10)
    python bench/standard.py --n 100 --models mnist/pgd_at    # one model, fewer points
    python bench/standard.py --profile mnist/trades --n 50    # where our time goes (cProfile), no reference
    python bench/standard.py --ours-only --models mnist/pgd_at --n 100   # ours alone: a change's effect
    python bench/standard.py --ours-only --search bf16 --n 100   # the attacks' passes in bf16, verdicts in fp32

On each robust model the repository commits (``MODELS``; a model whose weights are missing is named
with the command that makes it), on the first n test points of its data set at the threat model it
was trained for, one after the other in one process:

- **ours**: ``repulsor.evaluate(model, x, y, suite="standard")`` as a user calls it (APGD-CE,
  APGD-T with 9 targets, FAB-T with 9 targets, Square with 5000 queries, each on the points still
  robust, then the gradient-masking sanity checks);
- **the reference**: the same cascade built from torchattacks' ``APGD``, ``APGDT``, ``FAB`` and
  ``Square`` with AutoAttack's standard budgets (100 steps, 1 restart, 9 target classes, 5000
  queries, p_init 0.8), each run on the points the previous ones left robust, in batches of the same
  size. (torchattacks' own ``AutoAttack`` class runs APGD with 10 steps: not the standard version.)

It records per model the robust accuracy of both with its 95% interval, which points each broke
that the other did not (exact McNemar), the wall time of each attack and in all, and the ratio of
the times: the target is at most 0.5x the reference's time at equal or lower robust accuracy.
``bench/standard-robust.json`` keeps, per model and n, our first recorded robust points; a later run
whose robust accuracy is higher than that record's fails (exit status 1), whatever it saves;
``--ours-only`` also names the points it and the record disagree on. ``--search bf16`` (with
``--ours-only``, an experiment, not a product setting) runs every attack's passes under bf16 autocast
while each verdict (is the point still classified correctly?) stays an fp32 forward pass, to see
whether bf16 would change any result on the committed models. Writes
``bench/standard-results.md`` and prints it. torchattacks must be installed without its
dependencies (``pip install --no-deps torchattacks``: its torchvision does not work beside this torch).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402 - the benchmark's plumbing: paths, machine, torchattacks import

import torch  # noqa: E402

import repulsor  # noqa: E402
from repulsor import runtime  # noqa: E402
from repulsor.attacks import ATTACKS  # noqa: E402
from repulsor.attacks.context import batched, correct_every_time, evaluating  # noqa: E402
from repulsor.attacks.geometry import geometry  # noqa: E402
from repulsor.config import load_config  # noqa: E402
from repulsor.evaluation.run import load_test_split  # noqa: E402
from repulsor.formats import wilson_interval  # noqa: E402
from repulsor.paired import discordant, mcnemar_exact  # noqa: E402

RESULTS = HERE / "standard-results.md"
RECORD = HERE / "standard-robust.json"
# data set: (comparison folder, its config, points, the robust methods benchmarked)
COMPARISONS = {
    "mnist": ("results/compare-mnist-cpu", "configs/compare-mnist-cpu.toml", 500, ("pgd_at", "trades", "fgsm_rs")),
    "cifar10": ("results/compare-cifar10-fast-cpu", "configs/compare-cifar10-fast.toml", 200,
                ("fgsm_rs", "pgd_at", "trades", "prototype_at")),
}
# name: (run folder under the repository, points, the command that makes the model when it is missing)
MODELS = {f"{data}/{method}": (f"{folder}/{method}", n, f"repulsor compare {config} --out {folder} --only {method}")
          for data, (folder, config, n, methods) in COMPARISONS.items() for method in methods}
REFERENCE = ("apgd-ce", "apgd-t", "fab-t", "square")
TARGET_RATIO = 0.5


def reference_attacks(torchattacks, model, eps: float, n_classes: int) -> dict:
    """AutoAttack's standard cascade (L-inf) as torchattacks' classes, with AutoAttack's budgets."""
    return {
        "apgd-ce": torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
        "apgd-t": torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=n_classes,
                                     seed=0),
        "fab-t": torchattacks.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                                  n_classes=n_classes, seed=0),
        "square": torchattacks.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, p_init=0.8,
                                      seed=0),
    }


def run_reference(torchattacks, model, x, y, *, eps: float, batch_size: int) -> dict:
    """The reference cascade: each attack on the points still robust, in batches; per attack its time."""
    started = time.perf_counter()
    with evaluating(model):
        robust = batched(lambda xb, yb: correct_every_time(model, xb, yb), x, y, batch_size=batch_size, device="cpu")
        with torch.no_grad():
            n_classes = model(x[:1]).shape[1]
        attacks = reference_attacks(torchattacks, model, eps, n_classes)
        entries = []
        for name in REFERENCE:
            t0, index = time.perf_counter(), robust.nonzero().flatten()
            for start in range(0, len(index), batch_size):
                ids = index[start:start + batch_size]
                adv = attacks[name](x[ids], y[ids]).detach()
                worst = geometry("linf").norm((adv - x[ids]).double()).max().item()
                if worst > eps + 1e-5 or adv.min() < 0 or adv.max() > 1:  # the reference must play by the rules
                    raise RuntimeError(f"reference {name} left the threat model (L-inf {worst:.6f} > {eps})")
                robust[ids] = correct_every_time(model, adv, y[ids])
            entries.append({"name": name, "n_attacked": len(index), "seconds": time.perf_counter() - t0,
                            "accuracy": robust.float().mean().item()})
    return {"robust_indices": robust.nonzero().flatten().tolist(), "attacks": entries,
            "robust_accuracy": robust.float().mean().item(), "seconds": time.perf_counter() - started}


def run_ours(model, x, y, *, eps: float, batch_size: int) -> dict:
    started = time.perf_counter()
    result = repulsor.evaluate(model, x, y, suite="standard", eps=eps, batch_size=batch_size, seed=0)
    seconds = time.perf_counter() - started
    cascade = sum(a["seconds"] for a in result["attacks"])
    return {"robust_indices": result["robust_indices"], "clean_indices": result["clean_indices"],
            "attacks": [{k: a[k] for k in ("name", "n_attacked", "seconds", "accuracy")} for a in result["attacks"]],
            "robust_accuracy": result["robust_accuracy"], "clean_accuracy": result["clean_accuracy"],
            "seconds": seconds, "cascade_seconds": cascade,
            "sanity_ok": all(v["ok"] for v in result.get("sanity", []))}


def load(name: str, n: int | None):
    """The model, its first n test points and eps, or None and the command that makes the model."""
    folder, default_n, make = MODELS[name]
    run = bench.ROOT / folder
    if not (run / "model.safetensors").exists():
        return None, make
    cfg = load_config(run / "config.toml")
    data = Path(cfg.data.test_dir or cfg.data.data_dir)
    x, y, _ = load_test_split(cfg, n or default_n, str(data if data.is_absolute() else bench.ROOT / data))
    return (repulsor.load_model(run), x, y, cfg.eval.eps, cfg.eval.batch_size, folder), None


def profile_ours(name: str, n: int | None) -> int:
    loaded, make = load(name, n)
    if loaded is None:
        print(f"bench/standard.py: no model for {name}: make it with\n  {make}", file=sys.stderr)
        return 2
    model, x, y, eps, batch_size, _ = loaded
    profiler = cProfile.Profile()
    profiler.enable()
    ours = run_ours(model, x, y, eps=eps, batch_size=batch_size)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(f"{name}: ours on {len(y)} points in {ours['seconds']:.1f} s; per attack: " +
          ", ".join(f"{a['name']} {a['seconds']:.1f} s ({a['n_attacked']} attacked)" for a in ours["attacks"]))
    print(text.getvalue())
    return 0


def rose(before: dict | None, ours: dict) -> bool:
    """Whether our robust accuracy is above the model's first record: a regression, whatever it saves."""
    return before is not None and ours["robust_accuracy"] > before["robust_accuracy"]


@contextmanager
def search_in(precision: str):
    """Every attack the cascade looks up runs under bf16 autocast (``precision = "bf16"``); the
    cascade's verdicts, the clean pass and the sanity checks stay in fp32. fp32: nothing changes."""
    if precision == "fp32":
        yield
        return
    saved = dict(ATTACKS)

    def in_bf16(attack):
        def run(model, x, *args, **kwargs):
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return attack(model, x, *args, **kwargs)
        return run

    try:
        ATTACKS.update({name: in_bf16(attack) for name, attack in saved.items()})
        yield
    finally:
        ATTACKS.update(saved)


def ours_only(names, n: int | None, search: str = "fp32") -> int:
    """Ours alone on each model: time per attack and robust accuracy, checked against the record
    (exit 1 on a rise; the points broken only by one of them named) and not written anywhere; run
    it on the code before and after a change. ``search``: the precision of the attacks' passes."""
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    risen = []
    for name in names:
        loaded, make = load(name, n)
        if loaded is None:
            print(f"{name}: no weights; make them with {make}")
            continue
        model, x, y, eps, batch_size, _ = loaded
        with search_in(search):
            ours = run_ours(model, x, y, eps=eps, batch_size=batch_size)
        before = record.get(f"{name}@{len(y)}")
        if before is not None:
            now, then = set(ours["robust_indices"]), set(before["robust_indices"])
            differ = f"; broken now only {sorted(then - now)}, broken by the record only {sorted(now - then)}"
        print(f"{name} on {len(y)}, attacks in {search}: robust {100 * ours['robust_accuracy']:.1f}%"
              + ("" if before is None else f" (recorded {100 * before['robust_accuracy']:.1f}%{differ})")
              + f", {ours['seconds']:.1f} s (cascade {ours['cascade_seconds']:.1f} s: "
              + ", ".join(f"{a['name']} {a['seconds']:.1f}" for a in ours["attacks"]) + f"), {runtime.code_version()}",
              flush=True)
        if rose(before, ours):
            risen.append(name)
    for name in risen:
        print(f"REGRESSION: {name}'s robust accuracy is above its record", file=sys.stderr)
    return 1 if risen else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: every model whose weights exist")
    parser.add_argument("--n", type=int, help="test points per model (default: 500 for MNIST, 200 for CIFAR-10)")
    parser.add_argument("--profile", choices=sorted(MODELS), help="profile our suite on this model, and nothing else")
    parser.add_argument("--ours-only", action="store_true",
                        help="run ours alone and print its times (no reference, nothing written)")
    parser.add_argument("--search", choices=("fp32", "bf16"), default="fp32",
                        help="with --ours-only: the precision of the attacks' passes (verdicts stay fp32)")
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 1:
        parser.error(f"--n must be at least 1; got {args.n}")
    if args.search != "fp32" and not args.ours_only:
        parser.error("--search is an experiment of --ours-only: add --ours-only")
    if args.profile:
        return profile_ours(args.profile, args.n)
    if args.ours_only:
        return ours_only(args.models or list(MODELS), args.n, args.search)
    torchattacks, why_not = bench.import_torchattacks()
    if torchattacks is None:
        print(f"bench/standard.py: torchattacks cannot be imported ({why_not}); install it with\n"
              "  pip install --no-deps torchattacks", file=sys.stderr)
        return 2
    info = bench.machine()
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    rows, missing = [], []
    for name in args.models or list(MODELS):
        loaded, make = load(name, args.n)
        if loaded is None:
            missing.append((name, make))
            continue
        model, x, y, eps, batch_size, folder = loaded
        print(f"[{name}] {len(y)} points, L-inf eps {eps:g}, batches of {batch_size}", flush=True)
        ours = run_ours(model, x, y, eps=eps, batch_size=batch_size)
        print(f"  ours {ours['robust_accuracy']:.4f} in {ours['seconds']:.1f} s", flush=True)
        reference = run_reference(torchattacks, model, x, y, eps=eps, batch_size=batch_size)
        print(f"  reference {reference['robust_accuracy']:.4f} in {reference['seconds']:.1f} s", flush=True)
        key = f"{name}@{len(y)}"
        before = record.get(key)
        rows.append({"name": name, "run": folder, "n": len(y), "eps": eps, "batch_size": batch_size,
                     "ours": ours, "reference": reference, "before": before})
        if before is None:  # the first record stays the yardstick: later runs are judged against it
            record[key] = {"run": folder, "eps": eps, "robust_indices": ours["robust_indices"],
                           "robust_accuracy": ours["robust_accuracy"], "code_version": runtime.code_version(),
                           "reference_robust_indices": reference["robust_indices"]}
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    regressions = write(rows, missing, info)
    print(RESULTS.read_text())
    return 1 if regressions else 0


def _pct(indices: list, n: int) -> str:
    lo, hi = wilson_interval(len(indices), n)
    return f"{100 * len(indices) / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def write(rows: list, missing: list, info: dict) -> list:
    """Writes the results file; returns the models whose robust accuracy rose above their record."""
    lines = ["# The standard suite against AutoAttack's cascade (bench/standard.py)", "",
             "Ours: `repulsor.evaluate(model, x, y, suite=\"standard\")` with its sanity checks; the reference: torchattacks'"
             " APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and Square (5000 queries), 100 steps and 1 restart each, as"
             " AutoAttack's standard version, each on the points still robust, in batches of the same size. First n test"
             " points, L-inf at the model's training eps, seed 0, fp32, one process, one model after the other."
             f" Target: ours at most {TARGET_RATIO}x the reference's time, at equal or lower robust accuracy.", "",
             "| model | n | eps | clean | robust, ours | robust, reference | broken only by ours / only by the"
             " reference (McNemar p) | time, ours (cascade + checks) | time, reference | ratio | target met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    regressions = []
    for r in rows:
        ours, ref, n = r["ours"], r["reference"], r["n"]
        # robust by the reference but broken by ours = broken only by ours, and the other way round
        only_ref_robust, only_ours_robust = discordant(ref["robust_indices"], ours["robust_indices"], n)
        ratio = ours["seconds"] / ref["seconds"]
        met = ratio <= TARGET_RATIO and ours["robust_accuracy"] <= ref["robust_accuracy"]
        lines.append(f"| {r['name']} | {n} | {r['eps']:.4g} | {100 * ours['clean_accuracy']:.1f} |"
                     f" {_pct(ours['robust_indices'], n)} | {_pct(ref['robust_indices'], n)} |"
                     f" {only_ref_robust} / {only_ours_robust} (p = {mcnemar_exact(only_ref_robust, only_ours_robust):.2g}) |"
                     f" {ours['seconds']:.1f} s ({ours['cascade_seconds']:.1f} + {ours['seconds'] - ours['cascade_seconds']:.1f})"
                     f" | {ref['seconds']:.1f} s | {ratio:.2f}x | {'yes' if met else 'no'} |")
        before = r["before"]
        if rose(before, ours):
            regressions.append(r["name"])
    lines += ["", "Per attack: points attacked, seconds, robust accuracy after it (ours / reference).", "",
              "| model | " + " | ".join(REFERENCE) + " |", "| --- |" + " --- |" * len(REFERENCE)]
    for r in rows:
        cells = []
        for name in REFERENCE:
            o = next(a for a in r["ours"]["attacks"] if a["name"] == name)
            t = next(a for a in r["reference"]["attacks"] if a["name"] == name)
            cells.append(f"{o['n_attacked']}: {o['seconds']:.1f} s, {100 * o['accuracy']:.1f}% /"
                         f" {t['n_attacked']}: {t['seconds']:.1f} s, {100 * t['accuracy']:.1f}%")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Against the first record of each model and n (`bench/standard-robust.json`): a higher robust accuracy"
              " than recorded is a regression, whatever it saves.", ""]
    for r in rows:
        before, ours = r["before"], r["ours"]
        if before is None:
            lines.append(f"- {r['name']} on {r['n']}: recorded now (robust {100 * ours['robust_accuracy']:.1f}%).")
            continue
        now, then = set(ours["robust_indices"]), set(before["robust_indices"])
        verdict = "REGRESSION" if r["name"] in regressions else "ok"
        lines.append(f"- {r['name']} on {r['n']}: {verdict}: robust {100 * ours['robust_accuracy']:.1f}% now,"
                     f" {100 * before['robust_accuracy']:.1f}% recorded ({before['code_version']}); {len(now - then)}"
                     f" points robust now that were broken then, {len(then - now)} the other way.")
    if not all(r["ours"]["sanity_ok"] for r in rows):
        lines.append("- a sanity check warned on " + ", ".join(r["name"] for r in rows if not r["ours"]["sanity_ok"]))
    for name, make in missing:
        lines.append(f"- {name}: no weights; make them with `{make}`")
    lines += ["", f"repulsor {runtime.code_version()}, torchattacks {_version('torchattacks')}.", "",
              "Machine:", ""] + [f"- {k}: {v}" for k, v in info.items()]
    lines.append(f"- load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    RESULTS.write_text("\n".join(lines) + "\n")
    return regressions


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
