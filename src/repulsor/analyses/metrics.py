"""Validation accuracy over the epochs of training (Figure 4), from a run's ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..formats import as_number
from ..plots.curves import draw_epochs
from ..store import files as ckpt
from ..plots import draw


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line; blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"metrics file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"metrics file {path} is a folder; give RUN/metrics.jsonl") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"line {number} of {path} is not JSON ({error})") from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise UserError(f"line {number} of {path} has no epoch")
        records.append(record)
    return records


def extra_robust_keys(records: list[dict]) -> list[str]:
    """The ``val_robust_<loss>`` keys of the records, in the order they first appear."""
    return list(dict.fromkeys(k for r in records for k in r if k.startswith("val_robust_")))


def epoch_summary(records: list[dict]) -> tuple[dict, dict]:
    """The validation series of one run's records, ``{"val_robust": [(epoch, value)], "val_clean": [...]}``
    plus one ``val_robust_<loss>`` per extra validation loss (``train.val_losses``), epochs without
    a value left out; and its summary: ``epochs``, ``best_robust`` and ``best_robust_epoch``,
    ``last_robust``, and the same for clean (None without values)."""
    series = {key: [(r["epoch"], as_number(r.get(key))) for r in records if as_number(r.get(key)) is not None]
              for key in ("val_robust", "val_clean", *extra_robust_keys(records))}
    summary = {"epochs": len(records)}
    for key, name in (("val_robust", "robust"), ("val_clean", "clean")):
        points = series[key]
        best = max(points, key=lambda p: p[1]) if points else None
        summary[f"best_{name}"] = best[1] if best else None
        summary[f"best_{name}_epoch"] = best[0] if best else None
        summary[f"last_{name}"] = points[-1][1] if points else None
    return series, summary


def plot_metrics_over_epochs(metrics_paths, path, title: str = "Validation accuracy during training") -> dict:
    """Robust (solid), clean (dashed) and, where recorded, robust accuracy under each extra validation
    loss (dotted) per epoch of one or more runs (Figure 4).

    Epochs without validation (no ``val_clean`` key) and null ``val_robust`` values (runs
    trained without a threat model) are left out of the lines but kept, empty, in the CSV.

    Args:
        metrics_paths: ``{label: path to metrics.jsonl}``, or a single path (labelled by its
            run folder's name).
        path: the PNG file; the CSV goes to the same name with ``.csv`` (columns: run,
            epoch, train_loss, lr, val_clean, val_robust, then one val_robust_<loss> per extra loss).
        title: the plot title.

    Returns:
        ``png``, ``csv`` and ``runs``: per label, ``epochs``, ``best_robust`` and
        ``best_robust_epoch``, ``last_robust`` (None without robust values), ``best_clean``,
        ``last_clean``.
    """
    if isinstance(metrics_paths, (str, Path)):
        metrics_paths = {Path(metrics_paths).resolve().parent.name: metrics_paths}
    if not metrics_paths:
        raise UserError("no metrics files to plot")
    runs, series, every = {}, {}, {}
    for label, metrics_path in metrics_paths.items():
        every[label] = read_metrics(metrics_path)
        series[str(label)], runs[str(label)] = epoch_summary(every[label])
    extra = extra_robust_keys([r for records in every.values() for r in records])
    rows = [["run", "epoch", "train_loss", "lr", "val_clean", "val_robust", *extra]]
    for label, records in every.items():
        rows += [[label, r["epoch"], as_number(r.get("train_loss")), as_number(r.get("lr")),
                  as_number(r.get("val_clean")), as_number(r.get("val_robust")),
                  *(as_number(r.get(key)) for key in extra)] for r in records]
    png = draw_epochs(series, path, title=title, last_epoch=max(s["epochs"] for s in runs.values()))
    csv_path = png.with_suffix(".csv")
    ckpt.atomic_write_text(csv_path, draw.csv_text(rows))
    return {"png": str(png), "csv": str(csv_path), "runs": runs}
