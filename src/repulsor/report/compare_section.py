"""The section of a comparison folder: its tables (as data, from ``comparison.json``), the
overlaid robustness and validation curves, and a short section per method run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..compare.tables import comparison_tables
from ..plots.curves import plot_robustness_curves
from ..runtime import provenance_warning
from ..store import files as ckpt
from ..store.layout import COMPARISON, CONFIG, MODEL, TRAINING
from .blocks import Details, Figure, Heading, Para, Table
from .context import ReportContext
from .run_section import run_blocks


def table_blocks(report: dict) -> list:
    """The comparison's tables as blocks: the same cells as ``tables.md`` (``compare.tables``)."""
    blocks = []
    for table in comparison_tables(report):
        blocks.append(Heading(3, table.title))
        if table.rows:
            blocks += [Table(table.header, table.rows), Para(table.protocol)]
        if table.notes:
            blocks.append(Para(("Notes: " if table.rows else "") + "; ".join(table.notes), note=True))
    return blocks


def _sanity_warnings(report: dict) -> list:
    """Every failed sanity check of every run, in plain sight."""
    blocks = []
    for name, run in (report.get("runs") or {}).items():
        for suite, res in (run.get("suites") or {}).items():
            warn = [v for v in res.get("sanity", []) if not v.get("ok")]
            if warn:
                blocks.append(Para(f"{name}, suite `{suite}`: {len(warn)} sanity check(s) failed ("
                                   + "; ".join(f"{v.get('name')}: {v.get('message')}" for v in warn)
                                   + "); its robust accuracy may be overstated.", warn=True))
    return blocks


def _curve_figures(compare_dir: Path, figdir: Path, protocol: dict) -> list:
    """The overlaid robustness curves and validation curves of every method."""
    blocks = []
    curve = compare_dir / "robustness_curves.png"
    if not curve.is_file() and (compare_dir / "robustness_curves.json").is_file():
        data = ckpt.read_json(compare_dir / "robustness_curves.json", "robustness curves")
        curve = Path(plot_robustness_curves(data["curves"], figdir / "robustness_curves.png",
                                            title=data.get("title", "Robustness curves"),
                                            norm=data.get("norm", "linf"))["png"])
    if curve.is_file():
        if curve.parent != figdir:
            shutil.copyfile(curve, figdir / "robustness_curves.png")
            curve = figdir / "robustness_curves.png"
        c = protocol.get("curve") or {}
        blocks.append(Figure(curve, f"Robustness curves of every method on the same {c.get('n', '?')} test points: "
                                    f"PGD-{c.get('steps', 20)} ({c.get('loss', 'ce')} loss) accuracy per eps; each "
                                    "point is the worst case over every radius up to that eps."))
    epochs = compare_dir / "epochs.png"
    if epochs.is_file():
        shutil.copyfile(epochs, figdir / "epochs.png")
        blocks.append(Figure(figdir / "epochs.png", "Validation accuracy during training of every method: robust "
                                                   "(solid) and clean (dashed), one colour per method."))
    return blocks


def compare_blocks(compare_dir: Path, ctx: ReportContext) -> list:
    """A comparison folder: its tables, overlaid curves and a short section per run."""
    started = time.time()
    report = ckpt.read_json(compare_dir / COMPARISON, "comparison file")
    label = compare_dir.resolve().name
    slug = ctx.slug(f"compare-{label}")
    figdir = ctx.out / "figures" / slug
    figdir.mkdir(parents=True, exist_ok=True)
    protocol = report.get("protocol", {})
    blocks = [Heading(2, f"Comparison `{label}`", anchor=slug),
              Para(f"Folder `{compare_dir}`; data set **{protocol.get('dataset', '?')}**; methods "
                   f"{', '.join(report.get('methods', [])) or '?'}; repulsor {protocol.get('code_version', '?')}"
                   + (f" (**{provenance_warning(protocol)}**)" if provenance_warning(protocol) else "") + ".")]
    if report.get("config"):
        blocks.append(Details("Comparison config (resolved)", json.dumps(report["config"], indent=2), "json"))
    blocks += table_blocks(report) + _sanity_warnings(report) + _curve_figures(compare_dir, figdir, protocol)
    runs = list(report.get("runs") or {})
    runs += [p.name for p in sorted(compare_dir.iterdir()) if p.is_dir() and (p / CONFIG).is_file()
             and p.name not in runs]
    ctx.timings[label] = round(time.time() - started, 2)
    for name in runs:
        run_dir = compare_dir / name
        if not (run_dir / CONFIG).is_file():
            continue
        if not (run_dir / MODEL).is_file() and not (run_dir / TRAINING).is_file():
            blocks += [Heading(2, f"{label} / {name}"), Para("Training unfinished: no model.safetensors.", note=True)]
            continue
        # n=None: each run's eval.n (a comparison's eval_n) unless the report's --n says otherwise.
        blocks += run_blocks(run_dir, ctx, label=f"{label}-{name}", heading=f"{label} / method run `{name}`",
                             brief=True, n=ctx.n)
    return blocks
