"""Crash safety: a run killed with SIGKILL mid-epoch, or stopped by SIGTERM, resumes to the
exact result of an uninterrupted run (CPU, fp32: bitwise identical weights and metrics)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repulsor.store.files import load_tensors

# Subprocesses that each import torch or train: the full run only (the README's fast subset skips them).
pytestmark = pytest.mark.slow

# Small batches make an epoch long enough (hundreds of steps) to be interrupted inside it.
SETTINGS = [
    "data.name=digits", "model.name=mlp", "model.width=0.5", "prototypes.dim=16", "prototypes.epochs=20",
    "train.method=prototype", "train.epochs=12", "train.batch_size=4", "train.lr=0.02", "train.precision=fp32",
    "train.eps=0.1", "train.val_n=50", "train.val_attack_steps=2", "eval.after_train=false",
]


def command(*args):
    return [sys.executable, "-m", "repulsor", *args]


def train_args(out):
    args = ["train", "--out", str(out), "--quiet"]
    for setting in SETTINGS:
        args += ["--set", setting]
    return args


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", REPULSOR_TEST_THREADS="1")


def run_to_end(out):
    subprocess.run(command(*train_args(out)), check=True, env=env(), capture_output=True, timeout=600)


def wait_for(predicate, process, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path):
    wa, _ = load_tensors(a / "model.safetensors")
    wb, _ = load_tensors(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    ma, mb = metrics(a), metrics(b)
    drop = ("seconds",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in ma] == \
           [{k: v for k, v in m.items() if k not in drop} for m in mb]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run_to_end(out)
    return out


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_is_exact(reference, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(command(*train_args(out)), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Wait until epoch 1 is checkpointed, then kill inside a later epoch.
    wait_for(lambda: (out / "checkpoints" / "last.safetensors").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(metrics(out)) < 12, "the run finished before it could be killed"
    assert not (out / "model.safetensors").exists()
    subprocess.run(command("train", "--resume", str(out), "--quiet"), check=True, env=env(), capture_output=True,
                   timeout=600)
    assert_same_run(reference, out)


@pytest.mark.slow
def test_kill_before_first_checkpoint_restarts_cleanly(reference, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(command(*train_args(out)), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: (out / "config.toml").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "checkpoints" / "last.safetensors").exists()
    subprocess.run(command("train", "--resume", str(out), "--quiet"), check=True, env=env(), capture_output=True,
                   timeout=600)
    assert_same_run(reference, out)


@pytest.mark.slow
def test_sigterm_saves_mid_epoch_checkpoint_and_resume_is_exact(reference, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(command(*train_args(out)), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: (out / "checkpoints" / "last.safetensors").exists(), process)
    time.sleep(0.1)  # into epoch 2 (an epoch is about 360 steps, several tenths of a second)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    message = stderr.decode().strip().splitlines()
    assert len(message) == 1 and "stopped by SIGTERM" in message[0] and "--resume" in message[0]
    _, meta = load_tensors(out / "checkpoints" / "last.safetensors")
    assert meta["state"]["step"] > 0, "the checkpoint should be inside an epoch"
    subprocess.run(command("train", "--resume", str(out), "--quiet"), check=True, env=env(), capture_output=True,
                   timeout=600)
    assert_same_run(reference, out)
