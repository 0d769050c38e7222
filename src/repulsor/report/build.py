"""One readable report of runs and comparisons: ``report.html`` (self-contained) and ``report.md``.

``build_report([RUN_OR_COMPARE_DIR, ...], OUT)`` writes

- ``OUT/report.html``: one file, every figure embedded as a base64 PNG data URI, CSS
  inline, no external resource; it needs no JavaScript (a four-line script only records,
  for tests, how many images loaded);
- ``OUT/report.md``: the same content in Markdown, its figures saved as PNG files in
  ``OUT/figures/<section>/`` (each with its numbers beside it as CSV or JSON) and linked.

Per run: the resolved config and the code version; the training record and curves
(``metrics.jsonl``); one table per evaluated suite (``results.json``) with its protocol, the
accuracy after each attack of the cascade and the worst case, and the sanity-check verdicts
(WARN rows in red); then the model's figures: robustness curve, adversarial confusion matrix,
prototype geometry, clean / adversarial / perturbation images and the nearest-neighbour grid,
drawn from the figure data that ``report.figures`` keeps in ``OUT/figures/<run>/`` (computed
once from the model, so the report re-renders without it). The robustness curve, confusion
matrix and neighbour grid are taken from ``RUN/analysis/`` when ``repulsor analyse`` wrote them.

A comparison folder (``comparison.json``, written by ``repulsor compare``) gives its tables
(as data: ``compare.tables``), the overlaid robustness and validation curves, and a short
section per method run. How to read every figure: ``docs/reading-the-report.md``.

The modules: ``blocks`` (what a page is made of), ``render`` (HTML and Markdown),
``run_section`` and ``compare_section`` (the sections, from files), ``figures`` (the model
figures' data), ``context`` (what one report's sections share), ``build`` (this).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import UserError
from ..store import files as ckpt
from ..store.layout import COMPARISON, CONFIG
from ..version import __version__
from .blocks import Heading, Para, Table, guide_link
from .compare_section import compare_blocks
from .context import ReportContext
from .render import render_html, render_markdown
from .run_section import run_blocks


def build_report(paths, out_dir, *, n: int | None = None, data_dir: str | None = None, device: str = "auto",
                 quiet: bool = True, neighbours: bool = True, title: str | None = None,
                 overrides: list[str] = ()) -> dict:
    """Write ``OUT/report.html`` and ``OUT/report.md`` for run and comparison folders.

    Args:
        paths: run folders (``config.toml``) and comparison folders (``comparison.json``).
        out_dir: the report folder (created); figures go to ``OUT/figures/``.
        n: the first n test points attacked on the fly for the figures (PGD-20 of the
            ``quick`` suite at the run's eval threat model); default: each run's ``eval.n``
            (for the method runs of a comparison, its ``eval_n``).
        data_dir: test-data folder overriding the runs' configs.
        device: ``auto``, ``cpu``, ``cuda``...
        quiet: no progress lines.
        neighbours: draw the nearest-neighbour grid (loads the training split).
        title: the page title.
        overrides: ``eval.*`` and data-folder settings changed for every run of the report
            (``"eval.eps=0.1"``).

    Returns:
        ``{"html", "md", "seconds", "timings"}``.
    """
    started = time.time()
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise UserError("report needs at least one run or comparison folder")
    if n is not None and n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    kinds = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path} is not a folder; give a run folder (config.toml) or a comparison folder "
                            "(comparison.json)")
        if (path / COMPARISON).is_file():
            kinds.append("compare")
        elif (path / CONFIG).is_file():
            kinds.append("run")
        else:
            raise UserError(f"{path} is neither a run folder (no config.toml) nor a comparison folder "
                            "(no comparison.json)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    for path in paths:
        if out.resolve() == path.resolve():
            raise UserError(f"--out {out} is the folder being reported on; choose another, e.g. {path}/report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create report folder {out}: {error.strerror}") from None
    ctx = ReportContext(out, n=n, data_dir=data_dir, device=device, quiet=quiet, neighbours=neighbours, overrides=overrides)
    body = []
    for path, kind in zip(paths, kinds):
        if kind == "compare":
            body += compare_blocks(path, ctx)
        else:
            body += run_blocks(path, ctx, label=path.resolve().name, heading=f"Run `{path.resolve().name}`")

    seconds = time.time() - started
    head = [Heading(2, "Overview", anchor="overview"),
            Para(f"Generated by repulsor {__version__} in {seconds:.1f} s. Accuracies are fractions of the first n "
                 "test points, each shown with its own n; the worst case of a suite is the accuracy after its whole "
                 f"cascade. How to read every table and figure: {guide_link(out)}."),
            Table(["run", "data set", "method", "model", "clean (on the most points)", "worst case per suite",
                   "sanity checks"],
                  ctx.overview, ctx.overview_classes)]
    blocks = head + body
    page_title = title or "repulsor report: " + ", ".join(p.resolve().name for p in paths)
    ckpt.atomic_write_text(out / "report.html", render_html(page_title, blocks))
    ckpt.atomic_write_text(out / "report.md", render_markdown(page_title, blocks, out))
    ctx.say(f"wrote {out / 'report.html'} and {out / 'report.md'} in {time.time() - started:.1f}s")
    return {"html": str(out / "report.html"), "md": str(out / "report.md"), "seconds": time.time() - started,
            "timings": ctx.timings}
