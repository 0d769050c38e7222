"""``repulsor analyse``: every analysis of a trained run, written to ``RUN/analysis/``.

The numbers come from the analysis modules beside this one (``curve``, ``confusion``,
``overlap``, ``neighbours``, ``metrics``); the figures are drawn by ``repulsor.plots``, each PNG
with its numbers beside it as CSV or JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data as data_mod
from ..config import load_config, load_run_config
from ..errors import UserError
from ..evaluation import run as evaluation_run
from ..evaluation.cascade import evaluate
from ..plots.curves import plot_robustness_curves
from ..runtime import resolve_device
from ..store import files as ckpt
from ..store import layout
from ..store import run as store
from .confusion import adversarial_confusion
from .curve import curve_eps_values, robustness_curve
from .metrics import plot_metrics_over_epochs
from .neighbours import NEIGHBOUR_COUNTS, NeighbourGrid, draw_neighbours, find_neighbours
from .overlap import compare_runs_overlap


def _run_label(run_dir: Path, other: Path | None = None) -> str:
    name = run_dir.resolve().name
    if other is not None and other.resolve().name == name:
        return str(run_dir)
    return name


@dataclass
class Attacked:
    """One run's model and its PGD-20 adversarial examples ``x_adv`` of the analysed points."""

    label: str
    run_dir: Path
    model: torch.nn.Module
    x_adv: torch.Tensor
    clean_accuracy: float
    robust_accuracy: float


@dataclass
class Analysis:
    """What every step of ``analyse_run`` reads: the points, the threat model, where to write."""

    x: torch.Tensor
    y: torch.Tensor
    cfg: object
    out: Path
    device: torch.device
    quiet: bool

    def attack(self, label: str, run_dir: Path, model) -> Attacked:
        """The ``quick`` suite's PGD-20 on the points, at the run's eval threat model and seed."""
        e = self.cfg.eval
        result = evaluate(model, self.x, self.y, suite="quick", eps=e.eps, norm=e.norm, batch_size=e.batch_size,
                          seed=e.seed, device=self.device, quiet=self.quiet, checks=False)
        return Attacked(label, run_dir, model, result.pop("x_adv"), result["clean_accuracy"],
                        result["robust_accuracy"])

    def curve(self, model, eps_values) -> list[dict]:
        e = self.cfg.eval
        return robustness_curve(model, self.x, self.y, eps_values=eps_values, norm=e.norm, steps=20, seed=e.seed,
                                batch_size=e.batch_size, device=self.device)


def analyse_run(run_dir, *, n: int | None = None, other_run=None, eps_values=None, data_dir: str | None = None,
                quiet: bool = True, neighbours_k: int = 5, neighbour_pool: int = 5000, grid_rows: int = 8,
                neighbours_in: str = "predicted", device: str = "auto", overrides: list[str] = ()) -> dict:
    """Run every analysis on a trained run and write ``RUN/analysis/``.

    The adversarial examples are the ``quick`` suite's (PGD-20, step eps/4, random start,
    cross-entropy) at the run's ``[eval]`` threat model and seed, on the first ``n`` test
    points. Written: ``robustness_curve.png/.json`` (PGD-20 accuracy over ``eps_values``,
    default from the run's eps to twice it; the other run's too), ``confusion.png/.csv``
    (clean-correct points), ``neighbours.png/.json`` (up to ``grid_rows`` misclassified
    adversarial examples, a seeded sample, with their ``neighbours_k`` nearest correctly
    classified samples among the first ``neighbour_pool`` training images, of the predicted
    class or of ``all``; skipped with the reason when the training data is unavailable),
    ``epochs.png/.csv`` (when ``RUN/metrics.jsonl`` exists), ``overlap.json`` (with
    ``other_run``, a run on the same data set and points) and ``summary.json``.

    ``n`` defaults to the run's ``eval.n``; ``data_dir`` overrides the config's data folder;
    ``overrides`` change the run's ``eval.*`` and data-folder settings for this call
    (``"eval.eps=0.1"``); ``device``: ``auto``, ``cpu``, ``cuda``...

    Returns:
        The summary: ``paths`` (name -> file), ``n``, ``eps``, ``norm``, ``clean_accuracy``,
        ``robust_accuracy``, ``robustness_curve``, ``confusion`` (n_correct, n_fooled),
        ``neighbours`` (rows shown or why skipped), ``epochs``, ``overlap``.
    """
    if neighbours_in not in ("predicted", "all"):
        raise UserError(f"neighbours_in must be 'predicted' or 'all'; got {neighbours_in!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UserError(f"--n {n!r}: give at least one test point")
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    say = (lambda text: None) if quiet else (lambda text: print(f"[analyse] {text}", flush=True))
    model = store.load_model(run_dir, device=dev)
    cfg = load_run_config(run_dir, overrides)
    e = cfg.eval
    x, y, _ = evaluation_run.load_test_split(cfg, e.n if n is None else n, data_dir)
    job = Analysis(x, y, cfg, run_dir / "analysis", dev, quiet)
    paths: dict[str, str] = {}
    summary: dict = {"run": str(run_dir), "n": len(y), "eps": e.eps, "norm": e.norm, "seed": e.seed, "paths": paths}

    say(f"PGD-20 at eps={e.eps:.4g} ({e.norm}) on {len(y)} test points")
    other = None if other_run is None else Path(other_run)
    main = job.attack(_run_label(run_dir, other), run_dir, model)
    summary["clean_accuracy"], summary["robust_accuracy"] = main.clean_accuracy, main.robust_accuracy
    if other is not None:
        other = _other_run(job, other, run_dir, data_dir)
    attacked = [main] + ([other] if other is not None else [])

    eps_list = list(eps_values) if eps_values is not None else curve_eps_values(e.eps, e.norm)
    say(f"robustness curve over {len(eps_list)} eps values")
    summary["robustness_curve"] = {a.label: job.curve(a.model, eps_list) for a in attacked}
    written = plot_robustness_curves(summary["robustness_curve"], job.out / "robustness_curve.png",
                                     title=f"PGD-20 robustness curve ({data_mod.DATASETS[cfg.data.name].name})",
                                     norm=e.norm)
    paths["robustness_curve_png"], paths["robustness_curve_json"] = written["png"], written["json"]

    summary["confusion"] = _confusion(job, main, paths)
    say("nearest training neighbours")
    grid = NeighbourGrid(k=neighbours_k, pool=neighbour_pool, rows=grid_rows, restrict=neighbours_in)
    summary["neighbours"] = _neighbours(job, main, grid, data_dir, paths)
    summary.update(_epochs(job, attacked, paths))
    if other is not None:
        summary.update(_overlap(job, main, other, paths))

    paths["summary_json"] = str(job.out / "summary.json")
    ckpt.atomic_write_json(job.out / "summary.json", summary)
    say(f"wrote {job.out}")
    return summary


def _confusion(job: Analysis, main: Attacked, paths: dict) -> dict:
    """Figure 5a-b: the adversarial confusion matrix of the clean-correct points."""
    confusion = adversarial_confusion(main.model, job.x, job.y, main.x_adv, data_mod.DATASETS[job.cfg.data.name].classes,
                                      job.out / "confusion", batch_size=job.cfg.eval.batch_size, device=job.device,
                                      title=f"Adversarial confusion ({main.label})")
    paths["confusion_png"], paths["confusion_csv"] = confusion["png"], confusion["csv"]
    return {"n_correct": confusion["n_correct"], "n_fooled": confusion["n_fooled"]}


def _neighbours(job: Analysis, main: Attacked, grid: NeighbourGrid, data_dir, paths: dict) -> dict:
    """Figure 5c: misclassified adversarial examples beside their nearest training samples."""
    found = find_neighbours(main.model, job.cfg, (job.x, job.y, main.x_adv), grid, data_dir=data_dir,
                            seed=job.cfg.eval.seed, batch_size=job.cfg.eval.batch_size, device=job.device)
    if "skipped" in found:
        return found
    written = draw_neighbours(found, data_mod.DATASETS[job.cfg.data.name].classes, job.out / "neighbours.png")
    paths["neighbours_png"], paths["neighbours_json"] = written["png"], written["json"]
    return {key: found[key] for key in NEIGHBOUR_COUNTS}


def _other_run(job: Analysis, other_run: Path, run_dir: Path, data_dir) -> Attacked:
    """The second run of a comparison, attacked on the same points (refused on other data)."""
    other_model = store.load_model(other_run, device=job.device)
    other_cfg = load_config(other_run / layout.CONFIG)
    if other_cfg.data.name != job.cfg.data.name:
        raise UserError(f"{other_run} was trained on {other_cfg.data.name}, {run_dir} on {job.cfg.data.name}; "
                        "compare runs on the same data set")
    other_x, other_y, _ = evaluation_run.load_test_split(other_cfg, len(job.y), data_dir, say=lambda text: None)
    if other_x.shape != job.x.shape or not torch.equal(other_x, job.x) or not torch.equal(other_y, job.y):
        raise UserError(f"{other_run} and {run_dir} do not use the same test points; pass the same --data-dir")
    return job.attack(_run_label(other_run, run_dir), other_run, other_model)


def _epochs(job: Analysis, attacked: list[Attacked], paths: dict) -> dict:
    """Figure 4: validation accuracy over the epochs of every run that recorded metrics."""
    metrics = {a.label: a.run_dir / layout.METRICS for a in attacked if (a.run_dir / layout.METRICS).exists()}
    if attacked[0].label not in metrics:
        return {}
    written = plot_metrics_over_epochs(metrics, job.out / "epochs.png")
    paths["epochs_png"], paths["epochs_csv"] = written["png"], written["csv"]
    return {"epochs": written["runs"]}


def _overlap(job: Analysis, main: Attacked, other: Attacked, paths: dict) -> dict:
    """Section 5: the overlap of the two runs' misclassified adversarial examples."""
    e = job.cfg.eval
    overlap = {"run_a": str(main.run_dir), "run_b": str(other.run_dir), "eps": e.eps, "norm": e.norm,
               **compare_runs_overlap(main.model, other.model, job.x, job.y, main.x_adv, other.x_adv,
                                      batch_size=e.batch_size, device=job.device)}
    ckpt.atomic_write_json(job.out / "overlap.json", overlap)
    paths["overlap_json"] = str(job.out / "overlap.json")
    return {"overlap": overlap, "other_run": {"run": str(other.run_dir), "clean_accuracy": other.clean_accuracy,
                                              "robust_accuracy": other.robust_accuracy}}


def summary_lines(summary: dict) -> list[str]:
    """The key numbers of an ``analyse_run`` summary, one line each, for the command line."""
    def pct(value) -> str:
        return "–" if value is None else f"{100 * value:.1f}%"

    lines = [f"analysis of {summary['run']}: first {summary['n']} test points, {summary['norm']} eps ="
             f" {summary['eps']:.4g}, seed {summary['seed']}",
             f"  clean {pct(summary['clean_accuracy'])}, PGD-20 (CE) {pct(summary['robust_accuracy'])}"]
    for label, rows in summary.get("robustness_curve", {}).items():
        points = ", ".join(f"{row['eps']:.4g}: {pct(row['accuracy'])}" for row in rows)
        lines.append(f"  robustness curve of {label} (eps: PGD-20 accuracy): {points}")
    confusion = summary.get("confusion")
    if confusion:
        lines.append(f"  adversarial confusion: {confusion['n_fooled']} of {confusion['n_correct']} clean-correct"
                     " points fooled")
    neighbours = summary.get("neighbours") or {}
    if "skipped" in neighbours:
        lines.append(f"  neighbours: skipped ({neighbours['skipped']})")
    other = summary.get("other_run")
    if other:
        line = (f"  other run {other['run']}: clean {pct(other['clean_accuracy'])}, PGD-20 (CE)"
                f" {pct(other['robust_accuracy'])}")
        overlap = summary["overlap"]
        if overlap.get("jaccard") is not None:
            line += (f"; misclassified by both: {overlap['n_both']} of the {overlap['n_either']} misclassified by"
                     f" either (Jaccard {overlap['jaccard']:.3f})")
        lines.append(line)
    return lines


