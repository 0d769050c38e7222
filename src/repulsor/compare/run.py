"""Compare training methods under one protocol: the paper's Tables 1-4 and Figures 2-4.

A compare config is TOML data (parsed, never executed) with a ``[compare]`` table, the
ordinary sections ``[data] [model] [prototypes] [train] [eval]`` shared by every method,
and optional per-method overrides written as nested tables::

    [compare]
    methods = ["ce", "prototype", "pgd_at", "mmc"]
    suites = ["quick", "paper"]          # default; "standard" and "adaptive" too
    eval_n = 1000                        # first N test points (default: eval.n)
    suite_n = { standard = 500 }         # optional: a smaller N for expensive suites
    sweep_dims = [50, 100, 200]          # optional: Table 1, prototype runs with prototypes.dim = D
    curve_eps = ["8/255", "12/255", "16/255"]  # optional: robustness-curve grid (default eps..2 eps)
    curve_n = 500                        # optional: points of the curves (default eval_n; 0 = no curves)
    transfer = true                      # Table 4: PGD-20 examples of the ce model on every other model

    [train]
    epochs = 10

    [method.pgd_at.train]                # only pgd_at trains with this learning rate
    lr = 0.1

Every run's config is the shared sections with the method's overrides merged in, validated
by ``config.from_dict`` (so an unknown key, a wrong type or an out-of-range value names the
key). The data and the evaluation protocol cannot be overridden: every model is evaluated
on the same test points with the same attacks.

``compare`` trains each run into ``OUT/<name>`` with the one training loop
(``train.train``), evaluates it with ``evaluate.evaluate_run`` (suite by suite), and writes
``comparison.json``, ``tables.md``, ``robustness_curves.png/.json`` and
``epochs.png/.csv`` into ``OUT``. Everything is resumable: a finished run is never
retrained, an interrupted one is resumed from its checkpoint, a suite already in a run's
``results.json`` for the same points and threat model is not run again, and the
robustness curves and the transfer attack's adversarial examples are cached in
``OUT/cache`` under a fingerprint of the model weights.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..store import files as ckpt
from ..formats import format_eps
from ..analyses.run import (curve_eps_values, plot_metrics_over_epochs, plot_robustness_curves, read_metrics,
    robustness_curve)
from ..attacks import evaluating
from ..config import (_SECTION_TYPES, Config, _coerce, apply_overrides, from_dict, load_config, parse_fraction,
    parse_override, read_toml, resolve_paths, to_dict)
from ..data import DATASETS
from ..errors import Interrupted, UserError
from ..training.methods import METHODS
from ..runtime import code_version, resolve_device
from ..training.loop import TrainingStopped, train
from ..store.layout import LAST, MODEL
from ..evaluation import run as evaluation_run
from ..evaluation.cascade import evaluate, predict
from ..evaluation.suites import SUITES
from ..store import run as store

# The package re-exports the function ``evaluate`` under its module's name, so the module
# is looked up by its full name (and tests can monkeypatch ``evaluate_run`` through it).

DEFAULT_SUITES = ("quick", "paper")
TRANSFER_SOURCE = "ce"
CURVE_STEPS = 20
CURVE_LOSS = "ce"
#: Sections a method may override; the data and the evaluation protocol are shared.
OVERRIDE_SECTIONS = ("model", "prototypes", "train")
#: Keys that do not change what a run computes, ignored when checking an existing run.
_IGNORED_KEYS = {("train", "device")}
_COMPARE_KEYS = ("methods", "suites", "eval_n", "suite_n", "sweep_dims", "curve_eps", "curve_n", "transfer")
DASH = "–"


# ------------------------------------------------------------------ the compare config


@dataclass(frozen=True)
class RunPlan:
    """One training run of a comparison.

    ``name`` is its folder under the output directory: the method name, or
    ``prototype-D<dim>`` for a Table 1 sweep run that differs from the ``prototype`` run.
    ``overrides`` holds the per-method values (flat, ``{"train.lr": 0.1}``) that make its
    config differ from the shared sections.
    """

    name: str
    method: str
    cfg: Config
    overrides: dict
    dim: int | None = None  # the sweep's D for Table 1 runs


@dataclass(frozen=True)
class ComparePlan:
    """A validated compare config: the runs, the evaluation protocol and the analyses."""

    runs: tuple[RunPlan, ...]  # every distinct run, methods first, then the sweep
    methods: tuple[str, ...]
    sweep: tuple[tuple[int, str], ...]  # (D, run name) for Table 1
    suites: tuple[str, ...]
    eval_n: int
    suite_n: dict
    curve_eps: tuple[float, ...]
    curve_n: int
    transfer: bool
    base: Config  # the shared sections
    method_overrides: dict = field(default_factory=dict)  # {method: {section: {key: value}}}

    def n_for(self, suite: str) -> int:
        """The number of test points that ``suite`` is evaluated on."""
        return self.suite_n.get(suite, self.eval_n)

    def run(self, name: str) -> RunPlan:
        return next(r for r in self.runs if r.name == name)

    def describe(self) -> dict:
        """The ``[compare]`` table as resolved (defaults filled in), JSON-ready."""
        return {"methods": list(self.methods), "suites": list(self.suites), "eval_n": self.eval_n,
                "suite_n": dict(self.suite_n), "sweep_dims": [d for d, _ in self.sweep],
                "curve_eps": list(self.curve_eps), "curve_n": self.curve_n, "transfer": self.transfer}


def _names(values, key: str, valid, what: str) -> tuple[str, ...]:
    """A non-empty list of distinct names, each one of ``valid``."""
    names = _coerce("compare", key, values, list[str])
    if not names:
        raise UserError(f"compare.{key} is empty: list at least one {what}")
    for name in names:
        if name not in valid:
            raise UserError(f"compare.{key}: unknown {what} {name!r}: valid {what}s are {', '.join(valid)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"compare.{key} lists {', '.join(duplicates)} more than once")
    return tuple(names)


def _positive_int(value, key: str, minimum: int = 1) -> int:
    value = _coerce("compare", key, value, int)
    if value < minimum:
        raise UserError(f"compare.{key} = {value} is out of range: it must be >= {minimum}")
    return value


def _curve_grid(values) -> tuple[float, ...]:
    if not isinstance(values, list) or not values:
        raise UserError(f"compare.curve_eps must be a non-empty list of perturbation sizes, got {values!r}")
    grid = []
    for value in values:
        if isinstance(value, str):
            try:
                value = parse_fraction(value)
            except (ValueError, ZeroDivisionError):
                raise UserError(f"compare.curve_eps: cannot read {value!r} as a number (write 0.0314 or \"8/255\")") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise UserError(f"compare.curve_eps: {value!r} is not a perturbation size in [0, 1] (write \"8/255\", not 8)")
        grid.append(float(value))
    return tuple(sorted(set(grid)))


def _merge(base: dict, override: dict) -> dict:
    """``base`` with each section of ``override`` merged key by key (copies, nothing shared)."""
    merged = copy.deepcopy(base)
    for section, values in override.items():
        merged[section] = {**merged.get(section, {}), **copy.deepcopy(values)}
    return merged


def _flat(override: dict) -> dict:
    return {f"{section}.{key}": value for section, values in override.items() for key, value in values.items()}


def _method_overrides(raw, methods: tuple[str, ...]) -> dict:
    """Validate the ``[method.<name>.<section>]`` tables; returns ``{method: {section: {key: value}}}``."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError("method must be a table of per-method overrides, e.g. [method.pgd_at.train] lr = 0.1")
    result = {}
    for name, sections in raw.items():
        if name not in METHODS:
            raise UserError(f"[method.{name}]: unknown method {name!r}: valid methods are {', '.join(METHODS)}")
        if name not in methods:
            raise UserError(f"[method.{name}] overrides a method that is not in compare.methods ({', '.join(methods)})")
        if not isinstance(sections, dict):
            raise UserError(f"method.{name} must be a table of sections, e.g. [method.{name}.train] lr = 0.1")
        for section, values in sections.items():
            where = f"method.{name}.{section}"
            if section in ("data", "eval"):
                raise UserError(f"{where}: the data and the evaluation protocol are shared by every method;"
                                f" set them in [{section}]")
            if not isinstance(values, dict):
                raise UserError(f"{where} must be a table: write [method.{name}.train] with {section} = ... below it"
                                if section not in _SECTION_TYPES else f"{where} must be a table of key = value lines")
            if section not in OVERRIDE_SECTIONS:
                raise UserError(f"{where}: unknown section {section!r}: a method can override {', '.join(OVERRIDE_SECTIONS)}")
            if "method" in values and section == "train":
                raise UserError(f"{where}.method: the method is the table's name ({name}); remove this key")
        result[name] = copy.deepcopy(sections)
    return result


def _run_config(shared: dict, override: dict, method: str, where: str, eval_n: int, suite: str) -> Config:
    """Validate the config of one run: shared sections + override + the method."""
    merged = _merge(shared, override)
    merged = _merge(merged, {"train": {"method": method}, "eval": {"after_train": False, "n": eval_n, "suite": suite}})
    try:
        return resolve_paths(from_dict(merged))
    except UserError as error:
        raise UserError(f"{where}: {error}") from None


def load_compare_config(source, overrides: list[str] = ()) -> ComparePlan:
    """Read and validate a compare config.

    Args:
        source: a TOML file (path) or the same data as a dict (``{"compare": {...},
            "data": {...}, "method": {"pgd_at": {"train": {"lr": 0.1}}}}``).
        overrides: ``section.key=value`` strings applied on top of the file: shared
            sections (``"eval.eps=8/255"``) or the compare table (``"compare.eval_n=200"``).

    Returns:
        A ``ComparePlan`` with one validated ``Config`` per run.

    Raises:
        UserError: naming the key at fault (unknown keys or methods, wrong types,
            out-of-range values, overrides of the shared data or evaluation sections).
    """
    if isinstance(source, (str, Path)):
        raw = read_toml(source, "compare config")
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        raise UserError(f"a compare config is a TOML file or a dict, not {type(source).__name__}")
    if any(parse_override(text)[0] == "method" for text in overrides):
        raise UserError("--set method.*: per-method settings belong in the compare config's [method.NAME] tables")
    apply_overrides(raw, overrides)
    table = raw.pop("compare", None)
    if not isinstance(table, dict):
        raise UserError("the compare config needs a [compare] table with methods = [\"ce\", \"prototype\", ...]")
    unknown = sorted(set(table) - set(_COMPARE_KEYS))
    if unknown:
        raise UserError(f"unknown key compare.{unknown[0]}: valid keys are {', '.join(_COMPARE_KEYS)}")
    if "methods" not in table:
        raise UserError("compare.methods is missing: list the methods to compare, e.g. methods = [\"ce\", \"prototype\"]")
    methods = _names(table["methods"], "methods", tuple(METHODS), "method")
    suites = _names(table.get("suites", list(DEFAULT_SUITES)), "suites", tuple(SUITES), "suite")
    overrides = _method_overrides(raw.pop("method", None), methods)

    shared = raw
    for section, values in shared.items():
        if section in _SECTION_TYPES and not isinstance(values, dict):
            raise UserError(f"config section [{section}] must be a table of key = value lines")
    if "method" in shared.get("train", {}):
        raise UserError("train.method: list the methods in compare.methods, not in [train]")
    base = from_dict(_merge(shared, {"train": {"method": methods[0]}}))  # errors name the shared key

    eval_n = _positive_int(table.get("eval_n", base.eval.n), "eval_n")
    suite_n = {}
    if "suite_n" in table:
        if not isinstance(table["suite_n"], dict):
            raise UserError(f"compare.suite_n must be a table such as {{ standard = 500 }}, got {table['suite_n']!r}")
        for suite, n in table["suite_n"].items():
            if suite not in suites:
                raise UserError(f"compare.suite_n.{suite}: {suite!r} is not in compare.suites ({', '.join(suites)})")
            suite_n[suite] = _positive_int(n, f"suite_n.{suite}")
    curve_eps = (_curve_grid(table["curve_eps"]) if "curve_eps" in table
                 else tuple(curve_eps_values(base.eval.eps, base.eval.norm)))
    curve_n = _positive_int(table.get("curve_n", eval_n), "curve_n", minimum=0)
    has_source = TRANSFER_SOURCE in methods
    transfer = _coerce("compare", "transfer", table.get("transfer", has_source), bool)
    if transfer and not has_source:
        raise UserError(f"compare.transfer = true needs {TRANSFER_SOURCE!r} in compare.methods: the transfer attack"
                        f" crafts its adversarial examples on the {TRANSFER_SOURCE} model")
    dims = _coerce("compare", "sweep_dims", table.get("sweep_dims", []), list[int])
    if len(set(dims)) != len(dims):
        raise UserError("compare.sweep_dims lists a dimension more than once")

    runs = [RunPlan(m, m, _run_config(shared, overrides.get(m, {}), m, f"method.{m}", eval_n, suites[0]),
                    _flat(overrides.get(m, {}))) for m in methods]
    sweep = []
    for dim in dims:
        if isinstance(dim, int) and dim < 2:
            raise UserError(f"compare.sweep_dims: {dim} is out of range: a dimension must be >= 2")
        override = _merge(overrides.get("prototype", {}), {"prototypes": {"dim": dim}})
        cfg = _run_config(shared, override, "prototype", f"compare.sweep_dims ({dim})", eval_n, suites[0])
        same = next((r for r in runs if r.method == "prototype" and to_dict(r.cfg) == to_dict(cfg)), None)
        if same is None:
            same = RunPlan(f"prototype-D{dim}", "prototype", cfg, _flat(override), dim)
            runs.append(same)
        sweep.append((dim, same.name))
    return ComparePlan(runs=tuple(runs), methods=methods, sweep=tuple(sweep), suites=suites, eval_n=eval_n,
                       suite_n=suite_n, curve_eps=curve_eps, curve_n=curve_n, transfer=transfer, base=base,
                       method_overrides=overrides)


# ------------------------------------------------------------------ the transfer attack (Table 4)


def _accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (eval mode, no gradients)."""
    with evaluating(model):
        predictions = predict(model, x, batch_size, device)
    return (predictions == y.cpu()).sum().item() / len(y) if len(y) else 0.0


def transfer_accuracy(source_model: torch.nn.Module, target_models: dict, x: torch.Tensor, y: torch.Tensor, *,
                      eps: float, norm: str = "linf", seed: int = 0, batch_size: int = 256, device=None,
                      x_adv: torch.Tensor | None = None, quiet: bool = True) -> dict:
    """Accuracy of target models on adversarial examples crafted on a source model (Table 4).

    The examples are those of the ``quick`` suite run on the source model: PGD-20, step
    eps/4, uniform random start, cross-entropy on the class scores, seeded. As in the
    suite's cascade, a point keeps the first iterate that fools the source (and stays
    clean if none does), so the source's accuracy on them is exactly its white-box
    ``quick`` robust accuracy under the same ``eps``, ``norm``, ``seed`` and batch size.

    Args:
        source_model: the substitute model; maps images [N, C, H, W] in [0, 1] to scores [N, k].
        target_models: ``{name: model}``, the models under attack (black box: only their
            predictions are used). The source may be among them.
        x: clean images [N, C, H, W] in [0, 1]; y: labels [N] (int64).
        eps: perturbation size in pixel units; norm: ``linf`` or ``l2``.
        seed: seed of the attack's random starts.
        batch_size: examples per attack call and per prediction batch.
        device: where to run; default: the source model's device.
        x_adv: adversarial examples crafted earlier with these settings (skips the attack).
        quiet: no progress bar.

    Returns:
        ``source_accuracy`` (the source on its own examples), ``attack`` (the attack's
        settings), ``n``, ``targets``: ``{name: {"clean_accuracy", "accuracy"}}``
        (accuracy on the transferred examples), and ``x_adv`` (the examples, CPU).
    """
    device = torch.device(device) if device is not None else next(source_model.parameters()).device
    spec = SUITES["quick"][0]
    attack = {"name": spec.name, "steps": spec.steps, "loss": spec.loss, "alpha": spec.settings["alpha_over_eps"] * eps,
              "eps": eps, "norm": norm, "seed": seed, "restarts": spec.restarts, "random_start": True}
    if x_adv is None:
        result = evaluate(source_model, x, y, suite="quick", eps=eps, norm=norm, batch_size=batch_size,
                                       seed=seed, device=device, quiet=quiet, checks=False)
        x_adv = result["x_adv"]
    if x_adv.shape != x.shape:
        raise UserError(f"x_adv has shape {tuple(x_adv.shape)}, the clean images {tuple(x.shape)}")
    targets = {}
    for name, model in target_models.items():
        targets[name] = {"clean_accuracy": _accuracy(model, x, y, batch_size, device),
                         "accuracy": _accuracy(model, x_adv, y, batch_size, device)}
    return {"source_accuracy": _accuracy(source_model, x_adv, y, batch_size, device), "attack": attack,
            "n": len(y), "targets": targets, "x_adv": x_adv}


# ------------------------------------------------------------------ running the comparison


def _fingerprint(path: Path) -> str:
    """SHA-256 of a file: identifies the weights that a cached result was computed from."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_existing(run: RunPlan, run_dir: Path) -> None:
    """Refuse to reuse a run folder trained with a different config (it would mix protocols)."""
    saved = to_dict(load_config(run_dir / "config.toml"))
    wanted = to_dict(run.cfg)
    # Settings that only other methods read (fgsm_rs's overfit_drop for a ce run, ...) do not matter.
    others = {("train", key) for m in METHODS.values() for key in m.options} - {
        ("train", key) for key in METHODS[run.method].options}
    for section in ("data", "model", "prototypes", "train"):
        for key, value in wanted[section].items():
            if (section, key) in _IGNORED_KEYS | others or saved[section].get(key) == value:
                continue
            raise UserError(f"{run_dir} was trained with {section}.{key} = {saved[section].get(key)!r}, but the compare"
                            f" config asks for {value!r}; delete that folder to retrain it, or use another --out")


def _train_run(run: RunPlan, run_dir: Path, *, quiet: bool, say) -> tuple[str, str | None]:
    """Train (or resume, or skip) one run; returns (what was done, the error of a failed run).

    A run whose loss became NaN or infinite is reported as failed and the comparison goes
    on; an interruption (SIGINT/SIGTERM) stops the whole comparison after the checkpoint.
    """
    if (run_dir / "config.toml").exists():
        _check_existing(run, run_dir)
    if (run_dir / MODEL).exists():
        return "trained before", None
    try:
        if (run_dir / "config.toml").exists():
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


def _read_results(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    return ckpt.read_json(path, "results file") if path.exists() else {}


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
    path = run_dir / "training.json"
    if not path.exists():
        return {}
    record = ckpt.read_json(path, "training record")
    stopped = None
    metrics = run_dir / "metrics.jsonl"
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
    results = _read_results(run_dir)
    suites = {}
    for suite in plan.suites:
        n = min(plan.n_for(suite), n_test)
        if evaluation_run.suite_done(results, suite, n, protocol_keys(protocol)):
            entry = results["suites"][suite]
            suites[suite] = {
                "n": entry["n"], "clean_accuracy": entry["clean_accuracy"], "robust_accuracy": entry["robust_accuracy"],
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
        "cost": {k: cost.get(k) for k in ("wall_seconds", "epochs", "forward_passes_per_example",
                                          "backward_passes_per_example")} if cost else None,
        "config": to_dict(run.cfg),
    }


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


def _train_and_evaluate(plan: ComparePlan, selected: list[RunPlan], out: Path, protocol: dict, n_test: int, *,
                        quiet: bool, say) -> dict:
    """Train (or resume) each selected run and run its missing suites; returns ``{name: (status, error)}``."""
    status = {}
    for index, run in enumerate(selected, 1):
        say(f"[{index}/{len(selected)}] {run.name}")
        status[run.name] = _train_run(run, out / run.name, quiet=quiet, say=say)
        if not (out / run.name / MODEL).exists():
            continue
        results = _read_results(out / run.name)
        for suite in plan.suites:
            n = min(plan.n_for(suite), n_test)
            if evaluation_run.suite_done(results, suite, n, protocol_keys(protocol)):
                continue
            say(f"{run.name}: evaluating suite {suite} on {n} test points")
            results = evaluation_run.evaluate_run(out / run.name, suite=suite, n=n, quiet=quiet, **protocol)
    for run in plan.runs:
        if run.name not in status:
            run_dir = out / run.name
            status[run.name] = ("trained before" if (run_dir / MODEL).exists() else
                                "training unfinished" if (run_dir / LAST).exists() or (run_dir / "config.toml").exists()
                                else "not trained", None)
    return status


def _curves(plan: ComparePlan, out: Path, runs: list[RunPlan], models: dict, x_all, y_all, protocol: dict, *,
            device, files: dict, say) -> dict:
    """Figures 2-3: PGD-20 robustness curves of every method on the same points (cached per model)."""
    if not plan.curve_n or not runs:
        return {}
    n_curve = min(plan.curve_n, len(y_all))
    curves = {}
    for run in runs:
        key = {"model": _fingerprint(out / run.name / MODEL), "n": n_curve, "eps": list(plan.curve_eps),
               "steps": CURVE_STEPS, "loss": CURVE_LOSS, **protocol_keys(protocol)}

        def compute(run=run):
            say(f"{run.name}: robustness curve over {len(plan.curve_eps)} eps values on {n_curve} points")
            return robustness_curve(models[run.name], x_all[:n_curve], y_all[:n_curve], eps_values=plan.curve_eps,
                                    norm=protocol["norm"], steps=CURVE_STEPS, loss=CURVE_LOSS, seed=protocol["seed"],
                                    batch_size=protocol["batch_size"], device=device)

        curves[run.name] = _cached(out / "cache" / f"curve-{run.name}.json", key, compute)
    written = plot_robustness_curves(curves, out / "robustness_curves.png", norm=protocol["norm"],
                                     title=f"PGD-{CURVE_STEPS} robustness curves ({plan.base.data.name})")
    files["robustness_curves_png"], files["robustness_curves_json"] = written["png"], written["json"]
    return curves


def _epochs(plan: ComparePlan, out: Path, runs: list[RunPlan], *, files: dict) -> dict:
    """Figure 4: clean and robust validation accuracy over the epochs of every method."""
    metrics = {r.name: out / r.name / "metrics.jsonl" for r in runs if (out / r.name / "metrics.jsonl").exists()}
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
    n_test = len(y_all)

    status = _train_and_evaluate(plan, selected, out, protocol, n_test, quiet=quiet, say=say)
    runs = {r.name: _run_report(plan, r, out / r.name, status[r.name], protocol, n_test) for r in plan.runs}
    finished = [r for r in plan.runs if (out / r.name / MODEL).exists()]
    device = resolve_device(plan.base.train.device)
    models = {r.name: store.load_model(out / r.name, device=device) for r in finished}
    n_eval = min(plan.eval_n, n_test)

    # Table 4: transfer from the ce model.
    transfer = None
    if plan.transfer:
        transfer = _transfer(out, models, x_all[:n_eval], y_all[:n_eval], protocol, device=device, quiet=quiet, say=say)
        for name, target in transfer.get("targets", {}).items():
            runs[name]["transfer_accuracy"] = target["accuracy"]
        if "source_accuracy" in transfer:
            white_box = runs[TRANSFER_SOURCE]["pgd20_ce"]
            transfer["white_box_pgd20_ce"] = white_box
            transfer["matches_white_box"] = None if white_box is None else transfer["source_accuracy"] == white_box

    files = {"comparison_json": str(out / "comparison.json"), "tables_md": str(out / "tables.md")}
    method_runs = [r for r in finished if r.name in plan.methods]
    curves = _curves(plan, out, method_runs, models, x_all, y_all, protocol, device=device, files=files, say=say)
    epochs = _epochs(plan, out, method_runs, files=files)

    info = DATASETS[plan.base.data.name]
    report = {
        "protocol": {
            "dataset": info.name, "split": "test", "test_dir": str(folder or ""), "n": n_eval,
            "suite_n": {s: min(plan.n_for(s), n_test) for s in plan.suites}, "suites": list(plan.suites),
            **protocol, "precision": "fp32",
            "curve": {"eps": list(plan.curve_eps), "n": min(plan.curve_n, n_test), "steps": CURVE_STEPS,
                      "loss": CURVE_LOSS} if plan.curve_n else None,
            "transfer": None if transfer is None else {"source": TRANSFER_SOURCE, **transfer.get("attack", {})},
            "code_version": code_version(),
        },
        "config": {"compare": plan.describe(), "shared": _shared_dict(plan.base), "method_overrides": plan.method_overrides},
        "methods": list(plan.methods),
        "runs": runs,
        "table1": [{"dim": dim, "run": name, **{k: runs[name][k] for k in ("epochs", "clean_accuracy", "pgd20",
                                                                          "pgd20_ce", "standard")}}
                   for dim, name in plan.sweep],
        "transfer": transfer,
        "curves": curves,
        "epochs": epochs,
        "files": files,
    }
    ckpt.atomic_write_text(out / "tables.md", format_tables(report))
    ckpt.atomic_write_json(out / "comparison.json", report)
    say(f"wrote {out / 'comparison.json'} and {out / 'tables.md'}")
    return report


# ------------------------------------------------------------------ the tables


def fmt_pct(value) -> str:
    """An accuracy in [0, 1] as a percentage with one decimal, or a dash when missing."""
    return DASH if value is None else f"{100 * value:.1f}"


def _fmt_seconds(seconds) -> str:
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _fmt_passes(cost) -> str:
    if not cost or cost.get("forward_passes_per_example") is None:
        return DASH
    return f"{cost['forward_passes_per_example']:g} / {cost['backward_passes_per_example']:g}"


def _fmt_overrides(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or DASH


def _fmt_int(value) -> str:
    return DASH if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _protocol_line(p: dict, suites: str) -> str:
    eps = format_eps(p["eps"], p["norm"], short=True)
    return (f"Protocol: {p['dataset']} {p['split']} split{' (' + p['test_dir'] + ')' if p['test_dir'] else ''},"
            f" first {p['n']} points unshuffled, {p['norm']} eps = {eps}, seed {p['seed']}, fp32; {suites};"
            f" accuracies in %; repulsor {p['code_version']}.")


def format_tables(report: dict) -> str:
    """The Markdown tables of a comparison (Table 1, Tables 2-3, Table 4), each with a protocol line.

    Args:
        report: the dict returned by ``compare`` (the content of ``comparison.json``).

    Returns:
        Markdown text; missing numbers are shown as a dash.
    """
    p = report["protocol"]
    runs = report["runs"]
    dataset = p["dataset"]
    parts = [f"# Comparison on {dataset}", ""]
    suite_ns = ", ".join(f"{s} on {n}" for s, n in p["suite_n"].items())
    if report["table1"]:
        parts += [f"## Table 1: prototype output dimension D ({dataset})", "",
                  _table(["D", "run", "epochs", "clean", "PGD-20", "PGD-20 (CE)", "standard worst case"],
                         [[str(r["dim"]), r["run"], _fmt_int(r["epochs"]), fmt_pct(r["clean_accuracy"]),
                           fmt_pct(r["pgd20"]), fmt_pct(r.get("pgd20_ce")), fmt_pct(r.get("standard"))]
                          for r in report["table1"]]), "",
                  _protocol_line(p, "PGD-20: the paper suite (authors' loss: L-inf distance to the true prototype),"
                                    " as in the paper's Table 1; PGD-20 (CE): quick suite; standard: APGD-CE,"
                                    f" APGD-T, FAB-T, Square cascade; points per suite: {suite_ns}"), ""]
    number = {"cifar10": "Table 2", "cifar100": "Table 3"}.get(dataset, "Tables 2-3")
    rows, notes = [], []
    for name in report["methods"]:
        r = runs[name]
        status = "" if r["status"] in ("trained", "resumed", "trained before") else f" ({r['status']})"
        if r.get("error"):
            notes.append(f"- {name}: training failed: {r['error']}")
        if r.get("stopped"):
            notes.append(f"- {name}: training stopped early: {r['stopped']}")
        notes += [f"- {name}: sanity check failed in suite {warning}" for warning in r.get("sanity_warnings", [])]
        rows.append([name + status, _fmt_overrides(r["overrides"]), _fmt_int(r["epochs"]),
                     fmt_pct(r["clean_accuracy"]), fmt_pct(r["pgd20"]), fmt_pct(r["pgd100"]), fmt_pct(r["pgd20_ce"]),
                     fmt_pct(r["standard"]), _fmt_seconds((r["cost"] or {}).get("wall_seconds")),
                     _fmt_passes(r["cost"])])
    parts += [f"## {number}: methods on {dataset}", "",
              _table(["method", "overrides", "epochs", "clean", "PGD-20", "PGD-100", "PGD-20 (CE)",
                      "standard worst case", "training time", "passes/example (fwd / bwd)"], rows), "",
              _protocol_line(p, "PGD-20 and PGD-100: paper suite cascade (authors' loss for prototype heads, CE"
                                " otherwise; step eps/4, one random start); PGD-20 (CE): quick suite; standard:"
                                f" APGD-CE, APGD-T, FAB-T, Square cascade; points per suite: {suite_ns}"), ""]
    if notes:
        parts += ["Notes:", "", *notes, ""]
    transfer = report.get("transfer")
    if transfer is not None:
        parts += [f"## Table 4: transfer of PGD-20 examples from {transfer['source']} ({dataset})", ""]
        if "targets" in transfer:
            rows = [[transfer["source"], name + (" (white box)" if name == transfer["source"] else ""),
                     fmt_pct(t["clean_accuracy"]), fmt_pct(runs[name]["pgd20_ce"]), fmt_pct(t["accuracy"])]
                    for name, t in transfer["targets"].items()]
            a = transfer["attack"]
            parts += [_table(["source", "target", "clean", "white-box PGD-20 (CE)", "transferred"], rows), "",
                      _protocol_line(p, f"examples crafted on {transfer['source']} with PGD-{a['steps']} ({a['loss']} loss,"
                                        f" step eps/4, random start; a point keeps the first iterate that fools the"
                                        f" source), evaluated on each target"), ""]
        else:
            parts += [f"Not computed: {transfer['skipped']}.", ""]
    return "\n".join(parts)
