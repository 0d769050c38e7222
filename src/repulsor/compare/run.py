"""Compare training methods under one protocol: the paper's Tables 1-4 and Figures 2-4.

``compare`` reads the plan (``compare.plan``: the compare config, one validated config per
run), trains each run into ``OUT/<name>`` with the one training loop, evaluates it suite by
suite with ``evaluation.run.evaluate_run``, and writes ``comparison.json`` (every number, and
the data of the tables: ``compare.tables``), ``tables.md``, ``robustness_curves.png/.json``
and ``epochs.png/.csv`` into ``OUT``. Everything is resumable: a finished run is never
retrained, an interrupted one is resumed from its checkpoint, a suite already in a run's
``results.json`` for the same points and threat model is not run again, and the robustness
curves and the transfer attack's adversarial examples are cached in ``OUT/cache`` under a
fingerprint of the model weights.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..analyses import plot_metrics_over_epochs, read_metrics, robustness_curve
from ..analyses.transfer import transfer_accuracy
from ..certify import certify, network_layers
from ..config import Config, load_config, to_dict
from ..data import DATASETS
from ..errors import Interrupted, UserError
from ..evaluation import run as evaluation_run
from ..evaluation.run import same_points
from ..plots.curves import plot_robustness_curves
from ..formats import wilson_interval
from ..runtime import provenance, resolve_device
from ..store import files as ckpt
from ..store import run as store
from ..store.layout import COMPARISON, CONFIG, LAST, METRICS, MODEL, TABLES
from ..training.loop import TrainingStopped, train
from ..training.methods import METHODS
from .plan import TRANSFER_SOURCE, ComparePlan, RunPlan, load_compare_config
from .tables import format_tables


CURVE_STEPS = 20
CURVE_LOSS = "ce"


def _fingerprint(path: Path) -> str:
    """SHA-256 of a file: identifies the weights that a cached result was computed from."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_existing(run: RunPlan, run_dir: Path) -> None:
    """Refuse to reuse a run folder trained with a different config (it would mix protocols).
    Settings that cannot change the weights (the data's folders, the device) may differ, so that a
    committed or moved run folder is reused where its data lies elsewhere."""
    saved = to_dict(load_config(run_dir / CONFIG))
    wanted = to_dict(run.cfg)
    # Settings that only other methods read (fgsm_rs's overfit_drop for a ce run, ...) do not matter.
    others = {("train", key) for m in METHODS.values() for key in m.options} - {
        ("train", key) for key in METHODS[run.method].options}
    for section in ("data", "model", "prototypes", "train"):
        for key, value in wanted[section].items():
            if not store.decides_weights(section, key) or (section, key) in others or saved[section].get(key) == value:
                continue
            raise UserError(f"{run_dir} was trained with {section}.{key} = {saved[section].get(key)!r}, but the compare"
                            f" config asks for {value!r}; delete that folder to retrain it, or use another --out")


def _train_run(run: RunPlan, run_dir: Path, *, quiet: bool, say) -> tuple[str, str | None]:
    """Train (or resume, or skip) one run; returns (what was done, the error of a failed run).

    A run whose loss became NaN or infinite is reported as failed and the comparison goes
    on; an interruption (SIGINT/SIGTERM) stops the whole comparison after the checkpoint.
    """
    if (run_dir / CONFIG).exists():
        _check_existing(run, run_dir)
    if (run_dir / MODEL).exists():
        return "trained before", None
    try:
        if (run_dir / CONFIG).exists():
            say(f"{run.name}: resuming the interrupted training in {run_dir}")
            train(None, run_dir, resume=True, quiet=quiet)
            return "resumed", None
        say(f"{run.name}: training ({run.cfg.train.epochs} epochs) into {run_dir}")
        train(run.cfg, run_dir, quiet=quiet)
        return "trained", None
    except Interrupted as error:
        raise Interrupted(f"{error}; or run the same repulsor compare command again to continue") from None
    except TrainingStopped as error:
        say(f"{run.name}: training failed: {error}")
        return "failed", str(error)


def _cached(path: Path, key: dict, compute):
    """The value stored in JSON file ``path`` under ``key``, or ``compute()`` stored there."""
    if path.exists():
        try:
            stored = ckpt.read_json(path, "cache file")
            if stored.get("key") == key:
                return stored["value"]
        except UserError:
            pass  # a corrupt cache is recomputed
    value = compute()
    ckpt.atomic_write_json(path, {"key": key, "value": value})
    return value


def _transfer(out: Path, models: dict, x, y, protocol: dict, *, device, quiet: bool, say) -> dict:
    """Table 4: the ce model's quick-suite examples, evaluated on every trained model."""
    source_dir = out / TRANSFER_SOURCE
    if TRANSFER_SOURCE not in models:
        return {"source": TRANSFER_SOURCE, "skipped": f"the {TRANSFER_SOURCE} model is not trained yet"}
    key = {"source": _fingerprint(source_dir / MODEL), "n": len(y), **protocol}
    cache = out / "cache" / f"transfer-{TRANSFER_SOURCE}.safetensors"
    x_adv = None
    if cache.exists():
        try:
            tensors, meta = ckpt.load_tensors(cache, "cache file")
            x_adv = tensors["x_adv"] if meta.get("key") == key else None
        except (UserError, KeyError):
            x_adv = None
    if x_adv is None:
        say(f"transfer: crafting PGD-20 examples on the {TRANSFER_SOURCE} model ({len(y)} points)")
    result = transfer_accuracy(models[TRANSFER_SOURCE], models, x, y, eps=protocol["eps"], norm=protocol["norm"],
                               seed=protocol["seed"], batch_size=protocol["batch_size"], device=device, x_adv=x_adv,
                               quiet=quiet)
    if x_adv is None:
        ckpt.save_tensors(cache, {"x_adv": result["x_adv"]}, {"key": key})
    result.pop("x_adv")
    return {"source": TRANSFER_SOURCE, **result}


def _training_record(run_dir: Path) -> dict:
    record = store.read_training(run_dir)
    if record is None:
        return {}
    stopped = None
    metrics = run_dir / METRICS
    if metrics.exists():
        stopped = next((r["stopped"] for r in reversed(read_metrics(metrics)) if r.get("stopped")), None)
    return {"selected": record.get("selected"), "best_epoch": record.get("best_epoch"), "stopped": stopped,
            "cost": record.get("cost", {})}


def _attack_accuracy(suite_result: dict | None, prefix: str):
    if not suite_result:
        return None
    return next((a["accuracy"] for a in suite_result["attacks"]
                 if a["name"].startswith(prefix) and a.get("status", "done") == "done"), None)


def _run_report(plan: ComparePlan, run: RunPlan, run_dir: Path, status: tuple, protocol: dict, n_test: int) -> dict:
    """Every number of one run: accuracies per suite, the table's columns, training cost."""
    results = store.read_results(run_dir)
    suites = {}
    for suite in plan.suites:
        n = min(plan.n_for(suite), n_test)
        if evaluation_run.suite_done(results, suite, n, protocol_keys(protocol)):
            entry = results["suites"][suite]
            suites[suite] = {
                "n": entry["n"], "clean_accuracy": entry["clean_accuracy"], "robust_accuracy": entry["robust_accuracy"],
                **{k: entry[k] for k in ("robust_indices", "clean_indices") if k in entry},
                "attacks": [{**{k: a[k] for k in ("name", "attack", "loss", "steps", "restarts", "accuracy", "seconds")},
                             "status": a.get("status", "done")} for a in entry["attacks"]],
                **({"sanity": entry["sanity"]} if "sanity" in entry else {}),
            }
    n_eval = min(plan.eval_n, n_test)
    clean = next((s["clean_accuracy"] for s in suites.values() if s["n"] == n_eval), None)
    training = _training_record(run_dir)
    cost = training.get("cost", {})
    return {
        "name": run.name, "method": run.method, "dim": run.cfg.prototypes.dim if METHODS[run.method].uses_prototypes else None,
        "overrides": run.overrides, "status": status[0], "error": status[1], "run_dir": str(run_dir),
        "epochs": cost.get("epochs"), "selected": training.get("selected"), "stopped": training.get("stopped"),
        "clean_accuracy": clean,
        "pgd20": _attack_accuracy(suites.get("paper"), "pgd-20"),
        "pgd100": _attack_accuracy(suites.get("paper"), "pgd-100"),
        "pgd20_ce": _attack_accuracy(suites.get("quick"), "pgd-20"),
        "standard": suites["standard"]["robust_accuracy"] if "standard" in suites else None,
        "worst_case": {name: s["robust_accuracy"] for name, s in suites.items()},
        "sanity_warnings": [f"{name}: {v['message']}" for name, s in suites.items() for v in s.get("sanity", [])
                            if not v["ok"]],
        "suites": suites,
        "transfer_accuracy": None,
        "certified": None,  # compare.certify's lower bound, filled by _certify
        "cost": {k: cost.get(k) for k in ("wall_seconds", "epochs", "forward_passes_per_example",
                                          "backward_passes_per_example")} if cost else None,
        "config": to_dict(run.cfg),
        "intervals": _intervals(clean, n_eval, suites),
    }


def _intervals(clean, n_eval: int, suites: dict) -> dict:
    """``<column>_ci95``: the 95% Wilson interval of each accuracy of the run's table row, on the points
    its suite ran on (absent where the number is)."""
    out = {}
    columns = [("clean_accuracy", clean, n_eval),
               ("pgd20", _attack_accuracy(suites.get("paper"), "pgd-20"), (suites.get("paper") or {}).get("n")),
               ("pgd100", _attack_accuracy(suites.get("paper"), "pgd-100"), (suites.get("paper") or {}).get("n")),
               ("pgd20_ce", _attack_accuracy(suites.get("quick"), "pgd-20"), (suites.get("quick") or {}).get("n")),
               ("standard", (suites.get("standard") or {}).get("robust_accuracy"), (suites.get("standard") or {}).get("n"))]
    for key, value, n in columns:
        if value is not None and n:
            out[f"{key}_ci95"] = [round(b, 6) for b in wilson_interval(round(value * n), int(n))]
    return out


def _table4(job: CompareJob, models: dict, runs: dict, device) -> dict:
    """Table 4: transfer from the ce model, with each target's accuracy recorded in its run."""
    n = job.n()
    transfer = _transfer(job.out, models, job.x[:n], job.y[:n], job.protocol, device=device, quiet=job.quiet,
                         say=job.say)
    for name, target in transfer.get("targets", {}).items():
        runs[name]["transfer_accuracy"] = target["accuracy"]
    if "source_accuracy" in transfer:
        white_box = runs[TRANSFER_SOURCE]["pgd20_ce"]
        transfer["white_box_pgd20_ce"] = white_box
        transfer["matches_white_box"] = None if white_box is None else transfer["source_accuracy"] == white_box
    return transfer


def _comparison(job: CompareJob, runs: dict, transfer: dict | None, *, curves: dict, epochs: dict, folder) -> dict:
    """The content of ``comparison.json``: the protocol, the config, every run's numbers, the figures' data."""
    plan, n_test = job.plan, len(job.y)
    return {
        "protocol": {
            "dataset": DATASETS[plan.base.data.name].name, "split": "test", "test_dir": str(folder or ""),
            "n": job.n(), "suite_n": {s: job.n(s) for s in plan.suites}, "suites": list(plan.suites),
            **job.protocol, "precision": "fp32",
            "curve": {"eps": list(plan.curve_eps), "n": min(plan.curve_n, n_test), "steps": CURVE_STEPS,
                      "loss": CURVE_LOSS} if plan.curve_n else None,
            "transfer": None if transfer is None else {"source": TRANSFER_SOURCE, **transfer.get("attack", {})},
            **provenance(),
        },
        "config": {"compare": plan.describe(), "shared": _shared_dict(plan.base), "method_overrides": plan.method_overrides},
        "methods": list(plan.methods),
        "runs": runs,
        "table1": [{"dim": dim, "run": name, **{k: runs[name][k] for k in ("epochs", "clean_accuracy", "pgd20",
                                                                          "pgd20_ce", "standard")}}
                   for dim, name in plan.sweep],
        "transfer": transfer,
        "seeds": _seeds(plan, runs),
        "curves": curves,
        "epochs": epochs,
        "files": job.files,
    }


def _not_certifiable(model) -> str:
    """Why the certified bounds do not cover ``model`` ("" when they do)."""
    try:
        network_layers(model)
    except UserError as error:
        return str(error)
    return ""


def _certify(job: CompareJob, runs: dict, models: dict) -> None:
    """compare.certify: each finished run's certified accuracy on the standard suite's points (the lower side
    of its bracket), read from its results.json or computed once and recorded there; a model the bounds do
    not cover gets the reason in ``certified_note`` instead of a number."""
    plan = job.plan
    if not plan.certify:
        return
    n, eps, norm = min(plan.certify_n(), len(job.y)), job.protocol["eps"], job.protocol["norm"]
    for name, model in models.items():
        record = next((c for c in (store.read_results(job.out / name).get("certified") or {}).values()
                       if c.get("method") == plan.certify and same_points(c, {"n": n, "eps": eps, "norm": norm})), None)
        if record is None:
            reason = _not_certifiable(model)
            if reason:
                runs[name]["certified_note"] = reason
                continue
            job.say(f"{name}: certifying ({plan.certify}) the first {n} test points")
            record = evaluation_run.certify_run(job.out / name, method=plan.certify, n=n, eps=eps, norm=norm)
        runs[name]["certified"] = record["certified_accuracy"]
        runs[name]["intervals"]["certified_ci95"] = [
            round(b, 6) for b in wilson_interval(round(record["certified_accuracy"] * n), n)]


SEED_COLUMNS = ("clean_accuracy", "pgd20", "pgd100", "pgd20_ce", "standard", "certified")


def _seeds(plan: ComparePlan, runs: dict) -> dict | None:
    """compare.seeds: per method, every seed's figure of each table column, their mean and sample standard
    deviation (over the seeds that have the figure); None for a one-seed comparison."""
    if len(plan.seeds) < 2:
        return None
    summary = {}
    for method in plan.methods:
        seed_runs = plan.seed_runs(method)
        entry = {"seeds": [r.seed for r in seed_runs], "runs": [r.name for r in seed_runs]}
        for key in SEED_COLUMNS:
            values = [runs[r.name].get(key) for r in seed_runs]
            present = [v for v in values if v is not None]
            entry[key] = {"values": values, "mean": statistics.fmean(present) if present else None,
                          "std": statistics.stdev(present) if len(present) > 1 else None}
        summary[method] = entry
    return summary


def protocol_keys(protocol: dict) -> dict:
    """The threat-model keys that a suite result in ``results.json`` must match."""
    return {k: protocol[k] for k in ("eps", "norm", "seed")}


def _shared_dict(base: Config) -> dict:
    """The shared sections as resolved; the method is set per run, so it is left out."""
    shared = to_dict(base)
    del shared["train"]["method"]
    return shared


def _select(plan: ComparePlan, only) -> list[RunPlan]:
    if not only:
        return list(plan.runs)
    names = [r.name for r in plan.runs]
    for name in only:
        if name not in names:
            raise UserError(f"--only {name}: not a run of this comparison; choose from {', '.join(names)}")
    return [r for r in plan.runs if r.name in set(only)]


def _train_and_evaluate(job: CompareJob, selected: list[RunPlan]) -> dict:
    """Train (or resume) each selected run and run its missing suites; returns ``{name: (status, error)}``."""
    plan, out, protocol, quiet, say = job.plan, job.out, job.protocol, job.quiet, job.say
    status = {}
    for index, run in enumerate(selected, 1):
        say(f"[{index}/{len(selected)}] {run.name}")
        status[run.name] = _train_run(run, out / run.name, quiet=quiet, say=say)
        if not (out / run.name / MODEL).exists():
            continue
        results = store.read_results(out / run.name)
        for suite in plan.suites:
            n = job.n(suite)
            if evaluation_run.suite_done(results, suite, n, protocol_keys(protocol)):
                continue
            say(f"{run.name}: evaluating suite {suite} on {n} test points")
            results = evaluation_run.evaluate_run(out / run.name, suite=suite, n=n, quiet=quiet, **protocol)
    for run in plan.runs:
        if run.name not in status:
            run_dir = out / run.name
            status[run.name] = ("trained before" if (run_dir / MODEL).exists() else
                                "training unfinished" if (run_dir / LAST).exists() or (run_dir / CONFIG).exists()
                                else "not trained", None)
    return status


@dataclass
class CompareJob:
    """One comparison being run: its plan, its folder, the shared threat model (``protocol``:
    eps, norm, seed, batch size), all test points ``x``/``y``, and the files written so far."""

    plan: ComparePlan
    out: Path
    protocol: dict
    x: torch.Tensor
    y: torch.Tensor
    quiet: bool
    say: Callable[[str], None]
    files: dict = field(default_factory=dict)

    def n(self, suite: str | None = None) -> int:
        """The points a suite (None: the comparison's eval_n) is evaluated on."""
        return min(self.plan.n_for(suite) if suite else self.plan.eval_n, len(self.y))


def _curves(job: CompareJob, runs: list[RunPlan], models: dict, device) -> dict:
    """Figures 2-3: PGD-20 robustness curves of every method on the same points (cached per model), with
    compare.certify's certified accuracy at each eps beside them for every model the bounds cover."""
    plan, out, protocol, say = job.plan, job.out, job.protocol, job.say
    x_all, y_all = job.x, job.y
    if not plan.curve_n or not runs:
        return {}
    n_curve = min(plan.curve_n, len(y_all))
    curves = {}
    for run in runs:
        key = {"model": _fingerprint(out / run.name / MODEL), "n": n_curve, "eps": list(plan.curve_eps),
               "steps": CURVE_STEPS, "loss": CURVE_LOSS, **protocol_keys(protocol),
               **({"certify": plan.certify} if plan.certify else {})}

        def compute(run=run):
            say(f"{run.name}: robustness curve over {len(plan.curve_eps)} eps values on {n_curve} points")
            curve = robustness_curve(models[run.name], x_all[:n_curve], y_all[:n_curve], eps_values=plan.curve_eps,
                                     norm=protocol["norm"], steps=CURVE_STEPS, loss=CURVE_LOSS, seed=protocol["seed"],
                                     batch_size=protocol["batch_size"], device=device)
            if plan.certify and not _not_certifiable(models[run.name]):
                for entry in curve:
                    entry["certified"] = certify(models[run.name], x_all[:n_curve], y_all[:n_curve], eps=entry["eps"],
                                                 norm=protocol["norm"], method=plan.certify)["certified_accuracy"]
            return curve

        curves[run.name] = _cached(out / "cache" / f"curve-{run.name}.json", key, compute)
    written = plot_robustness_curves(curves, out / "robustness_curves.png", norm=protocol["norm"],
                                     title=f"PGD-{CURVE_STEPS} robustness curves ({plan.base.data.name})")
    job.files["robustness_curves_png"], job.files["robustness_curves_json"] = written["png"], written["json"]
    return curves


def _epochs(job: CompareJob, runs: list[RunPlan]) -> dict:
    """Figure 4: clean and robust validation accuracy over the epochs of every method."""
    plan, out, files = job.plan, job.out, job.files
    metrics = {r.name: out / r.name / METRICS for r in runs if (out / r.name / METRICS).exists()}
    if not metrics:
        return {}
    written = plot_metrics_over_epochs(metrics, out / "epochs.png",
                                       title=f"Validation accuracy during training ({plan.base.data.name})")
    files["epochs_png"], files["epochs_csv"] = written["png"], written["csv"]
    return written["runs"]


def compare(config, out_dir, *, quiet: bool = False, only=None, overrides: list[str] = ()) -> dict:
    """Train, evaluate and compare every method of a compare config under one protocol.

    Resumable at every level: a run with ``model.safetensors`` is not retrained, a run
    with a config but no model is resumed from its checkpoint, a suite already in a run's
    ``results.json`` for the same points and threat model is not re-run, and the
    robustness curves and transfer examples are cached under the weights' fingerprint.

    Args:
        config: a compare TOML file or the same data as a dict (see the module docstring).
        out_dir: the comparison folder; each run goes to ``out_dir/<name>``.
        quiet: no progress bars or progress lines.
        only: run names (methods, or ``prototype-D<dim>`` sweep runs) to train and
            evaluate now; the others are left as they are. The report covers every run
            that has finished training.
        overrides: ``section.key=value`` changes of the config (see ``load_compare_config``).

    Returns:
        The content of ``out_dir/comparison.json``: ``protocol``, ``config``, ``runs``
        (name -> numbers), ``table1``, ``transfer``, ``curves``, ``epochs``, ``files``.
        Also writes ``tables.md``, ``robustness_curves.png/.json``, ``epochs.png/.csv``.
    """
    plan = load_compare_config(config, overrides)
    selected = _select(plan, only)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    say = (lambda text: None) if quiet else (lambda text: print(f"[compare] {text}", flush=True))
    e = plan.base.eval
    protocol = {"eps": e.eps, "norm": e.norm, "seed": e.seed, "batch_size": e.batch_size}
    x_all, y_all, folder = evaluation_run.load_test_split(plan.base, None)
    job = CompareJob(plan, out, protocol, x_all, y_all, quiet, say,
                     files={"comparison_json": str(out / COMPARISON), "tables_md": str(out / TABLES)})

    status = _train_and_evaluate(job, selected)
    runs = {r.name: _run_report(plan, r, out / r.name, status[r.name], protocol, len(y_all)) for r in plan.runs}
    finished = [r for r in plan.runs if (out / r.name / MODEL).exists()]
    device = resolve_device(plan.base.train.device)
    models = {r.name: store.load_model(out / r.name, device=device) for r in finished}
    transfer = _table4(job, models, runs, device) if plan.transfer else None
    _certify(job, runs, models)
    method_runs = [r for r in finished if r.name in plan.methods]
    report = _comparison(job, runs, transfer, curves=_curves(job, method_runs, models, device),
                         epochs=_epochs(job, method_runs), folder=folder)
    ckpt.atomic_write_text(out / TABLES, format_tables(report))
    ckpt.atomic_write_json(out / COMPARISON, report)
    say(f"wrote {out / COMPARISON} and {out / TABLES}")
    return report

