"""The run folder as training writes it (its file names: ``store.layout``).

Before any work, ``check_run_dir`` refuses a folder that cannot hold the run (or, for
``--resume``, holds none); ``prepare_run_dir`` then creates it with the resolved ``CONFIG``.
During training one ``METRICS`` line per epoch and human ``LOG`` lines are appended; a
resumed run first drops the metric lines its checkpoint does not cover. At the end the
selected weights go to ``MODEL`` (with the run's fingerprint) and the cost to ``TRAINING``.
Checkpoints: ``checkpoint.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Config, to_dict, to_toml
from ..errors import UserError
from ..prototypes import save_prototypes
from ..runtime import ProcessGroup, provenance, provenance_warning
from ..store import files as ckpt
from ..store import run as store
from ..store.layout import CONFIG, LAST, LOG, METRICS, MODEL, PROTOTYPES, TRAINING


def run_status(out: Path) -> str:
    """``empty`` (no run), ``unfinished`` (a config, no final weights) or ``finished``."""
    out = Path(out)
    if (out / MODEL).exists():
        return "finished"
    if (out / CONFIG).is_file() or (out / LAST).exists():
        return "unfinished"
    return "empty"


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse an unusable run folder before any work is done and before anything is written."""
    if resume:
        if not out.is_dir():
            what = "it is a file, not a folder" if out.exists() else "the folder does not exist"
            raise UserError(f"cannot resume {out}: {what}; give a run folder written by repulsor train --out")
        if not (out / CONFIG).is_file():
            raise UserError(f"cannot resume {out}: it holds no run (no {CONFIG}); start one with --out {out}")
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot create run folder {out}: a file of that name exists; choose another --out")
    status = run_status(out)
    if status == "finished":
        raise UserError(f"{out} already holds a run (finished); evaluate it with: repulsor evaluate {out}, or choose"
                        " another --out")
    if status == "unfinished" and (out / LAST).exists():
        raise UserError(f"{out} already holds a run (unfinished); continue it with: repulsor train --resume {out},"
                        " or choose another --out")
    parent = out.parent  # the nearest existing ancestor must be a folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create run folder {out}: {parent} is a file, not a folder; choose another --out")


def prepare_run_dir(out: Path, cfg: Config, resume: bool, group: ProcessGroup) -> None:
    """Check the folder again and, for a fresh run, create it holding the resolved config (rank 0)."""
    check_run_dir(out, resume)
    if resume:
        return
    if group.is_main:
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create run folder {out}: {error.strerror}; choose another --out") from None
        try:
            ckpt.atomic_write_text(out / CONFIG, to_toml(cfg))
        except UserError:
            if created:  # leave nothing behind (an empty folder we made)
                try:
                    out.rmdir()
                except OSError:
                    pass
            raise


def save_run_prototypes(out: Path, cfg: Config, prototypes: torch.Tensor, num_classes: int) -> None:
    """Write the run's fixed prototypes with the settings that placed them."""
    save_prototypes(out / PROTOTYPES, prototypes, {
        "k": num_classes, "D": prototypes.shape[1], "metric": cfg.prototypes.metric,
        "epochs": cfg.prototypes.epochs, "lr": cfg.prototypes.lr, "seed": cfg.prototypes.seed})


def _cannot_write(path: Path, error: OSError) -> UserError:
    return UserError(f"cannot write {path}: {error.strerror}; free some space or choose another folder")


def log(out: Path, text: str, group: ProcessGroup) -> None:
    """Append ``text`` as one line of the run's log (rank 0 only)."""
    if group.is_main:
        try:
            store.append_log(out, text)
        except OSError as error:
            raise _cannot_write(out / LOG, error) from None


def append_metrics(out: Path, record: dict) -> None:
    """Append one epoch's record as a line of JSON to the run's metrics."""
    path = out / METRICS
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as error:
        raise _cannot_write(path, error) from None


def rewrite_metrics(out: Path, keep_epochs: int) -> None:
    """Drop metric lines of epochs that the checkpoint does not cover (written before a crash)."""
    path = out / METRICS
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["epoch"] <= keep_epochs]
    ckpt.atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def tensorboard_writer(out: Path, enabled: bool, group: ProcessGroup):
    """A TensorBoard SummaryWriter in ``RUN/tensorboard`` (rank 0 only), or None."""
    if not enabled or not group.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def save_final(out: Path, cfg: Config, model: torch.nn.Module, record: dict) -> None:
    """Write the selected weights with the run's fingerprint, and the training ``record``
    (selection, stop, cost) both into their metadata and as the run's training record."""
    ckpt.save_tensors(out / MODEL, ckpt.model_state(model),
                      {"config": to_dict(cfg), "selected": record["selected"], "best_epoch": record["best_epoch"],
                       "cost": record["cost"], "fingerprint": store.run_fingerprint(out)})
    made = provenance()
    ckpt.atomic_write_json(out / TRAINING, {**record, **made})
    warning = provenance_warning(made)
    if warning:
        store.append_log(out, f"WARN training {warning}; commit, then train again for weights anyone can reproduce")
