"""CUDA smoke test of the whole compare pipeline on synthetic CIFAR-shaped data, at tiny sizes.

Runs ``repulsor.compare`` on configs/compare-cifar10-fast.toml and configs/compare-cifar10-paper.toml
(every method, every suite, sanity checks, curves, transfer) and ``build_report`` on the device,
with the data loaders replaced by synthetic images, so every code path the real runs take meets
CUDA once. Numbers mean nothing; only crashes and warnings do.

    python bench/gpu/cuda_smoke.py OUT_DIR [cuda|cpu] [tiny]

``tiny`` (for a CPU dry run of this script) shrinks the suites and keeps only ce and pcl.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
import tomllib
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import repulsor.data as data_mod  # noqa: E402
import repulsor.evaluation.run as eval_run  # noqa: E402
import repulsor.training.loop as loop_mod  # noqa: E402
from repulsor.compare.run import compare  # noqa: E402
from repulsor.evaluation import suites as suites_mod  # noqa: E402
from repulsor.report.build import build_report  # noqa: E402

OUT = Path(sys.argv[1])
DEVICE = sys.argv[2] if len(sys.argv) > 2 else "cuda"
TINY = len(sys.argv) > 3 and sys.argv[3] == "tiny"
NAN = len(sys.argv) > 3 and sys.argv[3] == "nan"  # does mmc/pcl diverge in fp32 too, or at a lower lr?
SIZES = {"train": 256 if TINY else 4096, "val": 128, "test": 64, "train_full": 384 if TINY else 4224}
TEMPLATES = torch.rand(10, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def fake_load_dataset(name, split, *, data_dir=None, download=False, val_size=None, split_seed=0):
    """Learnable synthetic CIFAR-10: a class template plus noise, labels at random."""
    g = torch.Generator().manual_seed(["train", "val", "test", "train_full"].index(split) + 1)
    n = SIZES[split]
    y = torch.randint(0, 10, (n,), generator=g)
    x = (0.8 * TEMPLATES[y] + 0.2 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)
    return x, y


data_mod.load_dataset = loop_mod.load_dataset = eval_run.load_dataset = fake_load_dataset

if TINY:
    for name, specs in list(suites_mod.SUITES.items()):
        suites_mod.SUITES[name] = [dataclasses.replace(s, steps=min(s.steps, 3), settings={
            k: (2 if k == "n_targets" else v) for k, v in s.settings.items()}) for s in specs]


def log(text: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {text}", flush=True)


def config(path: str, methods_keep=None, **train) -> dict:
    raw = tomllib.loads((ROOT / path).read_text())
    raw["train"].update(train)
    for table in raw.get("method", {}).values():
        table.get("train", {}).pop("epochs", None)
    if methods_keep:
        raw["compare"]["methods"] = [m for m in raw["compare"]["methods"] if m in methods_keep]
        raw["method"] = {m: t for m, t in raw.get("method", {}).items() if m in methods_keep}
    return raw


def summary(report: dict) -> None:
    for name, run in report["runs"].items():
        log(f"  {name}: status {run['status']} error {run['error']} clean {run['clean_accuracy']} "
            f"worst {run['worst_case']} transfer {run['transfer_accuracy']}")
        for suite, s in run["suites"].items():
            bad = [a["name"] + ":" + a["status"] for a in s["attacks"] if a["status"] != "done"]
            if bad:
                log(f"    {suite} not done: {bad}")
        for warning in run["sanity_warnings"]:
            log(f"    WARN {warning}")
    log(f"  transfer: {report['transfer'] and {k: v for k, v in report['transfer'].items() if k != 'targets'}}")


def stage(name, fn):
    started = time.time()
    log(f"{name}: start")
    try:
        result = fn()
        log(f"{name}: ok in {time.time() - started:.1f}s")
        return result
    except BaseException:  # noqa: BLE001 - a smoke test reports every failure and goes on
        log(f"{name}: FAILED after {time.time() - started:.1f}s")
        traceback.print_exc()
        sys.stdout.flush()
        return None


def main() -> None:
    log(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no gpu'}, device {DEVICE}, tiny {TINY}")
    keep = ("ce", "pcl") if TINY else ("mmc", "pcl") if NAN else None
    common = [f"train.device={DEVICE!r}".replace("'", '"'), "train.val_n=64", "train.val_attack_steps=3",
              "prototypes.epochs=5", "eval.batch_size=16"]
    width = 0.125 if TINY else 0.25

    fast = config("configs/compare-cifar10-fast.toml", keep, epochs=1 if TINY else 3,
                  batch_size=128 if TINY else 512)
    fast_over = common + [f"model.width={width}", "data.train_subset=0", "compare.eval_n=24",
                          "compare.curve_n=16", "compare.sweep_dims=[50]",
                          "compare.suite_n={standard = 16}" if TINY else "compare.suite_n={standard = 24, adaptive = 16}"]
    if TINY:
        fast["compare"]["suites"] = ["quick", "standard"]
    if NAN:
        fast["compare"]["suites"] = ["quick"]
        fast["compare"]["transfer"] = False
        fast["compare"].pop("suite_n", None)
        fast_over = [o for o in fast_over if not o.startswith(("compare.suite_n", "compare.sweep_dims"))]
        fast_over.append("compare.sweep_dims=[]")
        for label, extra in (("fp32", ['train.precision="fp32"']), ("bf16", ['train.precision="bf16"']),
                             ("bf16-lr0.5", ['train.precision="bf16"', "train.lr=0.5"]),
                             ("fp32-lr0.5", ['train.precision="fp32"', "train.lr=0.5"]),
                             ("bf16-lr0.15", ['train.precision="bf16"', "train.lr=0.15"])):
            report = stage(f"compare {label}", lambda: compare(fast, OUT / label, quiet=True, overrides=fast_over + extra))
            if report:
                summary(report)
        return
    report = stage("compare fast", lambda: compare(fast, OUT / "fast", quiet=True, overrides=fast_over))
    if report:
        summary(report)
        stage("report fast", lambda: build_report([OUT / "fast"], OUT / "fast-report", device=DEVICE, quiet=True))
        stage("compare fast again (resume, cached)", lambda: compare(fast, OUT / "fast", quiet=True,
                                                                      overrides=fast_over))

    paper = config("configs/compare-cifar10-paper.toml", keep, epochs=1, batch_size=128, attack_steps=3)
    paper_over = common + [f"model.width={width / 2}", "data.train_subset=1024", "compare.eval_n=16",
                           "compare.curve_n=8", "compare.sweep_dims=[50]", "compare.suite_n={standard = 8}"]
    report = stage("compare paper", lambda: compare(paper, OUT / "paper", quiet=True, overrides=paper_over))
    if report:
        summary(report)


if __name__ == "__main__":
    main()
