"""The run folder's owner: one writer at a time, stale locks recognised, weights tied to their run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w
import torch

import repulsor
from repulsor import cli
from repulsor.store import run as store
from repulsor.config import from_dict, load_config, to_dict
from repulsor.errors import UserError
from repulsor.evaluation.run import evaluate_run
from repulsor.training.loop import train

from conftest import TINY

def _config(**train):
    return from_dict({**TINY, "train": {**TINY["train"], **train}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs with weights of the same shapes: the prototype model, and one trained with
    another seed and learning rate (its own prototypes too)."""
    root = tmp_path_factory.mktemp("store")
    return train(_config(), root / "prototype", quiet=True), train(from_dict({**TINY, "train": {**TINY["train"], "seed": 1, "lr": 0.02},
                                        "prototypes": {**TINY["prototypes"], "seed": 1}}), root / "other", quiet=True)


def _hold(folder, pid, host=None, command="train"):
    (folder / store.LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                 "command": command, "since": "2026-12-02 10:00:00"}))


def test_a_second_writer_is_refused_with_one_line(tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        out.mkdir()
        _hold(out, sleeper.pid)
        with pytest.raises(UserError, match=rf"being written by process {sleeper.pid} .*\(train"):
            train(_config(), out, quiet=True)
        assert sorted(p.name for p in out.iterdir()) == [store.LOCK]  # nothing written beside the lock
        config = tmp_path / "tiny.toml"
        config.write_text("[data]\nname = 'digits'\n")
        assert cli.main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"process {sleeper.pid}" in err
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    _hold(out, dead.pid)
    run = train(_config(), out, quiet=True)
    assert (run / store.MODEL).is_file() and not (run / store.LOCK).exists()
    assert f"locked by process {dead.pid}" in capsys.readouterr().err


def test_a_lock_from_another_host_is_not_guessed_at(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    _hold(out, 1, host="elsewhere")
    with pytest.raises(UserError, match=r"elsewhere.*delete .*\.lock"):
        train(_config(), out, quiet=True)


def test_evaluate_takes_the_lock_too(runs, tmp_path):
    run = shutil.copytree(runs[0], tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _hold(run, sleeper.pid, command="evaluate")
        with pytest.raises(UserError, match="being written"):
            evaluate_run(run, quiet=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    (run / store.LOCK).unlink()
    assert cli.main(["evaluate", str(run), "--quiet"]) == 0
    assert not (run / store.LOCK).exists()


def test_a_failed_start_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(UserError):
        train(_config(batch_size=100_000), out, quiet=True)
    assert not (tmp_path / "a").exists()


def test_weights_from_another_run_are_refused(runs, tmp_path):
    prototype, other = runs
    mixed = shutil.copytree(prototype, tmp_path / "mixed")
    shutil.copy(other / store.MODEL, mixed / store.MODEL)  # same shapes, another run
    with pytest.raises(UserError, match="trained in another run"):
        repulsor.load_model(mixed)
    assert cli.main(["evaluate", str(mixed), "--quiet"]) == 2


def test_the_fingerprint_ignores_what_reading_a_run_may_change(runs, tmp_path):
    prototype, _ = runs
    moved = shutil.copytree(prototype, tmp_path / "moved")
    saved = tomllib.loads((moved / store.CONFIG).read_text())
    saved["eval"]["n"] = 7
    saved["data"]["data_dir"] = str(tmp_path / "data moved here")
    (moved / store.CONFIG).write_text(tomli_w.dumps(saved))
    repulsor.load_model(moved)  # same weights, same run, other evaluation settings: accepted
    saved["train"]["lr"] = 0.5
    (moved / store.CONFIG).write_text(tomli_w.dumps(saved))
    with pytest.raises(UserError, match="trained in another run"):
        repulsor.load_model(moved)
    cfg = json.loads(json.dumps({"train": {"lr": 0.1, "device": "cpu"}, "eval": {"n": 1},
                                 "data": {"name": "digits", "data_dir": "/x"}}))
    same = store.fingerprint({**cfg, "eval": {"n": 2}, "data": {"name": "digits", "data_dir": "/y"},
                              "train": {"lr": 0.1, "device": "cuda"}}, None)
    assert store.fingerprint(cfg, None) == same
    assert store.fingerprint({**cfg, "train": {"lr": 0.2}}, None) != same
    assert store.fingerprint(cfg, torch.ones(2, 3)) != store.fingerprint(cfg, -torch.ones(2, 3))


def test_each_suite_says_its_own_points_code_and_time(runs, tmp_path, capsys):
    run = shutil.copytree(runs[0], tmp_path / "run")
    assert cli.main(["evaluate", str(run), "--quiet", "--n", "30"]) == 0
    assert cli.main(["evaluate", str(run), "--quiet", "--n", "12", "--suite", "paper"]) == 0
    out = capsys.readouterr().out.split("suite paper")[1]
    assert "first 12 points" in out
    results = json.loads((run / store.RESULTS).read_text())
    quick, paper = results["suites"]["quick"], results["suites"]["paper"]
    assert (quick["n"], paper["n"]) == (30, 12)
    for suite in (quick, paper):
        assert suite["code_version"] == results["code_version"] and suite["evaluated_at"]
    assert "quick" in out and "(n=30)" in out  # the earlier suite is named with its own n, apart


def test_no_lock_is_left_after_training(runs):
    for run in runs:
        assert not (run / store.LOCK).exists()
        assert os.listdir(run)


def test_a_setting_added_later_keeps_earlier_fingerprints_at_its_default():
    earlier = {"model": {"name": "fast_cifar", "width": 1.0}, "train": {"lr": 0.1}}
    now = {"model": {"name": "fast_cifar", "width": 1.0, "centre_features": True}, "train": {"lr": 0.1}}
    changed = {"model": {"name": "fast_cifar", "width": 1.0, "centre_features": False}, "train": {"lr": 0.1}}
    assert store.fingerprint(now, None) == store.fingerprint(earlier, None)
    assert store.fingerprint(changed, None) != store.fingerprint(earlier, None)
    now["model"]["whiten_directions"] = 0  # added in 0.5.1
    assert store.fingerprint(now, None) == store.fingerprint(earlier, None)
    now["model"]["whiten_directions"] = 6
    assert store.fingerprint(now, None) != store.fingerprint(earlier, None)
    now["model"]["whiten_directions"] = 0
    earlier["data"] = {"name": "cifar10"}
    now["data"] = {"name": "cifar10", "padding": "zeros", "flip": "random"}  # added in 0.5.2
    assert store.fingerprint(now, None) == store.fingerprint(earlier, None)
    for key, value in (("padding", "reflect"), ("flip", "alternate")):
        assert store.fingerprint({**now, "data": {**now["data"], key: value}}, None) != store.fingerprint(earlier, None)


def test_no_setting_at_its_default_enters_the_fingerprint():
    """The general rule: whatever a later version adds, at its default it leaves every fingerprint alone."""
    from repulsor.config import Config, to_dict

    full = to_dict(Config())
    for section, values in full.items():
        for key in values:
            without = {s: {k: v for k, v in vals.items() if (s, k) != (section, key)} for s, vals in full.items()}
            assert store.fingerprint(without, None) == store.fingerprint(full, None), (section, key)
    assert store.fingerprint({**full, "train": {**full["train"], "objective": "batch_cosine"}}, None) \
        != store.fingerprint(full, None)


def test_weights_saved_under_the_earlier_rule_still_load(runs, tmp_path):
    """A run written by 0.4.0-0.6.0 carries the fingerprint of their rule (every setting its config file
    held, but a few at their defaults); it loads, and weights of another run are still refused."""
    from safetensors.torch import load_file, save_file

    prototype, other = runs
    old = shutil.copytree(prototype, tmp_path / "old")
    saved = tomllib.loads((old / store.CONFIG).read_text())
    del saved["model"]["output_scale"]  # a setting its version did not have
    (old / store.CONFIG).write_text(tomli_w.dumps(saved))
    config = json.loads(json.dumps(to_dict(load_config(old / store.CONFIG))))
    prototypes = load_file(str(old / "prototypes.safetensors"))["prototypes"]
    legacy = store.legacy_fingerprint(config, saved, prototypes)
    assert legacy != store.run_fingerprint(old)
    tensors = load_file(str(old / store.MODEL))
    save_file(tensors, str(old / store.MODEL), metadata={"fingerprint": legacy})
    repulsor.load_model(old)
    shutil.copy(other / store.MODEL, old / store.MODEL)
    with pytest.raises(UserError, match="trained in another run"):
        repulsor.load_model(old)


COMMITTED = sorted(path.parent for path in (Path(__file__).resolve().parents[1] / "results").rglob("model.safetensors"))


@pytest.mark.parametrize("run", COMMITTED, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_every_committed_run_still_loads_and_evaluates(run, shared_data):
    """Every run folder under results/ loads (its fingerprint, of whichever rule wrote it, is accepted)
    and evaluates on its first test points like the trained model it is."""
    from repulsor.config import load_run_config
    from repulsor.evaluation.run import load_test_split

    model = repulsor.load_model(run)
    cfg = load_run_config(run)
    x, y, _ = load_test_split(cfg, 16)
    result = repulsor.evaluate(model, x, y, suite="quick", eps=cfg.eval.eps, norm=cfg.eval.norm)
    assert 0 <= result["robust_accuracy"] <= result["clean_accuracy"] <= 1
    assert result["clean_accuracy"] >= 0.5  # a trained CIFAR-10 or MNIST model, not random weights
