"""The command line as a new user meets it: one language for every command, help examples that
run as written, interruptions that say how to continue, files a colleague can read."""

import json
import os
import re
import shlex
import shutil
import stat
from pathlib import Path

import pytest
import tomli_w

import repulsor
from repulsor import cli
from repulsor.store.files import atomic_write_text
from repulsor.config import from_dict, load_config, load_run_config, resolve_paths
from repulsor.errors import UserError
from repulsor.evaluation.run import load_test_split
from repulsor.training.loop import train

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
# Commands that load data or models: the common flags, with one meaning everywhere.
LOADING = ("demo", "train", "evaluate", "analyse", "compare", "report")
COMMON = ("--data-dir", "--device", "--set", "--n", "--eps", "--seed", "--quiet")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(from_dict(TINY), tmp_path_factory.mktemp("cli") / "run", quiet=True)


def _subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"repulsor {repulsor.__version__}"


@pytest.mark.parametrize("command", LOADING)
def test_every_loading_command_takes_the_common_flags(command):
    _, commands = _subparsers()
    flags = {option for action in commands[command]._actions for option in action.option_strings}
    assert set(COMMON) <= flags, f"{command} lacks {sorted(set(COMMON) - flags)}"


def _help_examples():
    """Every ``repulsor ...`` line of every --help epilog, with continuation lines joined."""
    _, commands = _subparsers()
    examples = []
    for name, sub in commands.items():
        text = re.sub(r"\\\n\s*", " ", sub.epilog or "")
        examples += [(name, line.strip()) for line in text.splitlines() if line.strip().startswith("repulsor ")]
    return examples


def test_help_examples_parse_and_name_files_that_exist(shared_data):
    parser, _ = _subparsers()
    examples = _help_examples()
    assert len(examples) >= 15
    for name, line in examples:
        argv = shlex.split(line)[1:]
        args = parser.parse_args(argv)  # a wrong flag exits 2 here
        config = getattr(args, "config", None)
        if config:
            assert (ROOT / config).is_file(), line
        data_dir = getattr(args, "data_dir", None)
        if data_dir:
            assert (ROOT / data_dir).is_dir(), line
        if args.command == "train" and config and not args.resume:
            # A config for a downloadable data set runs as written only with its data folder.
            cfg = load_config(ROOT / config)
            assert cfg.data.name == "digits" or data_dir or cfg.data.data_dir, line


@pytest.mark.slow
def test_train_help_example_runs_as_written(tmp_path, shared_data, monkeypatch):
    """The short training example of `repulsor train --help`, with its folders, one epoch shorter."""
    line = next(line for name, line in _help_examples() if name == "train" and "--no-eval" in line)
    argv = shlex.split(line)[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "try")
    argv[argv.index("train.epochs=2")] = "train.epochs=1"
    monkeypatch.chdir(ROOT)
    assert cli.main(argv + ["--quiet", "--set", "data.train_subset=512", "--set", "train.val_n=50"]) == 0
    assert (tmp_path / "try" / "model.safetensors").is_file()
    assert not (tmp_path / "try" / "results.json").exists()  # --no-eval
    stored = load_config(tmp_path / "try" / "config.toml").data.data_dir
    assert Path(stored).is_absolute() and Path(stored) == (ROOT / "../shared/data/mnist").resolve()


def test_train_says_what_follows_and_no_eval_skips_it(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps({**TINY, "eval": {"n": 50, "eps": 0.1}}))
    argv = ["train", "--config", str(config), "--data-dir", "relative/folder"]  # not --quiet: it silences the plan
    assert cli.main(argv + ["--out", str(tmp_path / "run"), "--no-eval"]) == 0
    said = capsys.readouterr().out
    assert "no evaluation afterwards" in said
    assert not (tmp_path / "run" / "results.json").exists()
    # A relative --data-dir is stored as the absolute folder it meant, so the run resolves anywhere.
    stored = load_config(tmp_path / "run" / "config.toml").data.data_dir
    assert stored == str(Path("relative/folder").resolve())
    assert cli.main(argv + ["--out", str(tmp_path / "run2"), "--n", "20"]) == 0
    said = capsys.readouterr().out
    assert "then evaluating suite quick on the first 20 test points" in said and "--no-eval" in said
    assert "suite quick" in said and "first 20 points" in said


def test_resume_refuses_other_flags(run, capsys):
    assert cli.main(["train", "--resume", str(run), "--n", "5"]) == 2
    assert "do not combine it with --n" in capsys.readouterr().err


def test_finished_run_folder_says_how_to_use_it(run, capsys):
    assert cli.main(["train", "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (finished)" in err and f"repulsor evaluate {run}" in err


def test_evaluate_flags_and_set_on_a_run(run, capsys):
    assert cli.main(["evaluate", str(run), "--n", "30", "--eps", "0.05", "--seed", "3", "--quiet",
                     "--set", "eval.batch_size=7"]) == 0
    out = capsys.readouterr().out
    assert "first 30 points" in out and "eps = 0.05" in out and "seed 3" in out
    # What was trained cannot change when a run is read.
    assert cli.main(["evaluate", str(run), "--set", "model.width=2"]) == 2
    assert "cannot change" in capsys.readouterr().err
    with pytest.raises(UserError, match="cannot change"):
        load_run_config(run, ["train.lr=1"])
    assert load_run_config(run, ["eval.n=9"]).eval.n == 9


def test_evaluate_names_the_attacks_that_run_on_the_model(tmp_path, capsys):
    """The paper suite on a softmax model runs cross-entropy: the plan line and the attack lines say so."""
    ce = train(from_dict({**TINY, "train": {**TINY["train"], "method": "ce"}}), tmp_path / "ce", quiet=True)
    assert cli.main(["evaluate", str(ce), "--suite", "paper", "--n", "20"]) == 0
    said = capsys.readouterr()  # the plan line goes to stdout, each attack's line to stderr
    assert "suite paper (pgd-20 (ce), pgd-100 (ce))" in said.out and "  pgd-20 (ce): accuracy after" in said.err
    assert "authors' loss" not in said.out + said.err


def test_n_beyond_the_test_split_is_said(capsys):
    x, y, _ = load_test_split(from_dict(TINY), 100000)
    assert len(y) == 360
    assert "has 360: using all 360" in capsys.readouterr().err


def test_interrupted_evaluate_exits_130_and_says_how_to_continue(run, capsys, monkeypatch):
    from repulsor.evaluation import run as evaluate_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate_run", interrupted)
    assert cli.main(["evaluate", str(run)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "run the same command again to continue" in err[0]


def test_files_are_written_with_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "shared.txt", "x")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


def test_export_refuses_to_overwrite(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli.main(["export", str(run), "--out", str(out)]) == 2
    assert "already holds an export" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before


def test_resolve_paths_makes_folders_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_paths(from_dict({"data": {"name": "digits", "data_dir": "d", "test_dir": ""},
                                   "prototypes": {"file": "p.safetensors"}}))
    assert cfg.data.data_dir == str(tmp_path / "d") and cfg.data.test_dir == ""
    assert cfg.prototypes.file == str(tmp_path / "p.safetensors")


def test_analyse_prints_its_key_numbers(run, capsys):
    assert cli.main(["analyse", str(run), "--n", "20", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "first 20 test points" in out and "clean " in out and "PGD-20 (CE)" in out
    assert "robustness curve" in out and "adversarial confusion" in out


def test_python_dash_m_is_the_same_command_line(monkeypatch, capsys):
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["repulsor", "--version"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("repulsor", run_name="__main__")
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("repulsor ")


@pytest.mark.slow
def test_evaluate_rand_suite_and_a_surrogate_on_a_run(run, tmp_path, capsys):
    run = Path(shutil.copytree(run, tmp_path / "run"))
    assert cli.main(["evaluate", str(run), "--suite", "rand", "--n", "20", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "suite rand" in out and "apgd-ce (eot 20)" in out and "apgd-dlr (eot 20)" in out
    assert "randomised" not in out  # a trained run is deterministic: one pass per decision
    assert cli.main(["evaluate", str(run), "--suite", "quick", "--n", "20", "--quiet", "--surrogate", str(run)]) == 0
    out = capsys.readouterr().out
    assert "transfer (apgd-ce on the surrogate)" in out
    results = json.loads((run / "results.json").read_text())
    assert results["suites"]["quick"]["surrogate"] == str(run.resolve())
    assert cli.main(["evaluate", str(run), "--surrogate", str(run / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
