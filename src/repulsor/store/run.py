"""The run folder's names, the lock of the process writing it, and the fingerprint of its weights.

A run folder is written by one process at a time: ``locked`` holds ``RUN/.lock`` (the pid,
host and command of the writer) while ``train`` or ``evaluate`` writes, refuses a second
writer with one line, and recognises a lock left by a killed process. The weights carry a
``fingerprint`` of the run they were trained in (its config without the evaluation and
data-folder settings, and its prototypes), so that weights copied in from another run are
refused instead of evaluated.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import files as ckpt
from ..config import Config, load_config, read_toml, to_dict
from ..errors import UserError
from ..formats import wilson_interval
from ..runtime import provenance, provenance_warning
from ..training.methods import METHODS
from ..models import build_for_method
from ..prototypes import load_prototypes

from .layout import CONFIG, LOCK, LOG, MODEL, PROTOTYPES, RESULTS, TRAINING  # CONFIG, LOCK, MODEL, RESULTS: also store.NAME

# Settings that may differ between training and reading a run without changing its weights.
_NOT_FINGERPRINTED = {"eval": None, "data": ("data_dir", "test_dir"), "prototypes": ("file",), "train": ("device",)}
# The rule of 0.4.0-0.6.0, kept to recognise the weights those versions saved: every setting their
# config file held entered the fingerprint, except these when at their defaults. Frozen: settings added
# later never need a place here, because the rule below leaves out every setting at its default.
_LEGACY_UNLESS = {("model", "centre_features"): True, ("model", "whiten_directions"): 0,
                  ("data", "padding"): "zeros", ("data", "flip"): "random", ("model", "normalize"): True,
                  ("model", "output_scale"): 1 / 9, ("train", "objective"): "rule", ("train", "optimizer"): "sgd"}


def decides_weights(section: str, key: str) -> bool:
    """Whether setting ``section.key`` can change what a run's weights are (it enters the
    fingerprint); the folders of the data and the device do not, nor anything under ``eval``."""
    dropped = _NOT_FINGERPRINTED.get(section, ())
    return dropped is not None and key not in dropped


def _deciding(config: dict, enters) -> dict:
    """The settings of ``config`` that decide weights and for which ``enters(section, key, value)``."""
    kept = {}
    for section, values in config.items():
        if _NOT_FINGERPRINTED.get(section, ()) is None:
            continue
        if not isinstance(values, dict):
            kept[section] = values
            continue
        kept[section] = {k: v for k, v in values.items() if decides_weights(section, k) and enters(section, k, v)}
    return kept


def _digest(kept: dict, prototypes: torch.Tensor | None) -> str:
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode())
    if prototypes is not None:
        digest.update(prototypes.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(config: dict, prototypes: torch.Tensor | None) -> str:
    """A short hash of what decides a run's weights: its config (as ``config.to_dict`` gives it)
    and its prototypes [k, D] (or None).

    A setting enters only when it decides weights (not ``eval``, the data's folders, the device)
    and differs from its default, so a setting added in a later version, at its default, never
    changes the fingerprint of an earlier run. The other side of that rule: a default must never
    change (add a setting instead), or runs that relied on it would no longer match.
    """
    defaults = to_dict(Config())

    def enters(section, key, value):
        base = defaults.get(section, {})
        return key not in base or value != base[key]

    return _digest(_deciding(config, enters), prototypes)


def legacy_fingerprint(config: dict, saved: dict, prototypes: torch.Tensor | None) -> str:
    """The fingerprint 0.4.0-0.6.0 wrote, of ``config`` (``config.to_dict``) restricted to the settings
    its saved file ``saved`` (the TOML as written) holds: those are the settings of its version."""
    def enters(section, key, value):
        held = saved.get(section) if isinstance(saved.get(section), dict) else {}
        return key in held and ((section, key) not in _LEGACY_UNLESS or value != _LEGACY_UNLESS[section, key])

    return _digest(_deciding(config, enters), prototypes)


def check_fingerprint(run_dir: Path, meta: dict, expected: str | tuple[str, ...]) -> None:
    """Refuse weights whose recorded fingerprint is not the run's own (``expected``: the run's
    fingerprint, or every form it may have been written in; weights saved before fingerprints
    existed carry none and are accepted)."""
    found = meta.get("fingerprint")
    accepted = (expected,) if isinstance(expected, str) else tuple(expected)
    if found is not None and found not in accepted:
        raise UserError(f"{run_dir / MODEL} was trained in another run (fingerprint {found}, this run's is"
                        f" {accepted[0]}): its config or prototypes differ; evaluate the run the weights came from")


def run_fingerprint(run_dir: Path) -> str:
    """The fingerprint of the run saved in ``run_dir``, from its config file and prototypes
    file as written, so that training and loading compute it alike."""
    return run_fingerprints(run_dir)[0]


def run_fingerprints(run_dir: Path) -> tuple[str, str]:
    """The run's fingerprint and the form 0.4.0-0.6.0 wrote (``legacy_fingerprint``), so that
    their weights still load."""
    prototypes = None
    if (run_dir / PROTOTYPES).exists():
        prototypes, _ = load_prototypes(run_dir / PROTOTYPES)
    config = to_dict(load_config(run_dir / CONFIG))
    return fingerprint(config, prototypes), legacy_fingerprint(config, read_toml(run_dir / CONFIG), prototypes)


def load_model(run_dir: str | Path, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained model of a run as an ``nn.Module`` in eval mode.

    It takes images [N, C, H, W] in [0, 1] and returns class scores [N, k] (logits for
    linear heads; cosine similarities or negative distances for prototype heads), so any
    attack library can attack its real decision rule. Weights trained in another run (their
    fingerprint differs) are refused.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a folder" if run_dir.exists() else "does not exist"
        raise UserError(f"run folder {run_dir} {what}; pass a folder written by repulsor train --out")
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir} is not a run folder (it holds no {CONFIG}); pass a folder written by"
                        " repulsor train --out")
    if not (run_dir / MODEL).exists():
        raise UserError(f"{run_dir} holds no trained model ({MODEL}); finish training with: repulsor train --resume {run_dir}")
    cfg = load_config(run_dir / CONFIG)
    method = METHODS[cfg.train.method]
    prototypes = None
    if method.uses_prototypes:
        prototypes, _ = load_prototypes(run_dir / PROTOTYPES)
    model = build_for_method(cfg, method, prototypes)
    tensors, meta = ckpt.load_tensors(run_dir / MODEL, "model file")
    ckpt.load_model_state(model, tensors, run_dir / MODEL)  # weights of other shapes: refused here
    check_fingerprint(run_dir, meta, run_fingerprints(run_dir))  # of the same shapes: refused here
    return model.to(device).eval()


def read_results(run_dir: str | Path) -> dict:
    """The run's ``results.json`` as a dict; ``{}`` for a run not evaluated yet."""
    path = Path(run_dir) / RESULTS
    return ckpt.read_json(path, "results file") if path.exists() else {}


def read_training(run_dir: str | Path) -> dict | None:
    """The run's ``training.json`` (what the training cost and how it ran); None when absent."""
    path = Path(run_dir) / TRAINING
    return ckpt.read_json(path, "training record") if path.is_file() else None


def record_suite(run_dir: str | Path, key: str, result: dict, header: dict) -> dict:
    """Merge one suite's ``result`` into ``RUN/results.json`` under ``key`` and return the whole file.

    ``header`` (data set, split, n, clean accuracy of this evaluation) replaces the top-level
    fields; every suite keeps its own n, clean accuracy, code version and time, so suites of
    several evaluations sit side by side without one being presented as part of another.
    The file is written atomically: a killed process leaves the earlier version.
    """
    merged = read_results(run_dir)
    made = provenance()
    merged.pop("code_diff", None)
    merged.update(with_intervals(header, header.get("n")), **made)
    suites = merged.get("suites", {})
    result = with_intervals(result, result.get("n"))
    result["attacks"] = [with_intervals(entry, entry.get("n", result.get("n"))) for entry in result.get("attacks", [])]
    suites[key] = dict(result, **made, evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _warn_uncommitted(run_dir, made, f"suite {key}")
    merged["suites"] = suites
    # The flat contract: every attack of every suite evaluated so far, each with its suite.
    merged["attacks"] = [dict(entry, suite=name) for name, res in suites.items() for entry in res["attacks"]]
    merged["worst_case"] = {name: res["robust_accuracy"] for name, res in suites.items()}
    merged["last_suite"] = key
    ckpt.atomic_write_json(Path(run_dir) / RESULTS, merged)
    return merged


RECORD_SECTIONS = ("diagnostics", "certified")


def record_entry(run_dir: str | Path, section: str, key: str, result: dict) -> dict:
    """Merge ``result`` into ``RUN/results.json`` under ``section[key]``, atomically.

    ``diagnostics`` (``evaluation.protocols``: the authors' flawed evaluation paths, reproduced) and
    ``certified`` (``repulsor.certify``: lower bounds) stay apart from the suites: they never enter
    ``attacks`` or ``worst_case``.
    """
    if section not in RECORD_SECTIONS:
        raise ValueError(f"unknown results section {section!r}")  # a repulsor bug, not a user error
    merged = read_results(run_dir)
    entries = merged.get(section, {})
    made = provenance()
    entries[key] = dict(with_intervals(result, result.get("n")), **made, evaluated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _warn_uncommitted(run_dir, made, f"{section} {key}")
    merged[section] = entries
    ckpt.atomic_write_json(Path(run_dir) / RESULTS, merged)
    return merged


def with_intervals(record: dict, n) -> dict:
    """``record`` with ``<key>_ci95: [lower, upper]`` beside each accuracy of it (``clean_accuracy``,
    ``robust_accuracy``, ``accuracy``, ``accuracy_pooled``): the 95% Wilson interval on the ``n``
    points it was measured on. Existing keys are kept as they are; without ``n`` nothing is added."""
    if not n:
        return dict(record)
    out = dict(record)
    for key in ("clean_accuracy", "robust_accuracy", "accuracy", "accuracy_pooled", "certified_accuracy"):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
            out[f"{key}_ci95"] = [round(b, 6) for b in wilson_interval(round(value * n), int(n))]
    return out


def _warn_uncommitted(run_dir: str | Path, made: dict, what: str) -> None:
    """Say in the run's log and on stderr that a record comes from uncommitted changes."""
    warning = provenance_warning(made)
    if warning:
        append_log(run_dir, f"WARN {what}: {warning}; commit, then evaluate again for a result anyone can reproduce")
        print(f"repulsor: warning: {what} of {run_dir} {warning}", file=sys.stderr, flush=True)


def append_log(run_dir: str | Path, line: str) -> None:
    """Append one line to the run's human-readable ``log.txt``."""
    with open(Path(run_dir) / LOG, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or foreign: treated as held by an unknown writer


@contextmanager
def locked(run_dir: str | Path, what: str, *, create: bool = False):
    """Hold ``RUN/.lock`` while the body writes the run folder.

    Args:
        run_dir: the run folder. With ``create`` it is made (with its parents) if missing,
            and removed again on exit if the body left it empty.
        what: the command, for the message another writer gets ("train", "evaluate").

    Raises ``UserError`` when a live process holds the lock. A lock whose process is gone
    (killed) is taken over. Re-entrant within one process (``train`` evaluating at its end).
    """
    run_dir = Path(run_dir)
    made = []  # the folders made here, deepest first: removed again if left empty
    if create and not run_dir.exists():
        folder = run_dir
        while not folder.exists() and folder != folder.parent:
            made.append(folder)
            folder = folder.parent
        try:
            run_dir.mkdir(parents=True)
        except OSError as error:
            raise UserError(f"cannot create run folder {run_dir}: {error.strerror}; choose another --out") from None
    path = run_dir / LOCK
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": " ".join(sys.argv[:4])}
    owned = _acquire(path, mine, run_dir)
    try:
        yield run_dir
    finally:
        if owned:
            path.unlink(missing_ok=True)
        for folder in made:  # only empty ones: a mistake before anything was written leaves nothing
            try:
                folder.rmdir()
            except OSError:
                break


def _acquire(path: Path, mine: dict, run_dir: Path) -> bool:
    """Take the lock (True), find it already ours (False), or raise for a live other writer."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                continue  # released meanwhile: try again
            if holder.get("pid") == mine["pid"] and holder.get("host") == mine["host"]:
                return False
            same_host = holder.get("host") == mine["host"]
            if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                print(f"repulsor: note: {run_dir} was locked by process {holder['pid']} ({holder.get('command')}),"
                      " which is gone: taking over", file=sys.stderr, flush=True)
                path.unlink(missing_ok=True)
                continue
            who = (f"process {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}, since"
                   f" {holder.get('since')})") if holder else "an unknown process"
            hint = "" if same_host or not holder else f"; if nothing on {holder.get('host')} writes it, delete {path}"
            raise UserError(f"{run_dir} is being written by {who}: wait for it to finish or stop it{hint}")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(mine, handle)
        return True
    raise UserError(f"could not lock {run_dir}: {path} keeps changing; is another process writing the run?")
