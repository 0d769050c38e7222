"""Bad input through the real command line: one line, exit status 2, nothing left behind.

Every case runs ``python -m repulsor ...`` in a subprocess and checks the contract of
``repulsor.errors.UserError``:

* exit status 2;
* stderr is exactly one line, starting with ``repulsor: error:`` and naming the problem
  (the key, the file or the value: each case gives a fragment the line must contain);
* no ``Traceback`` on stdout or stderr;
* nothing partial left behind: a fresh ``--out`` folder is not created, and every file
  of a pre-existing run folder (``results.json`` included) is unchanged byte for byte.

A disk-full write cannot be simulated across a subprocess, so those cases call
``repulsor.cli.main`` in-process with ``os.fsync`` / ``os.replace`` raising ENOSPC.

The subprocesses run with one thread each (the machine is shared); every case takes
about as long as importing torch, and only the NaN cases train at all.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from repulsor import cli

# Subprocesses that each import torch or train: the full run only (the README's fast subset skips them).
pytestmark = pytest.mark.slow

# --------------------------------------------------------------------------- helpers

_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# The tiny finished run every evaluate case starts from (the brief's command, one epoch).
TINY_RUN = [
    "--set", "data.name=digits", "--set", "model.name=mlp", "--set", "model.width=0.25",
    "--set", "prototypes.dim=16", "--set", "prototypes.epochs=10", "--set", "train.epochs=1",
    "--set", "train.precision=fp32", "--set", "train.eps=0.1", "--set", "train.val_n=50",
    "--set", "eval.n=50", "--set", "eval.eps=0.1",
]
# Valid settings for train cases that would start training if the bad value were accepted.
CHEAP = TINY_RUN + ["--set", "eval.after_train=false", "--quiet"]
MNIST = ["--set", "data.name=mnist", "--set", "train.epochs=1", "--set", "train.val_n=20",
         "--set", "eval.after_train=false", "--quiet"]


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """The command line in this process (``cli.main``, what ``python -m repulsor`` runs), its
    output captured: the same exit status and text as a subprocess, without importing torch
    again for each case. ``test_the_real_entry_point_speaks_the_same`` runs one case as a subprocess."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as stop:  # argparse's usage errors and --help
                code = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(["repulsor", *map(str, args)], code, out.getvalue(), err.getvalue())


def run_cli_subprocess(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "repulsor", *map(str, args)], capture_output=True, text=True,
                          env=_ENV, cwd=cwd, timeout=300, check=False)


def assert_one_line_error(stdout: str, stderr: str, code: int, fragments) -> str:
    __tracebackhide__ = True
    assert "Traceback" not in stdout and "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert code == 2, f"exit status {code}, stderr:\n{stderr}"
    assert len(lines) == 1, f"stderr is {len(lines)} lines, not one:\n{stderr}"
    line = lines[0]
    assert line.startswith("repulsor: error: "), line
    for fragment in [fragments] if isinstance(fragments, str) else fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def snapshot(path: Path):
    """Every file under ``path`` with its sha256 (None when ``path`` does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(path.rglob("*"))}


# --------------------------------------------------------------------------- the workspace


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@dataclass
class Workspace:
    root: Path
    run: Path  # a finished tiny prototype run (never modified by a case)
    paths: dict = field(default_factory=dict)

    def __getattr__(self, name):
        try:
            return self.__dict__["paths"][name]
        except KeyError:
            raise AttributeError(name) from None

    def out(self, name: str) -> Path:
        return self.root / "out" / name


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("bad_input")
    run = root / "run"
    made = run_cli("train", "--out", run, *TINY_RUN, "--quiet")
    assert made.returncode == 0, made.stderr
    assert (run / "model.safetensors").is_file() and (run / "results.json").is_file()
    # Another architecture (linear head, wider MLP): its weights do not fit the run's model.
    other = root / "other_run"
    made = run_cli("train", "--out", other, *TINY_RUN, "--set", "train.method=ce", "--set", "model.width=0.5",
                   "--set", "train.eps=0", "--set", "eval.after_train=false", "--quiet")
    assert made.returncode == 0, made.stderr
    (root / "out").mkdir()
    p: dict[str, Path] = {}

    # Config files.
    def text(name, content):
        p[name] = root / name
        p[name].write_text(content) if isinstance(content, str) else p[name].write_bytes(content)

    text("unknown_key", "[train]\nbogus = 1\n")
    text("unknown_section", "[nonsense]\na = 1\n")
    text("wrong_type", '[train]\nlr = "fast"\n')
    text("invalid_toml", "[train\nepochs = 1\n")
    text("not_utf8", b"\xff\xfe[train]\n")
    p["config_folder"] = root / "config_folder"
    p["config_folder"].mkdir()

    # Data folders in the .npz format of /work/shared/data (and IDX), each wrong in one way.
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, 10, 200)

    def folder(name, **arrays):
        p[name] = root / name
        p[name].mkdir()
        if arrays:
            np.savez_compressed(p[name] / "train.npz", **arrays)
            np.savez_compressed(p[name] / "test.npz", x=x, y=y)
        return p[name]

    _truncate(folder("npz_truncated", x=x, y=y) / "train.npz")
    folder("npz_3d", x=x[..., 0], y=y)
    folder("npz_labels", x=x, y=y + 5)
    folder("npz_float", x=x.astype(np.float32) / 255, y=y)
    idx = folder("idx_truncated")
    _write_idx(idx / "train-images-idx3-ubyte", x[..., 0])
    _write_idx(idx / "train-labels-idx1-ubyte", y)
    _truncate(idx / "train-images-idx3-ubyte", 0.1)
    (folder("no_data_files") / "readme.txt").write_text("nothing to see\n")
    p["missing_folder"] = root / "no_such_folder"

    # Prototype files: wrong D, wrong k, corrupt.
    for name, k, d in (("protos_wrong_d", 10, 8), ("protos_wrong_k", 5, 16)):
        p[name] = root / f"{name}.safetensors"
        made = run_cli("prototypes", "--classes", k, "--dim", d, "--epochs", 5, "--out", p[name])
        assert made.returncode == 0, made.stderr
    p["protos_corrupt"] = root / "protos_corrupt.safetensors"
    p["protos_corrupt"].write_bytes(p["protos_wrong_k"].read_bytes()[:100])

    # Runs broken in one way each (copies of the finished run).
    def broken_run(name):
        p[name] = root / name
        shutil.copytree(run, p[name])
        return p[name]

    _truncate(broken_run("run_truncated_model") / "model.safetensors")
    shutil.copy(other / "model.safetensors", broken_run("run_foreign_model") / "model.safetensors")
    shutil.copy(p["protos_wrong_d"], broken_run("run_foreign_protos") / "prototypes.safetensors")
    (broken_run("run_bad_config") / "config.toml").write_text("[train\n")
    p["not_a_run"] = root / "not_a_run"
    p["not_a_run"].mkdir()
    (p["not_a_run"] / "notes.txt").write_text("hello\n")
    p["a_file"] = root / "a_file.txt"
    p["a_file"].write_text("a file where a folder should be\n")
    return Workspace(root, run, p)


# --------------------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    args: Callable[[Workspace], list]
    fragment: str | tuple
    # Paths that must be exactly as before (absent stays absent); default: the --out folder.
    watch: Callable[[Workspace], list] | None = None
    marks: tuple = ()


def _out_of(args: list) -> list[Path]:
    return [Path(args[i + 1]) for i, a in enumerate(args) if a in ("--out", "--resume")]


def train_cfg(config_name):
    return lambda w: ["train", "--config", w.paths[config_name], "--out", w.out(config_name), *CHEAP]


def train_set(case_id, *settings):
    return lambda w: ["train", "--out", w.out(case_id), *CHEAP, *[a for s in settings for a in ("--set", s)]]


def train_data(case_id, data):
    return lambda w: ["train", "--out", w.out(case_id), *MNIST, "--data-dir", w.paths[data]]


def evaluate(run_attr, *extra):
    return lambda w: ["evaluate", getattr(w, run_attr), *extra, "--quiet"]


def protos(case_id, *settings):
    return lambda w: ["train", "--out", w.out(case_id), *CHEAP,
                      *[a for s in settings for a in ("--set", s.format(**w.paths))]]


def run_and_out(w):
    return [w.run]


CASES = [
    # ---- configs
    Case("config-unknown-key", train_cfg("unknown_key"), ("train.bogus", "valid keys")),
    Case("config-unknown-section", train_cfg("unknown_section"), "[nonsense]"),
    Case("config-wrong-type", train_cfg("wrong_type"), ("train.lr", "must be a number", "'fast'")),
    Case("set-wrong-type", train_set("set-wrong-type", "train.nesterov=3"), ("train.nesterov", "true or false")),
    Case("eps-negative", train_set("eps-negative", "train.eps=-0.1"), ("train.eps = -0.1", ">= 0")),
    Case("eps-above-1", train_set("eps-above-1", "train.eps=1.5"), ("train.eps = 1.5", "larger than 1")),
    Case("eps-in-pixels", train_set("eps-in-pixels", "train.eps=8"), ("train.eps = 8", '"8/255"')),
    Case("alpha-in-pixels", train_set("alpha-in-pixels", "train.alpha=8"), ("train.alpha = 8", '"8/255"')),
    Case("eps-nan", train_set("eps-nan", "train.eps=nan"), ("train.eps", "finite")),
    Case("lr-inf", train_set("lr-inf", "train.lr=inf"), ("train.lr", "finite")),
    Case("dim-below-classes", train_set("dim-below-classes", "prototypes.dim=5"),
         ("prototypes.dim = 5", "10 classes")),
    Case("epochs-zero", train_set("epochs-zero", "train.epochs=0"), ("train.epochs = 0", ">= 1")),
    Case("epochs-negative", train_set("epochs-negative", "train.epochs=-3"), ("train.epochs = -3", ">= 1")),
    Case("batch-zero", train_set("batch-zero", "train.batch_size=0"), ("train.batch_size = 0", ">= 1")),
    Case("batch-negative", train_set("batch-negative", "train.batch_size=-8"), ("train.batch_size = -8", ">= 1")),
    Case("batch-above-train-set", train_set("batch-above-train-set", "train.batch_size=100000"),
         ("train.batch_size = 100000", "larger than the 1293 training images")),
    Case("unknown-method", train_set("unknown-method", "train.method=magic"), "train.method = 'magic'"),
    Case("unknown-suite-in-config", train_set("unknown-suite-in-config", "eval.suite=nonsense"),
         "eval.suite = 'nonsense'"),
    Case("model-too-big-for-images", train_set("model-too-big-for-images", "model.name=small_cnn"),
         ("small_cnn", "8x8")),
    Case("invalid-toml", train_cfg("invalid_toml"), ("invalid_toml", "not valid TOML")),
    Case("config-not-utf8", train_cfg("not_utf8"), ("not_utf8", "not valid TOML")),
    Case("config-is-folder", train_cfg("config_folder"), ("config_folder", "is a folder")),
    Case("config-missing", lambda w: ["train", "--config", w.root / "missing.toml", "--out", w.out("cm"), *CHEAP],
         ("missing.toml", "does not exist")),
    Case("set-without-equals", lambda w: ["train", "--out", w.out("swe"), *CHEAP, "--set", "trainlr"],
         ("--set 'trainlr'", "section.key=value")),
    Case("set-without-section", lambda w: ["train", "--out", w.out("sws"), *CHEAP, "--set", "lr=0.1"],
         ("--set 'lr=0.1'", "section.key=value")),
    Case("set-bad-fraction", train_set("set-bad-fraction", "train.eps=8/0"), ("train.eps", "'8/0'")),
    Case("train-without-out", lambda w: ["train", *CHEAP], "--out"),
    Case("resume-with-set", lambda w: ["train", "--resume", w.run, "--set", "train.lr=0.1", "--quiet"],
         "--resume takes the run's own config", watch=run_and_out),
    # ---- data
    Case("npz-truncated", train_data("npz-truncated", "npz_truncated"), ("train.npz", "corrupt or truncated")),
    Case("npz-3d-images", train_data("npz-3d-images", "npz_3d"), ("train.npz", "(200, 28, 28)", "28 x 28 x 1")),
    Case("npz-labels-out-of-range", train_data("npz-labels-out-of-range", "npz_labels"),
         ("train.npz", "labels range over 5..14", "0..9")),
    Case("npz-float-images", train_data("npz-float-images", "npz_float"), ("train.npz", "uint8")),
    Case("idx-truncated", train_data("idx-truncated", "idx_truncated"), ("train-images-idx3-ubyte", "truncated")),
    Case("data-folder-missing", train_data("data-folder-missing", "missing_folder"),
         ("no_such_folder", "does not exist")),
    Case("data-folder-unrecognised", train_data("data-folder-unrecognised", "no_data_files"),
         ("no mnist train data", "no_data_files", "train.npz")),
    Case("data-dir-is-file", train_data("data-dir-is-file", "a_file"), ("a_file.txt", "not a folder")),
    # ---- checkpoints and prototype files
    Case("evaluate-truncated-model", evaluate("run_truncated_model"), ("model.safetensors", "corrupt"),
         watch=lambda w: [w.run_truncated_model]),
    Case("evaluate-foreign-model", evaluate("run_foreign_model"), ("model.safetensors", "does not match"),
         watch=lambda w: [w.run_foreign_model]),
    Case("evaluate-foreign-prototypes", evaluate("run_foreign_protos"), ("does not match", "prototypes"),
         watch=lambda w: [w.run_foreign_protos]),
    Case("evaluate-corrupt-config", evaluate("run_bad_config"), ("config.toml", "not valid TOML"),
         watch=lambda w: [w.run_bad_config]),
    Case("prototypes-file-wrong-d", protos("pw-d", "prototypes.file={protos_wrong_d}"), ("D=8", "D=16")),
    Case("prototypes-file-wrong-k", protos("pw-k", "prototypes.file={protos_wrong_k}"), ("k=5", "k=10")),
    Case("prototypes-file-corrupt", protos("pw-c", "prototypes.file={protos_corrupt}"),
         ("protos_corrupt.safetensors", "not a readable safetensors")),
    Case("prototypes-file-missing", protos("pw-m", "prototypes.file={missing_folder}/p.safetensors"),
         ("p.safetensors", "does not exist")),
    Case("evaluate-not-a-run", evaluate("not_a_run"), ("not_a_run", "not a run folder"),
         watch=lambda w: [w.not_a_run]),
    Case("evaluate-missing-run", evaluate("missing_folder"), ("no_such_folder", "does not exist")),
    Case("evaluate-file-as-run", evaluate("a_file"), ("a_file.txt", "not a folder")),
    Case("resume-not-a-run", lambda w: ["train", "--resume", w.not_a_run, "--quiet"],
         ("cannot resume", "not_a_run", "no config.toml")),
    Case("resume-missing-folder", lambda w: ["train", "--resume", w.missing_folder, "--quiet"],
         ("cannot resume", "does not exist")),
    Case("resume-finished-run", lambda w: ["train", "--resume", w.run, "--quiet"], "already finished",
         watch=run_and_out),
    # ---- outputs
    Case("out-under-a-file", lambda w: ["train", "--out", w.a_file / "run", *CHEAP],
         ("a_file.txt", "not a folder"), watch=lambda w: [w.a_file]),
    Case("out-is-a-file", lambda w: ["train", "--out", w.a_file, *CHEAP], ("a_file.txt", "a file of that name")),
    Case("out-holds-a-run", lambda w: ["train", "--out", w.run, *CHEAP], "already holds a run", watch=run_and_out),
    Case("prototypes-out-under-a-file", lambda w: ["prototypes", "--classes", 10, "--dim", 10, "--epochs", 1,
                                                   "--out", w.a_file / "p.safetensors"],
         ("a_file.txt", "not a folder"), watch=lambda w: [w.a_file]),
    Case("prototypes-out-is-a-folder", lambda w: ["prototypes", "--classes", 10, "--dim", 10, "--epochs", 1,
                                                  "--out", w.not_a_run],
         ("not_a_run", "folder"), watch=lambda w: [w.not_a_run]),
    # ---- evaluate options
    Case("evaluate-eps-in-pixels", evaluate("run", "--eps", "8"), ("eps = 8", "8/255"), watch=run_and_out),
    Case("evaluate-eps-negative", evaluate("run", "--eps", "-0.1"), ("eps = -0.1", "finite number >= 0"), watch=run_and_out),
    Case("evaluate-unknown-suite", evaluate("run", "--suite", "nonsense"), ("'nonsense'", "quick"),
         watch=run_and_out),
    Case("evaluate-n-zero", evaluate("run", "--n", "0"), ("--n 0", ">= 1"), watch=run_and_out),
    Case("evaluate-n-negative", evaluate("run", "--n", "-5"), ("--n -5", ">= 1"), watch=run_and_out),
    Case("evaluate-batch-size-zero", evaluate("run", "--batch-size", "0"), ("--batch-size 0", ">= 1"),
         watch=run_and_out),
    Case("evaluate-unknown-device", evaluate("run", "--device", "tpu9"), "'tpu9'", watch=run_and_out),
    Case("evaluate-norm-l3", evaluate("run", "--norm", "l3"), ("--norm", "'l3'"), watch=run_and_out),
    Case("evaluate-n-not-a-number", evaluate("run", "--n", "ten"), ("--n", "'ten'"), watch=run_and_out),
    Case("evaluate-eps-unreadable", evaluate("run", "--eps", "8/0"), ("--eps", "'8/0'"), watch=run_and_out),
    # ---- prototypes command
    Case("prototypes-one-class", lambda w: ["prototypes", "--classes", 1, "--dim", 10], ("num_classes", "got 1")),
    Case("prototypes-dim-zero", lambda w: ["prototypes", "--classes", 10, "--dim", 0], ("dim", "got 0")),
    Case("prototypes-negative-epochs", lambda w: ["prototypes", "--classes", 10, "--dim", 10, "--epochs", -1],
         ("epochs", "got -1")),
    Case("prototypes-lr-zero", lambda w: ["prototypes", "--classes", 10, "--dim", 10, "--lr", 0], ("lr", "> 0")),
    Case("prototypes-unknown-metric", lambda w: ["prototypes", "--classes", 10, "--dim", 10, "--metric", "foo"],
         ("--metric", "'foo'")),
    Case("unknown-command", lambda w: ["trian"], "'trian'"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(ws, case):
    args = case.args(ws)
    watched = case.watch(ws) if case.watch else _out_of(args)
    before = {path: snapshot(path) for path in watched}
    result = run_cli(*args, cwd=ws.root)
    assert_one_line_error(result.stdout, result.stderr, result.returncode, case.fragment)
    for path, old in before.items():
        assert snapshot(path) == old, f"{path} changed (or was created) although the command failed"
    assert not list(ws.root.rglob("*.tmp")), "a temporary file was left behind"


def test_the_real_entry_point_speaks_the_same(ws):
    """One case through ``python -m repulsor`` in a subprocess: what the in-process cases assume."""
    for args, fragment in ((["trian"], "'trian'"), (["evaluate", ws.root / "no_such_run"], "does not exist")):
        result = run_cli_subprocess(*args, cwd=ws.root)
        assert_one_line_error(result.stdout, result.stderr, result.returncode, fragment)
        inside = run_cli(*args, cwd=ws.root)
        assert (inside.returncode, inside.stderr) == (result.returncode, result.stderr)


def test_cases_are_many_and_distinct():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- NaN loss

NAN_COMMON = ["--set", "data.name=digits", "--set", "model.name=mlp", "--set", "model.width=0.25",
              "--set", "train.method=ce", "--set", "train.precision=fp32", "--set", "train.val_n=50",
              "--set", "train.eps=0", "--set", "eval.n=50", "--set", "train.lr=1e30", "--quiet"]


def test_nan_loss_in_first_epoch_stops_with_one_line(ws):
    out = ws.out("nan-first-epoch")
    result = run_cli("train", "--out", out, *NAN_COMMON, "--set", "train.schedule=constant",
                     "--set", "train.epochs=1")
    assert_one_line_error(result.stdout, result.stderr, result.returncode,
                          ("training stopped", "loss became", "epoch 1", "no weights were kept", "train.lr"))
    # Nothing that looks like a result: no checkpoint, no model, no results.
    assert not (out / "checkpoints").exists()
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()


def test_nan_loss_later_keeps_the_last_good_checkpoint(ws):
    # One step per epoch (the whole training set as a batch); the cyclic schedule starts at
    # lr_min = 0, so epochs 1 and 2 end finite and epoch 3 sees the blown-up weights.
    out = ws.out("nan-epoch-3")
    result = run_cli("train", "--out", out, *NAN_COMMON, "--set", "train.lr_min=0", "--set", "train.epochs=3",
                     "--set", "train.batch_size=1293")
    line = assert_one_line_error(result.stdout, result.stderr, result.returncode,
                                 ("training stopped", "loss became", "epoch 3", "last good checkpoint"))
    last = out / "checkpoints" / "last.safetensors"
    assert str(last) in line and last.is_file()
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()
    from repulsor.store.files import load_tensors

    tensors, meta = load_tensors(last)
    assert meta["state"]["epoch"] == 2 and all(torch.isfinite(t).all() for t in tensors.values())


# --------------------------------------------------------------------------- disk full (in-process)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _run_main(capsys, argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_disk_full_during_evaluate_keeps_results(ws, capsys, monkeypatch, failing):
    run = ws.root / f"run_disk_full_{failing}"
    shutil.copytree(ws.run, run)
    before = snapshot(run)
    results_before = (run / "results.json").read_bytes()
    monkeypatch.setattr(os, failing, _no_space)
    code, out, err = _run_main(capsys, ["evaluate", run, "--quiet"])
    monkeypatch.undo()
    assert_one_line_error(out, err, code, ("No space left on device", "free some space"))
    assert (run / "results.json").read_bytes() == results_before
    assert snapshot(run) == before
    assert not list(run.rglob("*.tmp"))


def test_disk_full_when_a_run_starts_leaves_no_folder(ws, capsys, monkeypatch):
    out = ws.out("disk-full-train")
    monkeypatch.setattr(os, "fsync", _no_space)
    code, stdout, stderr = _run_main(capsys, ["train", "--out", out, *CHEAP])
    monkeypatch.undo()
    assert_one_line_error(stdout, stderr, code, ("config.toml", "No space left on device"))
    assert not out.exists()


def test_disk_full_when_writing_prototypes(ws, capsys, monkeypatch):
    target = ws.root / "out" / "p_disk_full.safetensors"
    monkeypatch.setattr(os, "replace", _no_space)
    code, stdout, stderr = _run_main(capsys, ["prototypes", "--classes", 10, "--dim", 10, "--epochs", 1,
                                              "--out", target])
    monkeypatch.undo()
    # The statistics are printed on stdout before the write; the error is the one stderr line.
    assert_one_line_error(stdout, stderr, code, ("p_disk_full.safetensors", "No space left on device"))
    assert not target.exists() and not list(target.parent.glob("*.tmp"))
