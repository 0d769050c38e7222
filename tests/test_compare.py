"""repulsor compare: a tiny comparison on the embedded digits data, its resumability, its
outputs (comparison.json, tables.md, plots), the transfer attack and config errors."""

import copy
import csv
import json
import shutil
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w
import torch

from repulsor.store import files as ckpt
from repulsor.compare import run as compare_mod
from repulsor.evaluation import run as evaluation_run
from repulsor.cli import main
from repulsor.analyses.transfer import transfer_accuracy
from repulsor.compare.plan import load_compare_config
from repulsor.compare.run import compare
from repulsor.compare.tables import fmt_pct, format_tables
from repulsor.config import from_dict
from repulsor.errors import UserError
from repulsor import evaluate, load_model
from repulsor.evaluation.run import load_test_split

from repulsor.training import loop as train_mod
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "compare-digits-tiny.toml"
METHODS = ["ce", "prototype", "pgd_at", "mmc"]


def tiny_raw(**compare_table) -> dict:
    raw = tomllib.loads(TINY.read_text())
    raw["compare"].update(compare_table)
    return raw


class Recorder:
    """Wraps a function and records the run folder of every call."""

    def __init__(self, fn, fail=False):
        self.fn, self.fail, self.calls = fn, fail, []

    def __call__(self, *args, **kwargs):
        run_dir = Path(args[1] if self.fn.__name__ == "train" else args[0])
        self.calls.append((run_dir.name, kwargs.get("suite")))
        if self.fail:
            raise AssertionError(f"{self.fn.__name__} called for {run_dir.name}")
        return self.fn(*args, **kwargs)


def mtimes(out: Path, names, files=("model.safetensors", "training.json", "results.json", "metrics.jsonl")):
    return {(n, f): (out / n / f).stat().st_mtime_ns for n in names for f in files if (out / n / f).exists()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A comparison interrupted after its first method (only=["ce"]), then completed."""
    raw = tiny_raw(sweep_dims=[16, 24], curve_n=60)
    out = tmp_path_factory.mktemp("compare") / "out"
    first = compare(raw, out, quiet=True, only=["ce"])
    ce_stamp = mtimes(out, ["ce"])
    with pytest.MonkeyPatch.context() as mp:
        trainer = Recorder(compare_mod.train)
        mp.setattr(compare_mod, "train", trainer)
        report = compare(raw, out, quiet=True)
    return SimpleNamespace(raw=raw, out=out, first=first, report=report, ce_stamp=ce_stamp, trained=trainer.calls)


def test_interrupted_compare_trains_only_the_remaining_runs(finished):
    first, out = finished.first, finished.out
    assert first["runs"]["ce"]["status"] == "trained"
    assert all(first["runs"][m]["status"] == "not trained" and first["runs"][m]["clean_accuracy"] is None
               for m in METHODS[1:])
    # Table rows of untrained methods hold dashes, and Table 4 has only the ce row.
    assert "| prototype (not trained) | – | – | – | – | – | – | – | – | – | – | – |" in format_tables(first)
    assert set(first["transfer"]["targets"]) == {"ce"}
    # The second call trained exactly the runs that were missing; ce was left alone.
    assert [name for name, _ in finished.trained] == ["prototype", "pgd_at", "mmc", "prototype-D24"]
    assert mtimes(out, ["ce"]) == finished.ce_stamp
    assert finished.report["runs"]["ce"]["status"] == "trained before"


def test_comparison_json_and_tables_hold_every_method(finished):
    report, out = finished.report, finished.out
    saved = json.loads((out / "comparison.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert report["methods"] == METHODS
    p = report["protocol"]
    assert (p["dataset"], p["split"], p["n"], p["eps"], p["norm"], p["seed"]) == ("digits", "test", 100, 0.1, "linf", 0)
    assert p["suites"] == ["quick", "paper"] and p["code_version"]
    assert report["config"]["method_overrides"] == {"mmc": {"train": {"lr": 0.01}}}
    tables = (out / "tables.md").read_text()
    # every other method against the first, point by point on the quick suite's points
    assert all(f"- {name} against {METHODS[0]}, suite quick: on the same 100 points" in tables for name in METHODS[1:])
    for name in METHODS:
        run = report["runs"][name]
        low, high = run["intervals"]["clean_accuracy_ci95"]
        assert low <= run["clean_accuracy"] <= high
        training = json.loads((out / name / "training.json").read_text())["cost"]
        assert run["epochs"] == 2 and run["cost"]["wall_seconds"] == training["wall_seconds"]
        assert run["cost"]["forward_passes_per_example"] == training["forward_passes_per_example"]
        results = json.loads((out / name / "results.json").read_text())
        paper = results["suites"]["paper"]["attacks"]
        assert run["pgd20"] == paper[0]["accuracy"] and run["pgd100"] == paper[1]["accuracy"]
        assert run["pgd20_ce"] == results["suites"]["quick"]["robust_accuracy"]
        assert run["clean_accuracy"] == results["suites"]["quick"]["clean_accuracy"]
        assert run["standard"] is None  # the standard suite was not asked for
        assert 0 <= run["pgd100"] <= run["pgd20"] <= run["clean_accuracy"] <= 1
        assert run["transfer_accuracy"] is not None
        assert run["config"]["train"]["method"] == name
        row = next(line for line in tables.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        n = report["protocol"]["suite_n"]
        assert cells[2:8] == ["2", fmt_pct(run["clean_accuracy"], n["quick"]), fmt_pct(run["pgd20"], n["paper"]),
                              fmt_pct(run["pgd100"], n["paper"]), fmt_pct(run["pgd20_ce"], n["quick"]), "–"]
        assert " [" in cells[3] and cells[3].endswith("]")  # every accuracy with its 95% interval
        transfer_row = next(line for line in tables.splitlines() if line.startswith(f"| ce | {name}"))
        assert fmt_pct(run["transfer_accuracy"]) in transfer_row
    assert report["runs"]["mmc"]["overrides"] == {"train.lr": 0.01}
    assert report["runs"]["mmc"]["config"]["train"]["lr"] == 0.01 and report["runs"]["ce"]["config"]["train"]["lr"] == 0.05
    # Table 1: D = 16 is the prototype run itself, D = 24 a separate run.
    assert [(r["dim"], r["run"]) for r in report["table1"]] == [(16, "prototype"), (24, "prototype-D24")]
    d24 = report["runs"]["prototype-D24"]
    assert d24["config"]["prototypes"]["dim"] == 24 and report["table1"][1]["pgd20"] == d24["pgd20"]
    assert report["table1"][1]["pgd20_ce"] == d24["pgd20_ce"] and report["table1"][1]["standard"] == d24["standard"]
    assert "## Table 1" in tables and "## Table 4" in tables and tables.count("Protocol:") == 3
    # Plots: every method on one robustness-curve plot and one epoch plot.
    for name in ("robustness_curves.png", "robustness_curves.json", "epochs.png", "epochs.csv"):
        assert (out / name).stat().st_size > 0
    assert (out / "robustness_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads((out / "robustness_curves.json").read_text())["curves"]
    assert list(curves) == METHODS
    for name, curve in curves.items():
        accuracies = [point["accuracy"] for point in curve]
        assert [point["eps"] for point in curve] == [0.05, 0.1, 0.15, 0.2] and curve[0]["n"] == 60
        assert accuracies == sorted(accuracies, reverse=True)
    with open(out / "epochs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({r["run"] for r in rows}) == sorted(METHODS) and len(rows) == 2 * len(METHODS)


def test_transfer_from_ce_matches_its_white_box_pgd(finished):
    report, out = finished.report, finished.out
    transfer = report["transfer"]
    ce = report["runs"]["ce"]
    # Sanity: the ce model on its own examples is its quick-suite PGD-20 accuracy, exactly
    # (results.json written by evaluate_run in another call).
    assert transfer["source_accuracy"] == ce["pgd20_ce"] == transfer["targets"]["ce"]["accuracy"]
    assert transfer["matches_white_box"] is True
    assert transfer["attack"]["steps"] == 20 and transfer["attack"]["loss"] == "ce"
    assert transfer["attack"]["alpha"] == pytest.approx(0.1 / 4)
    assert set(transfer["targets"]) == set(METHODS) | {"prototype-D24"}
    # The targets' numbers are their accuracy on the cached examples, recomputed here.
    tensors, _ = ckpt.load_tensors(out / "cache" / "transfer-ce.safetensors")
    x, y, _ = load_test_split(from_dict({"data": {"name": "digits"}}), 100)
    for name in METHODS:
        model = load_model(out / name)
        with torch.no_grad():
            accuracy = (model(tensors["x_adv"]).argmax(1) == y).sum().item() / len(y)
            clean = (model(x).argmax(1) == y).sum().item() / len(y)
        assert transfer["targets"][name]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
        assert transfer["targets"][name]["clean_accuracy"] == pytest.approx(clean, abs=1e-9)
    # The examples stay in the threat model and the source is fooled on them.
    assert (tensors["x_adv"] - x).abs().max() <= 0.1 + 1e-6
    assert transfer["source_accuracy"] < ce["clean_accuracy"]


def test_transfer_accuracy_function_on_models():
    """The helper on its own: a model and its copy see the same examples; x_adv skips the attack."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y, _ = load_test_split(from_dict({"data": {"name": "digits"}}), 50)
    twin = copy.deepcopy(model)
    result = transfer_accuracy(model, {"self": model, "twin": twin}, x, y, eps=0.1, seed=3)
    white_box = evaluate(model, x, y, suite="quick", eps=0.1, seed=3)["robust_accuracy"]
    assert result["source_accuracy"] == white_box == result["targets"]["twin"]["accuracy"]
    again = transfer_accuracy(model, {"twin": twin}, x, y, eps=0.1, seed=3, x_adv=result["x_adv"])
    assert again["targets"]["twin"] == result["targets"]["twin"]
    with pytest.raises(UserError, match="x_adv has shape"):
        transfer_accuracy(model, {}, x, y, eps=0.1, x_adv=x[:10])


def test_second_compare_neither_retrains_nor_reevaluates(finished, monkeypatch):
    out = finished.out
    names = METHODS + ["prototype-D24"]
    before = mtimes(out, names)
    cache = {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()}
    train_guard = Recorder(compare_mod.train, fail=True)
    eval_guard = Recorder(evaluation_run.evaluate_run, fail=True)
    monkeypatch.setattr(compare_mod, "train", train_guard)
    monkeypatch.setattr(evaluation_run, "evaluate_run", eval_guard)
    started = time.time()
    report = compare(finished.raw, out, quiet=True)
    assert time.time() - started < 15
    assert train_guard.calls == [] and eval_guard.calls == []
    assert mtimes(out, names) == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()} == cache
    for name in names:
        a, b = report["runs"][name], finished.report["runs"][name]
        assert {k: a[k] for k in ("clean_accuracy", "pgd20", "pgd100", "transfer_accuracy", "cost")} == \
               {k: b[k] for k in ("clean_accuracy", "pgd20", "pgd100", "transfer_accuracy", "cost")}
    assert report["curves"] == finished.report["curves"]


def test_certify_puts_a_lower_bound_beside_every_run(finished, tmp_path, monkeypatch):
    """compare.certify adds a certified column without retraining: each certifiable run's bound, on the
    same points as its attacked accuracies, never above them; a model the bounds do not cover (MMC's
    squared distances) is named with the reason; a second compare reads the records back."""
    out = tmp_path / "out"
    shutil.copytree(finished.out, out)
    raw = copy.deepcopy(finished.raw)
    raw["compare"]["certify"] = "crown"
    monkeypatch.setattr(compare_mod, "train", Recorder(compare_mod.train, fail=True))
    report = compare(raw, out, quiet=True)
    runs = report["runs"]
    for name in ("ce", "prototype", "pgd_at"):
        assert runs[name]["certified"] is not None
        assert runs[name]["certified"] <= runs[name]["worst_case"]["quick"] <= runs[name]["clean_accuracy"]
        low, high = runs[name]["intervals"]["certified_ci95"]
        assert low <= runs[name]["certified"] <= high
    assert runs["mmc"]["certified"] is None and runs["mmc"]["certified_note"]
    for name in ("ce", "prototype", "pgd_at"):  # per eps on the robustness curve too, on the curve's points
        assert all(entry["certified"] <= entry["accuracy"] for entry in report["curves"][name])
    assert all("certified" not in entry for entry in report["curves"]["mmc"])
    tables = (out / "tables.md").read_text()
    assert "certified (crown, a lower bound)" in tables and "- mmc: not certified: " in tables
    certifier = Recorder(evaluation_run.certify_run, fail=True)
    monkeypatch.setattr(evaluation_run, "certify_run", certifier)
    again = compare(raw, out, quiet=True)
    assert {n: r["certified"] for n, r in again["runs"].items()} == {n: r["certified"] for n, r in runs.items()}


def test_seeds_are_an_axis_resumed_per_seed(finished, tmp_path, monkeypatch):
    """compare.seeds: one run per method and seed (the first keeps the method's name), trained with that
    train.seed; the seeds table gives mean, standard deviation and every seed's figure, and a comparison
    interrupted after some seeds trains only the others."""
    import statistics

    raw = tiny_raw(methods=["ce", "prototype"], seeds=[0, 1], curve_n=0, transfer=False)
    raw.pop("method", None)
    plan = load_compare_config(raw)
    assert [(r.name, r.cfg.train.seed) for r in plan.runs] == [("ce", 0), ("ce-seed1", 1), ("prototype", 0),
                                                               ("prototype-seed1", 1)]
    out = tmp_path / "out"
    first = compare(raw, out, quiet=True, only=["ce", "ce-seed1"])
    assert first["seeds"]["prototype"]["clean_accuracy"]["mean"] is None
    assert "prototype: not yet measured: prototype, prototype-seed1" in (out / "tables.md").read_text()
    trainer = Recorder(compare_mod.train)
    monkeypatch.setattr(compare_mod, "train", trainer)
    report = compare(raw, out, quiet=True)
    assert sorted(name for name, _ in trainer.calls) == ["prototype", "prototype-seed1"]  # resumed per seed
    for method in ("ce", "prototype"):
        figure = report["seeds"][method]["clean_accuracy"]
        values = [report["runs"][name]["clean_accuracy"] for name in (method, f"{method}-seed1")]
        assert figure["values"] == values and report["seeds"][method]["seeds"] == [0, 1]
        assert figure["mean"] == pytest.approx(statistics.fmean(values))
        assert figure["std"] == pytest.approx(statistics.stdev(values))
    tables = (out / "tables.md").read_text()
    assert "Seeds: every method over 2 training seeds" in tables
    mean, std = report["seeds"]["ce"]["clean_accuracy"]["mean"], report["seeds"]["ce"]["clean_accuracy"]["std"]
    assert f"{100 * mean:.1f} ± {100 * std:.1f} (" in tables
    # one seed: no seeds table, and a shared seed other than 0 keeps the plain names
    assert finished.report["seeds"] is None and "Seeds:" not in (finished.out / "tables.md").read_text()
    assert [r.cfg.train.seed for r in load_compare_config(tiny_raw(seeds=[3])).runs if r.dim is None] == [3] * 4


def test_a_missing_suite_is_rerun_alone(finished, monkeypatch):
    out = finished.out
    path = out / "pgd_at" / "results.json"
    results = json.loads(path.read_text())
    expected = results["suites"]["paper"]["robust_accuracy"]
    del results["suites"]["paper"]
    ckpt.atomic_write_json(path, results)
    train_guard = Recorder(compare_mod.train, fail=True)
    evaluator = Recorder(evaluation_run.evaluate_run)
    monkeypatch.setattr(compare_mod, "train", train_guard)
    monkeypatch.setattr(evaluation_run, "evaluate_run", evaluator)
    report = compare(finished.raw, out, quiet=True)
    assert evaluator.calls == [("pgd_at", "paper")]
    assert report["runs"]["pgd_at"]["worst_case"]["paper"] == expected  # same seed, same points, same number


@pytest.mark.slow
def test_interrupted_training_is_resumed_from_its_checkpoint(tmp_path, monkeypatch):
    raw = tiny_raw(methods=["ce", "mmc"], curve_n=0, suites=["quick", "standard"], suite_n={"standard": 10})
    out = tmp_path / "out"
    real_end_epoch = train_mod.end_epoch
    calls = []

    def crash_in_mmc(loop, state):
        state = real_end_epoch(loop, state)
        calls.append(loop.out.name)
        if loop.out.name == "mmc":
            raise KeyboardInterrupt  # after mmc's first epoch is checkpointed
        return state

    monkeypatch.setattr(train_mod, "end_epoch", crash_in_mmc)
    with pytest.raises(KeyboardInterrupt):
        compare(raw, out, quiet=True)
    assert (out / "ce" / "model.safetensors").exists() and not (out / "mmc" / "model.safetensors").exists()
    assert (out / "mmc" / "checkpoints" / "last.safetensors").exists()
    monkeypatch.setattr(train_mod, "end_epoch", real_end_epoch)
    resumed = Recorder(compare_mod.train)
    monkeypatch.setattr(compare_mod, "train", resumed)
    report = compare(raw, out, quiet=True)
    assert resumed.calls == [("mmc", None)]
    assert report["runs"]["mmc"]["status"] == "resumed" and report["runs"]["ce"]["status"] == "trained before"
    assert "resumed at epoch 2" in (out / "mmc" / "log.txt").read_text()
    epochs = [json.loads(line)["epoch"] for line in (out / "mmc" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and report["runs"]["mmc"]["epochs"] == 2
    # The standard suite on its own number of points: its worst case is the table's column.
    for name in ("ce", "mmc"):
        standard = json.loads((out / name / "results.json").read_text())["suites"]["standard"]
        run = report["runs"][name]
        assert standard["n"] == 10 and run["standard"] == standard["robust_accuracy"] and run["pgd20"] is None
        assert run["suites"]["quick"]["n"] == 100 and "sanity" in run["suites"]["standard"]
        row = next(line for line in (out / "tables.md").read_text().splitlines() if line.startswith(f"| {name} |"))
        assert [c.strip() for c in row.strip("|").split("|")][4:8] == ["–", "–", fmt_pct(run["pgd20_ce"], 100),
                                                                      fmt_pct(run["standard"], 10)]


def test_tables_list_failures_and_sanity_warnings(finished):
    report = copy.deepcopy(finished.report)
    report["runs"]["mmc"].update(status="failed", error="the training loss became nan at epoch 1 step 3")
    report["runs"]["pgd_at"]["sanity_warnings"] = ["standard: unbounded attack left 50% of the points robust"]
    report["runs"]["prototype"]["stopped"] = "early stopping: no better validation accuracy for 5 epochs"
    tables = format_tables(report)
    assert "| mmc (failed) |" in tables
    assert "- mmc: training failed: the training loss became nan at epoch 1 step 3" in tables
    assert "- pgd_at: sanity check failed in suite standard: unbounded attack left 50%" in tables
    assert "- prototype: training stopped early: early stopping: no better" in tables


def test_changed_config_does_not_reuse_a_run(finished, tmp_path):
    raw = copy.deepcopy(finished.raw)
    raw["method"]["pgd_at"] = {"train": {"attack_steps": 5}}
    with pytest.raises(UserError, match=r"pgd_at was trained with train\.attack_steps = 3.*asks for 5"):
        compare(raw, finished.out, quiet=True, only=["pgd_at"])


def test_a_setting_only_another_method_reads_does_not_retrain(finished, monkeypatch):
    """fgsm_rs's overfit_drop and TRADES' beta do not concern pgd_at: its run is reused."""
    raw = copy.deepcopy(finished.raw)
    raw.setdefault("train", {}).update(overfit_drop=0.3, trades_beta=1.0)
    monkeypatch.setattr(compare_mod, "train", Recorder(compare_mod.train, fail=True))
    compare(raw, finished.out, quiet=True, only=["pgd_at"])


def test_a_moved_run_folder_is_reused_where_its_data_lies_elsewhere(finished, tmp_path, monkeypatch):
    """Committed runs name their data by a relative path and are read where the data lies elsewhere:
    the folders of the data, like the device, do not change the weights, so the run is not retrained."""
    out = tmp_path / "out"
    shutil.copytree(finished.out, out)
    path = out / "pgd_at" / "config.toml"
    saved = tomllib.loads(path.read_text())
    saved["data"]["data_dir"] = "../elsewhere/" + Path(saved["data"]["data_dir"] or "digits").name
    saved["train"]["device"] = "cuda"
    path.write_text(tomli_w.dumps(saved))
    monkeypatch.setattr(compare_mod, "train", Recorder(compare_mod.train, fail=True))
    report = compare(finished.raw, out, quiet=True, only=["pgd_at"])
    assert report["runs"]["pgd_at"]["status"] == "trained before"
    saved["model"]["width"] = saved["model"]["width"] * 2  # a setting that does change the weights
    path.write_text(tomli_w.dumps(saved))
    with pytest.raises(UserError, match=r"pgd_at was trained with model\.width"):
        compare(finished.raw, out, quiet=True, only=["pgd_at"])


@pytest.mark.parametrize("change, message", [
    (lambda r: r["compare"].update(methods=["ce", "madry"]), r"compare\.methods: unknown method 'madry': valid methods are ce, "),
    (lambda r: r["compare"].update(suites=["quick", "autoattack"]), r"compare\.suites: unknown suite 'autoattack'"),
    (lambda r: r["compare"].update(eval_n="100"), r"compare\.eval_n must be an integer"),
    (lambda r: r["compare"].update(curve_eps=[8]), r"compare\.curve_eps = 8 is larger than 1"),
    (lambda r: r["compare"].update(certify="exact"), r"compare\.certify = 'exact' is not one of"),
    (lambda r: r["compare"].update(seeds=[0, 0]), r"compare\.seeds must list distinct seeds"),
    (lambda r: r["compare"].update(seeds=[]), r"compare\.seeds must list distinct seeds"),
    (lambda r: r["compare"].update(colour="red"), r"unknown key compare\.colour: valid keys are methods"),
    (lambda r: r["compare"].update(sweep_dims=[5]), r"compare\.sweep_dims \(5\): prototypes\.dim = 5 is smaller"),
    (lambda r: r["compare"].pop("methods"), r"compare\.methods is missing"),
    (lambda r: r.pop("compare"), r"needs a \[compare\] table"),
    (lambda r: r["method"].update(pgd_at={"train": {"lrr": 0.1}}), r"method\.pgd_at: unknown key train\.lrr: valid keys"),
    (lambda r: r["method"].update(pgd_at={"train": {"lr": "fast"}}), r"method\.pgd_at: train\.lr must be a number"),
    (lambda r: r["method"].update(pgd_at={"train": {"lr": -1.0}}), r"method\.pgd_at: train\.lr = -1\.0 is out of range"),
    (lambda r: r["method"].update(pgd_at={"eval": {"n": 5}}), r"method\.pgd_at\.eval: the data and the evaluation"),
    (lambda r: r["method"].update(pgd_at={"lr": 0.1}), r"method\.pgd_at\.lr must be a table"),
    (lambda r: r["method"].update(pgd_at={"train": {"method": "ce"}}), r"method\.pgd_at\.train\.method"),
    (lambda r: r["method"].update(trades={"train": {"lr": 0.1}}), r"\[method\.trades\] overrides a method that is not in"),
    (lambda r: r["method"].update(madry={"train": {"lr": 0.1}}), r"\[method\.madry\]: unknown method 'madry'"),
    (lambda r: r["data"].update(nme="mnist"), r"unknown key data\.nme"),
    (lambda r: r["train"].update(epochs="two"), r"train\.epochs must be an integer"),
    (lambda r: r["train"].update(method="ce"), r"train\.method: list the methods in compare\.methods"),
    (lambda r: (r.pop("method"), r["compare"].update(methods=["prototype"], transfer=True)),
     r"compare\.transfer = true needs 'ce'"),
])
def test_config_errors_name_the_key(change, message, tmp_path):
    raw = tiny_raw()
    change(raw)
    with pytest.raises(UserError, match=message):
        compare(raw, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()  # nothing is written before the config is valid


def test_only_names_a_run(tmp_path):
    with pytest.raises(UserError, match=r"--only trades: not a run of this comparison; choose from ce, prototype"):
        compare(tiny_raw(), tmp_path / "out", quiet=True, only=["trades"])


@pytest.mark.parametrize("name", ["compare-digits-tiny", "compare-mnist-cpu", "compare-cifar10-cpu",
                                  "compare-mnist-paper", "compare-cifar10-paper", "compare-cifar10-fast",
                                  "compare-cifar10-fast-half"])
def test_shipped_configs_are_valid(name):
    plan = load_compare_config(CONFIGS / f"{name}.toml")
    assert plan.methods[0] == "ce" and plan.transfer
    assert all(run.cfg.train.method == run.method for run in plan.runs)
    if "paper" in name:
        assert plan.base.model.width == 1.0 and [d for d, _ in plan.sweep] == [50, 100, 200]
        assert any(run.cfg.train.epochs >= 100 for run in plan.runs)
    if name == "compare-cifar10-fast":  # Figure 4's extra validation losses, for every prototype-head run
        assert {run.name: run.cfg.train.val_losses for run in plan.runs if run.method == "prototype"} == {
            name: ["proto_linf", "ce"] for name in ("prototype", "prototype-D50", "prototype-D200")}


def test_cli_prints_the_tables(finished, tmp_path, capsys, monkeypatch):
    config = tmp_path / "compare.toml"
    config.write_text(tomli_w.dumps(finished.raw))
    monkeypatch.setattr(compare_mod, "train", Recorder(compare_mod.train, fail=True))
    assert main(["compare", str(config), "--out", str(finished.out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "## Table 4" in printed and all(f"| {name} |" in printed for name in METHODS)
    assert main(["compare", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_command_line_overrides_reach_the_plan(tmp_path):
    from repulsor.compare.plan import load_compare_config

    source = CONFIGS / "compare-digits-tiny.toml"
    plan = load_compare_config(source, ["compare.eval_n=17", "eval.eps=0.2", "data.data_dir=rel"])
    assert plan.eval_n == 17 and plan.base.eval.eps == 0.2
    assert all(run.cfg.eval.n == 17 and run.cfg.data.data_dir == str(Path("rel").resolve()) for run in plan.runs)
    with pytest.raises(UserError, match="per-method settings"):
        load_compare_config(source, ["method.ce.lr=1"])


def test_table2_prices_robustness_in_training_hours_and_cascade_time():
    """A robust row's cost columns: its standard worst case per hour of training, and the seconds of
    the standard cascade's attacks (sanity checks not counted); a row without standard has dashes."""
    from repulsor.compare.tables import methods_table

    def run(standard, wall, seconds):
        suites = {} if standard is None else {"standard": {"attacks": [{"seconds": s} for s in seconds]}}
        return {"status": "trained", "overrides": {}, "epochs": 15, "clean_accuracy": 0.8, "pgd20": None,
                "pgd100": None, "pgd20_ce": None, "standard": standard, "suites": suites,
                "cost": {"wall_seconds": wall, "forward_passes_per_example": 2.0, "backward_passes_per_example": 2.0}}

    report = {"protocol": {"dataset": "cifar10", "suite_n": {"standard": 500}, "n": 1000, "eps": 8 / 255,
                           "norm": "linf", "seed": 0, "split": "test", "test_dir": None, "code_version": "0.7.1"},
              "methods": ["fgsm_rs", "ce"],
              "runs": {"fgsm_rs": run(0.40, 7200.0, [60.0, 600.0, 900.0, 1200.0]), "ce": run(None, 2000.0, [])}}
    table = methods_table(report)
    rows = {row[0]: row for row in table.rows}
    assert table.header[-2:] == ["standard points per training hour", "standard: cascade time"]
    assert rows["fgsm_rs"][-2:] == ["20.0", "46.0 min"]  # 40 points in 2 hours; 2760 s of attacks
    assert rows["ce"][-2:] == ["–", "–"]
