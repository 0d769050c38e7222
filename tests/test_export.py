"""Tests of repulsor.export: a standalone model that a fresh Python without repulsor loads.

The exported models are loaded in a separate ``python -I`` process whose import system
refuses repulsor (the process asserts that ``import repulsor`` fails), and must give the
scores of ``repulsor.load_model`` to 1e-5. A model loaded through its exported ``model.py``
is an outside ``nn.Module``: ``repulsor.evaluate`` on it must give exactly the numbers of
``repulsor evaluate RUN``.
"""

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import repulsor
from repulsor import cli
from repulsor.config import from_dict
from repulsor.data import DATASETS
from repulsor.errors import UserError
from repulsor.evaluation.run import load_test_split
from repulsor.export import export_model, export_run
from repulsor.models import build_model
from repulsor.prototypes import generate_prototypes
from repulsor.training.loop import train

TINY = {"data": {"name": "digits"}, "model": {"name": "mlp", "width": 0.25}, "prototypes": {"dim": 16, "epochs": 20},
        "train": {"method": "prototype", "epochs": 2, "batch_size": 64, "lr": 0.05, "precision": "fp32", "eps": 0.1,
                  "alpha": 0.025, "val_n": 100, "attack_steps": 2, "val_attack_steps": 2},
        "eval": {"n": 100, "eps": 0.1}}

# Run in a fresh interpreter: repulsor must not be importable there; then load every
# exported folder from its model.py and write the scores of the given images.
CHILD = textwrap.dedent('''
    import importlib.abc, importlib.util, json, sys

    class NoRepulsor(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "repulsor" or name.startswith("repulsor."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoRepulsor())
    try:
        import repulsor  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("repulsor is importable in the child process")

    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    for job in json.loads(sys.argv[1]):
        spec = importlib.util.spec_from_file_location(f"exported_{job['name']}", job["dir"] + "/model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.load_model(job["dir"])
        assert not type(model).__module__.startswith("repulsor"), type(model).__module__
        x = load_file(job["inputs"])["x"]
        with torch.no_grad():
            scores = model(x)
        save_file({"scores": scores.contiguous()}, job["outputs"])
    assert not any(name == "repulsor" or name.startswith("repulsor.") for name in sys.modules)
    print("ok")
''')


def _run_child(jobs, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, "-I", str(script), json.dumps(jobs)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-runs")
    proto = train(from_dict(TINY), root / "prototype", quiet=True)
    ce_cfg = {**TINY, "train": {**TINY["train"], "method": "ce"}}
    ce = train(from_dict(ce_cfg), root / "ce", quiet=True)
    return {"prototype": proto, "ce": ce}


def _load_exported(folder, name):
    spec = importlib.util.spec_from_file_location(f"exported_in_process_{name}", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_model(folder)


def test_exported_runs_and_built_models_match_in_a_fresh_process(runs, tmp_path):
    """Prototype and ce runs, and small_cnn / resnet18 / fast_cifar (width 0.125; the last without its
    feature centring) models built directly."""
    jobs, expected = [], {}
    for name, run in runs.items():
        out = tmp_path / f"export-{name}"
        export_run(run, out)
        model = repulsor.load_model(run)
        cfg = repulsor.load_config(run / "config.toml")
        x, _, _ = load_test_split(cfg, 100)
        assert len(x) == 100
        save_file({"x": x.contiguous()}, tmp_path / f"x-{name}.safetensors")
        with torch.no_grad():
            expected[name] = model(x)
        jobs.append({"name": name, "dir": str(out), "inputs": str(tmp_path / f"x-{name}.safetensors"),
                     "outputs": str(tmp_path / f"scores-{name}.safetensors")})
    for name, data, proto, distance, extra in (("small_cnn", "mnist", False, None, {}),
                                               ("resnet18", "cifar10", True, "linf", {}),
                                               ("fast_cifar", "cifar10", True, "cosine",
                                                {"centre_features": False, "whiten_directions": 6})):
        cfg = from_dict({"data": {"name": data}, "model": {"name": name, "width": 0.125, **extra},
                         "train": {"method": "prototype" if proto else "ce"}})
        torch.manual_seed(0)
        prototypes = generate_prototypes(10, 12, epochs=5) if proto else None
        model = build_model(cfg.model, DATASETS[data], prototypes=prototypes, distance=distance).eval()
        # Non-trivial batch-norm statistics, as after training.
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        export_model(model, cfg, tmp_path / f"export-{name}", source=f"a {name} built by the test")
        x = torch.rand(100, *DATASETS[data].shape, generator=torch.Generator().manual_seed(1))
        save_file({"x": x}, tmp_path / f"x-{name}.safetensors")
        with torch.no_grad():
            expected[name] = model(x)
        jobs.append({"name": name, "dir": str(tmp_path / f"export-{name}"),
                     "inputs": str(tmp_path / f"x-{name}.safetensors"),
                     "outputs": str(tmp_path / f"scores-{name}.safetensors")})
    _run_child(jobs, tmp_path)
    for name, scores in expected.items():
        got = load_file(tmp_path / f"scores-{name}.safetensors")["scores"]
        assert got.shape == scores.shape == (100, 10), name
        assert (got - scores).abs().max().item() <= 1e-5, name


def test_exported_files_are_standalone(runs, tmp_path):
    result = export_run(runs["prototype"], tmp_path / "out")
    text = (tmp_path / "out" / "model.py").read_text()
    tree = ast.parse(text)
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported and not any(m.startswith("repulsor") for m in imported), imported
    assert "UserError" not in text
    for name in ("class Normalize", "class Network", "class PrototypeClassifier", "class MLP", "def load_model"):
        assert name in text
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert "prototypes" in weights and weights["prototypes"].shape == (10, 16)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "[0, 1]" in readme and "AutoAttack" in readme and "torchattacks" in readme
    assert result["spec"]["head"] == "prototype" and result["spec"]["distance"] == "cosine"
    # The copied checks raise ValueError, not repulsor's UserError.
    model = _load_exported(tmp_path / "out", "checks")
    with pytest.raises(ValueError):
        type(model)(model.network, torch.zeros(1, 16), "cosine")


def test_outside_module_gives_the_cli_numbers(runs, tmp_path, capsys):
    """The exported model is an outside nn.Module: repulsor.evaluate on it == repulsor evaluate RUN."""
    run = runs["prototype"]
    export_run(run, tmp_path / "out")
    outside = _load_exported(tmp_path / "out", "evaluate")
    assert not type(outside).__module__.startswith("repulsor")
    assert cli.main(["evaluate", str(run), "--suite", "quick", "--n", "100", "--eps", "0.1", "--seed", "3",
                     "--quiet"]) == 0
    suites = json.loads((run / "results.json").read_text())["suites"].values()
    cli_result = next(s for s in suites if s["suite"] == "quick" and s["seed"] == 3 and s["eps"] == 0.1)
    cfg = repulsor.load_config(run / "config.toml")
    x, y, _ = load_test_split(cfg, 100)
    result = repulsor.evaluate(outside, x, y, suite="quick", eps=0.1, seed=3, batch_size=cfg.eval.batch_size)
    assert result["clean_accuracy"] == cli_result["clean_accuracy"]
    assert result["robust_accuracy"] == cli_result["robust_accuracy"]
    assert [a["accuracy"] for a in result["attacks"]] == [a["accuracy"] for a in cli_result["attacks"]]
    assert 0 < result["robust_accuracy"] < result["clean_accuracy"]


def test_export_cli_and_user_errors(runs, tmp_path, capsys):
    assert cli.main(["export", str(runs["ce"]), "--out", str(tmp_path / "ce")]) == 0
    assert (tmp_path / "ce" / "model.py").is_file() and "load_model" in capsys.readouterr().out
    assert cli.main(["export", str(runs["ce"]), "--out", str(runs["ce"])]) == 2
    err = capsys.readouterr().err
    assert "run folder itself" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(UserError):
        export_model(torch.nn.Linear(2, 2), from_dict(TINY), tmp_path / "linear")


def test_readme_gives_every_suite_its_own_points(runs, tmp_path):
    # An evaluation on fewer points must not be presented under another one's n and clean accuracy.
    run = tmp_path / "run"
    shutil.copytree(runs["ce"], run)
    results = json.loads((run / "results.json").read_text())
    name, first = next(iter(results["suites"].items()))
    results["suites"]["small"] = dict(first, n=7, clean_accuracy=0.5, robust_accuracy=0.25)
    results["n"], results["clean_accuracy"] = 7, 0.5  # the top level describes the last evaluation
    (run / "results.json").write_text(json.dumps(results))
    export_run(run, tmp_path / "out")
    readme = (tmp_path / "out" / "README.md").read_text()
    assert f"| {name} | {first['n']} | clean | {100 * first['clean_accuracy']:.2f}% |" in readme
    assert "| small | 7 | clean | 50.00% |" in readme and "| small | 7 | **worst case**" in readme


def _with_standard(run, tmp_path, n, **extra):
    """A copy of ``run`` whose results.json holds a standard result on ``n`` points (its numbers made up
    for the test: the export's rules read only n, the status of each attack and the accuracies)."""
    copy = tmp_path / f"run-{n}"
    shutil.copytree(run, copy)
    results = json.loads((copy / "results.json").read_text())
    attacks = [{"name": name, "status": "done", "accuracy": 0.4} for name in ("apgd-ce", "apgd-t", "fab-t", "square")]
    results["suites"]["standard"] = {"n": n, "clean_accuracy": 0.9368, "robust_accuracy": 0.4125, "attacks": attacks,
                                     "code_version": "0.6.0+gabc", **extra}
    (copy / "results.json").write_text(json.dumps(results))
    return copy


def test_model_info_json_carries_robustbench_fields_from_the_standard_suite_only(runs, tmp_path, capsys):
    from repulsor.robustbench import FIELDS, FOR_THE_USER

    run = _with_standard(runs["ce"], tmp_path, 360)
    assert cli.main(["export", str(run), "--out", str(tmp_path / "out"), "--model-info", "--model-info-n", "300"]) == 0
    info = json.loads((tmp_path / "out" / "model_info.json").read_text())
    assert tuple(info) == FIELDS
    assert info["clean_acc"] == "93.68" and info["autoattack_acc"] == "41.25" and info["eps"] == "0.1"
    assert info["dataset"] == "digits" and info["architecture"] == "mlp" and info["number_forward_passes"] == 1
    assert all(info[field] == "" for field in FOR_THE_USER)
    assert "not the official AutoAttack code" in info["footnote"] and "first 360 test points" in info["footnote"]
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "## RobustBench entry" in readme and all(f"`{f}`" in readme for f in FOR_THE_USER)


@pytest.mark.parametrize("case, message", [
    ("quick only", "has none; run: repulsor evaluate"),
    ("too few points", "on at least 500 test points"),
    ("an attack skipped", "is not an AutoAttack number"),
])
def test_model_info_is_refused_in_one_line_and_nothing_is_written(runs, tmp_path, capsys, case, message):
    run = runs["ce"]  # its results.json holds the quick suite only
    if case == "too few points":
        run = _with_standard(runs["ce"], tmp_path, 100)
    elif case == "an attack skipped":
        run = _with_standard(runs["ce"], tmp_path, 600)
        results = json.loads((run / "results.json").read_text())
        results["suites"]["standard"]["attacks"][3].update(status="not applicable", reason="no input gradient")
        (run / "results.json").write_text(json.dumps(results))
    out = tmp_path / "out"
    assert cli.main(["export", str(run), "--out", str(out), "--model-info", "--model-info-n", "500"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_model_info_default_needs_the_whole_official_test_split(runs, tmp_path, capsys):
    assert cli.main(["export", str(runs["ce"]), "--out", str(tmp_path / "o"), "--model-info"]) == 2
    assert "no official test split size" in capsys.readouterr().err  # digits: the user says how many
    from repulsor.robustbench import required_points

    assert required_points("cifar10", None) == 10000 and required_points("cifar10", 500) == 500


def test_a_model_of_the_authors_code_exports_with_its_rule_and_without_normalisation(tmp_path):
    raw = {**TINY, "model": {**TINY["model"], "normalize": False},
           "prototypes": {**TINY["prototypes"], "metric": "linf_sum", "distance": "dot_linf"},
           "train": {**TINY["train"], "objective": "linf_distance", "epochs": 1}, "eval": {**TINY["eval"], "n": 20}}
    run = train(from_dict(raw), tmp_path / "code", quiet=True)
    written = export_run(run, tmp_path / "out")
    assert written["spec"]["distance"] == "dot_linf" and written["spec"]["mean"] == [0.0]
    assert written["max_abs_diff"] <= 1e-5
    assert "the authors' code's rule" in (tmp_path / "out" / "README.md").read_text()
