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
(WARN rows in red); then figures that need the model: robustness curve, adversarial confusion
matrix, prototype geometry (cosine similarities of the prototypes, a PCA of test embeddings
with the prototypes projected by the same PCA), clean / adversarial / perturbation images and
the nearest-neighbour grid. The adversarial examples of the figures are the ``quick`` suite's
PGD-20 at the run's eval threat model on the first ``n`` test points (``evaluate.evaluate``);
the robustness curve, confusion matrix and neighbour grid are taken from ``RUN/analysis/``
when ``repulsor`` wrote them there, and computed with ``repulsor.analysis`` otherwise.

A comparison folder (``comparison.json``, written by ``repulsor.compare``) gives its tables
(``tables.md``), the overlaid robustness curves and validation curves, and a short section
per method run. How to read every figure: ``docs/reading-the-report.md``.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..analyses import run as analysis
from ..plots import draw as plots
from ..store import files as ckpt
from ..attacks import batched, evaluating
from ..errors import UserError
from ..runtime import resolve_device
from ..formats import as_number, format_eps
from ..version import __version__
from ..evaluation import run as evaluation_run
from ..evaluation.cascade import evaluate
from ..store import run as store


CURVE_N = 100  # points of a robustness curve computed by the report
GRID_COLUMNS = 8  # test points in the clean / adversarial / perturbation grid
NEIGHBOUR_POOL = 2000  # training images searched for nearest neighbours
NEIGHBOUR_ROWS = 6


# ---------------------------------------------------------------------------- formatting


def format_accuracy(value) -> str:
    """An accuracy in [0, 1] as the report prints it: ``97.78%`` (a dash when missing)."""
    if value is None:
        return "–"
    return f"{100 * float(value):.2f}%"


def _fmt_seconds(seconds) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------- document blocks
# Text in blocks is "inline Markdown lite": **bold** and `code` are rendered in HTML, the
# rest is escaped; the Markdown output keeps it as it is.


@dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass
class Para:
    text: str
    warn: bool = False
    note: bool = False


@dataclass
class Table:
    header: list
    rows: list
    row_classes: list = field(default_factory=list)  # "" | "warn" | "total", one per row
    caption: str = ""


@dataclass
class Figure:
    path: Path  # a PNG inside the output folder
    caption: str


@dataclass
class Details:
    summary: str
    text: str
    lang: str = ""


def _inline_html(text: str) -> str:
    escaped = html.escape(str(text))
    escaped = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', escaped)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)


GUIDE = Path(__file__).resolve().parents[2] / "docs" / "reading-the-report.md"


def guide_link(out: Path) -> str:
    """A Markdown link from the report folder to the reading guide (plain text where it is not installed)."""
    if not GUIDE.is_file():
        return "`docs/reading-the-report.md` in the repulsor repository"
    return f"[docs/reading-the-report.md]({os.path.relpath(GUIDE, out.resolve())})"


CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1120px;margin:1.5em auto;
padding:0 1em;color:#1b1b1b;line-height:1.45;background:#fff}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{border-bottom:1px solid #bbb;margin-top:2em;padding-bottom:.15em}
h3{margin-top:1.5em}h4{margin-top:1.2em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.92em}
th,td{border:1px solid #c8c8c8;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:bold;background:#f6f6f6}
tr.warn td{background:#fde0e0;color:#9b0000;font-weight:bold}
p.warn{background:#fde0e0;color:#9b0000;border-left:5px solid #c00;padding:.5em .8em;font-weight:bold}
p.note{color:#555;font-style:italic}
figure{margin:1em 0 1.6em;display:inline-block;vertical-align:top;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #e3e3e3}
figcaption{font-size:.88em;color:#333;max-width:760px}
details{margin:.5em 0 1em}summary{cursor:pointer;font-weight:bold}
caption{text-align:left;caption-side:top;font-size:.88em;color:#333;padding:.2em 0}
pre{background:#f6f8fa;padding:.7em;overflow:auto;font-size:.85em;border:1px solid #e1e4e8}
code{background:#f3f3f3;padding:0 .2em}nav ul{columns:2}
"""

# Not needed to read the report: records for automated checks how many figures decoded.
IMAGE_CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) { loaded++; } }
  document.body.dataset.imagesLoaded = loaded + "/" + images.length;
});
</script>"""


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[0-9.,]+\s*(%|s|min)?", str(text).strip()))


def render_html(title: str, blocks: list) -> str:
    """A self-contained HTML page: figures as data URIs, inline CSS, no external resources."""
    toc = [b for b in blocks if isinstance(b, Heading) and b.level == 2 and b.anchor]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if len(toc) > 1:
        parts.append("<nav><ul>" + "".join(f'<li><a href="#{b.anchor}">{_inline_html(b.text)}</a></li>' for b in toc)
                     + "</ul></nav>")
    for block in blocks:
        if isinstance(block, Heading):
            anchor = f' id="{html.escape(block.anchor)}"' if block.anchor else ""
            parts.append(f"<h{block.level}{anchor}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            cls = ' class="warn"' if block.warn else ' class="note"' if block.note else ""
            parts.append(f"<p{cls}>{_inline_html(block.text)}</p>")
        elif isinstance(block, Table):
            rows = []
            if block.caption:
                rows.append(f"<caption>{_inline_html(block.caption)}</caption>")
            rows.append("<thead><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in block.header) + "</tr></thead><tbody>")
            for i, row in enumerate(block.rows):
                cls = block.row_classes[i] if i < len(block.row_classes) else ""
                cells = "".join(f'<td class="num">{_inline_html(c)}</td>' if _is_number(c) else f"<td>{_inline_html(c)}</td>"
                                for c in row)
                rows.append(f'<tr class="{cls}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
            parts.append("<table>" + "".join(rows) + "</tbody></table>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            alt = html.escape(re.sub(r"[*`]", "", block.caption.split(".")[0]), quote=True)
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                         f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>")
        elif isinstance(block, Details):
            parts.append(f"<details><summary>{_inline_html(block.summary)}</summary>"
                         f"<pre>{html.escape(block.text)}</pre></details>")
    parts += [IMAGE_CHECK_SCRIPT, "</body></html>", ""]
    return "\n".join(parts)


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, blocks: list, out: Path) -> str:
    """The report as Markdown; figures are linked relative to ``out``."""
    parts = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            parts += [f"{'#' * block.level} {block.text}", ""]
        elif isinstance(block, Para):
            if block.warn:
                parts += [f"> **WARNING** {block.text}", ""]
            elif block.note:
                parts += [f"_{block.text}_", ""]
            else:
                parts += [block.text, ""]
        elif isinstance(block, Table):
            if block.caption:
                parts += [block.caption, ""]
            parts.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            parts.append("|" + "|".join("---" for _ in block.header) + "|")
            for i, row in enumerate(block.rows):
                cls = block.row_classes[i] if i < len(block.row_classes) else ""
                cells = [_md_cell(c) for c in row]
                if cls == "warn":
                    cells = [f"**{c}**" if c else c for c in cells]
                    cells[0] = "⚠ " + cells[0]
                parts.append("| " + " | ".join(cells) + " |")
            parts.append("")
        elif isinstance(block, Figure):
            rel = block.path.relative_to(out).as_posix()
            alt = re.sub(r"[*`\[\]]", "", block.caption.split(".")[0])
            parts += [f"![{alt}]({rel})", "", f"_{block.caption}_" if "_" not in block.caption else block.caption, ""]
        elif isinstance(block, Details):
            parts += [f"<details><summary>{html.escape(block.summary)}</summary>", "", f"```{block.lang}",
                      block.text.rstrip("\n"), "```", "", "</details>", ""]
    return "\n".join(parts)


def markdown_blocks(text: str, *, shift: int = 1, skip_title: bool = True) -> list:
    """Blocks of simple Markdown (headings, pipe tables, paragraphs), e.g. a comparison's ``tables.md``."""
    blocks, paragraph, table = [], [], []

    def flush():
        if paragraph:
            blocks.append(Para(" ".join(paragraph)))
            paragraph.clear()
        if table:
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
            rows = [r for r in rows if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
            if rows:
                blocks.append(Table(rows[0], rows[1:]))
            table.clear()

    first = True
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            flush()
            hashes = len(stripped) - len(stripped.lstrip("#"))
            if not (skip_title and first and hashes == 1):
                blocks.append(Heading(min(6, hashes + shift), stripped[hashes:].strip()))
        elif stripped.startswith("|"):
            if paragraph:
                flush()
            table.append(stripped)
        elif not stripped:
            flush()
        else:
            if table:
                flush()
            paragraph.append(stripped)
        if stripped:
            first = False
    flush()
    return blocks


# ---------------------------------------------------------------------------- figures of our own
# (everything else comes from repulsor.analysis)


def plot_training_curves(records: list[dict], path, title: str = "Training", *, peak_lr: float | None = None) -> dict:
    """Training loss and accuracy per epoch (left) and the learning rate (right); writes PNG.

    The learning-rate axis starts at 0 and reaches the schedule's peak (``peak_lr``), so that the
    end-of-epoch value of a one-epoch cyclic run (almost 0) does not become an axis of 1e-11.
    """
    png = plots.png_path(path)
    fig = plots.new_figure(9.0, 3.4)
    ax_loss = fig.add_subplot(1, 2, 1)
    ax_lr = fig.add_subplot(1, 2, 2)
    epochs = [r["epoch"] for r in records]
    loss = [as_number(r.get("train_loss")) for r in records]
    acc = [as_number(r.get("train_accuracy")) for r in records]
    lr = [as_number(r.get("lr")) for r in records]
    points = [(e, v) for e, v in zip(epochs, loss) if v is not None]
    if points:
        ax_loss.plot(*zip(*points), color="C0", marker="o", markersize=3, label="training loss")
        if all(v > 0 for _, v in points) and max(v for _, v in points) > 20 * min(v for _, v in points):
            ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss", color="C0")
    ax_loss.grid(True, alpha=0.3)
    points = [(e, 100 * v) for e, v in zip(epochs, acc) if v is not None]
    if points:
        twin = ax_loss.twinx()
        twin.plot(*zip(*points), color="C1", linestyle="--", marker="s", markersize=3, label="training accuracy")
        twin.set_ylabel("training accuracy (%)", color="C1")
        twin.set_ylim(0, 100)
    ax_loss.set_title("loss (solid) and accuracy (dashed) on training batches", fontsize=9)
    points = [(e, v) for e, v in zip(epochs, lr) if v is not None]
    if points:
        ax_lr.plot(*zip(*points), color="C2", marker="o", markersize=3)
    top = max([v for _, v in points] + [peak_lr or 0.0])
    if top > 0:
        ax_lr.set_ylim(0, 1.1 * top)
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate at the end of the epoch")
    ax_lr.set_title("learning rate", fontsize=9)
    ax_lr.grid(True, alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, max(epochs, default=1) + 0.5)  # whole epochs, even for a one-epoch run
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plots.save_figure(fig, png)
    return {"png": str(png)}


def plot_prototype_similarity(prototypes: torch.Tensor, class_names, path, title: str = "Prototype cosine similarity") -> dict:
    """Heat map of the pairwise cosine similarities of the prototypes [k, D]; PNG and CSV."""
    png = plots.png_path(path)
    P = F.normalize(prototypes.detach().float().cpu(), dim=1)
    cos = P @ P.T
    k = cos.shape[0]
    names = [str(c) for c in class_names]
    side = min(max(4.5, 0.5 * k + 2.5), 11.0)
    fig = plots.new_figure(side, side * 0.85)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(cos.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    plots.label_class_axes(ax, names)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(cos[i, j]) > 0.6 else "black")
    off = cos[~torch.eye(k, dtype=torch.bool)]
    ax.set_title(f"{title}\nmax off-diagonal {off.max():.3f}, mean {off.mean():.3f}", fontsize=10)
    plots.save_figure(fig, png)
    csv_path = png.with_suffix(".csv")
    rows = [["class", *names]] + [[names[i], *[round(v, 6) for v in cos[i].tolist()]] for i in range(k)]
    ckpt.atomic_write_text(csv_path, plots.csv_text(rows))
    return {"png": str(png), "csv": str(csv_path), "max_cosine": off.max().item(), "mean_cosine": off.mean().item()}


def embed_points(model, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """``model.embed`` of images, float32 on the CPU, batched, in eval mode."""
    with evaluating(model):
        return batched(lambda xb: model.embed(xb).float(), x, batch_size=batch_size, device=device)


def pca_2d(z: torch.Tensor):
    """(mean [D], components [2, D], explained variance ratios [2]) of points z [N, D]."""
    mean = z.mean(0)
    _, s, vh = torch.linalg.svd(z - mean, full_matrices=False)
    var = s**2
    ratio = var / var.sum().clamp_min(1e-12)
    comps = vh[:2]
    if comps.shape[0] < 2:  # D = 1: pad with a zero direction
        comps = torch.cat([comps, torch.zeros(2 - comps.shape[0], z.shape[1])])
        ratio = torch.cat([ratio, torch.zeros(2)])
    return mean, comps, ratio[:2]


def plot_embedding_pca(z: torch.Tensor, y: torch.Tensor, prototypes: torch.Tensor, class_names, path, *,
                       normalise: bool, title: str = "Test embeddings (PCA)") -> dict:
    """Scatter of the 2-D PCA of embeddings z [N, D] coloured by class, the prototypes [k, D]
    projected with the same PCA (stars). With ``normalise`` both are first put on the unit
    sphere (cosine heads decide by direction only). PNG and JSON (projected prototypes)."""
    png = plots.png_path(path)
    z = z.float()
    P = prototypes.detach().float().cpu()
    if normalise:
        z, P = F.normalize(z, dim=1), F.normalize(P, dim=1)
    mean, comps, ratio = pca_2d(z)
    zp = ((z - mean) @ comps.T).numpy()
    pp = ((P - mean) @ comps.T).numpy()
    k = P.shape[0]
    names = [str(c) for c in class_names]
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "hsv"]

    def colour(c):
        return cmap(c % cmap.N) if k <= 20 else cmap(c / k)

    fig = plots.new_figure(6.4, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    yl = y.cpu().tolist()
    ax.scatter(zp[:, 0], zp[:, 1], c=[colour(c) for c in yl], s=9, alpha=0.6, linewidths=0)
    ax.scatter(pp[:, 0], pp[:, 1], c=[colour(c) for c in range(k)], marker="*", s=260, edgecolors="black",
               linewidths=1.0, zorder=3)
    if k <= 20:
        for c in range(k):
            ax.annotate(names[c], (pp[c, 0], pp[c, 1]), textcoords="offset points", xytext=(6, 6), fontsize=8,
                        fontweight="bold")
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=colour(c), label=names[c]) for c in range(k)]
        handles.append(Line2D([], [], marker="*", linestyle="", color="white", markeredgecolor="black",
                              markersize=12, label="prototype"))
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of variance)")
    ax.set_title(title + (" on the unit sphere" if normalise else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    plots.save_figure(fig, png)
    json_path = png.with_suffix(".json")
    ckpt.atomic_write_json(json_path, {"normalised": normalise, "explained_variance": ratio.tolist(),
                                       "n": len(zp), "prototypes_2d": pp.tolist()})
    return {"png": str(png), "json": str(json_path), "explained_variance": ratio.tolist()}


def magnify_perturbation(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The perturbation as an image: ``(x_adv - x) * 0.5 / eps + 0.5`` (grey = unchanged;
    black / white = -eps / +eps). For L2 the scale is the largest absolute pixel change."""
    delta = (x_adv - x).float()
    if norm == "linf" and eps > 0:
        scale = 0.5 / eps
    else:
        peak = delta.abs().max().item()
        scale = 0.5 / peak if peak > 0 else 1.0
    return (delta * scale + 0.5).clamp(0, 1)


def plot_adversarial_grid(x, x_adv, y, pred_clean, pred_adv, class_names, path, *, eps: float, norm: str,
                          ids=None) -> dict:
    """Columns of test points; rows: clean image, adversarial image, perturbation magnified. PNG and JSON."""
    png = plots.png_path(path)
    names = [str(c) for c in class_names]
    m = len(x)
    fig = plots.new_figure(1.3 * max(m, 1) + 0.9, 4.4)
    if m == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no test points", ha="center", va="center")
    delta = magnify_perturbation(x, x_adv, eps, norm)
    labels = ("clean", "adversarial", "perturbation\n(magnified)")
    rows = []
    for j in range(m):
        t, pc, pa = int(y[j]), int(pred_clean[j]), int(pred_adv[j])
        for i, (img, title, colour) in enumerate(((x[j], f"{names[t]}: {names[pc]}", "black" if pc == t else "red"),
                                                   (x_adv[j], f"→ {names[pa]}", "black" if pa == t else "red"),
                                                   (delta[j], "", "black"))):
            ax = fig.add_subplot(3, m, i * m + j + 1)
            array, cmap = plots.image_array(img)
            ax.imshow(array, cmap=cmap if cmap else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if title:
                ax.set_title(title, fontsize=7, color=colour)
            if j == 0:
                ax.set_ylabel(labels[i], fontsize=7)
        rows.append({"id": ids[j] if ids is not None else j, "true": t, "clean_pred": pc, "adv_pred": pa,
                     "max_abs_change": (x_adv[j] - x[j]).abs().max().item()})
    scale = f"× {0.5 / eps:.3g} + 0.5" if norm == "linf" and eps > 0 else "scaled to its largest change"
    fig.suptitle(f"clean (title: true: predicted), adversarial (→ prediction), perturbation {scale}", fontsize=8)
    fig.subplots_adjust(wspace=0.08, hspace=0.35)
    plots.save_figure(fig, png)
    json_path = png.with_suffix(".json")
    ckpt.atomic_write_json(json_path, {"eps": eps, "norm": norm, "points": rows})
    return {"png": str(png), "json": str(json_path)}


# ---------------------------------------------------------------------------- the report


class _Context:
    def __init__(self, out: Path, *, n: int | None, data_dir, device, quiet: bool, neighbours: bool,
                 overrides: list[str] = ()):
        self.out = out
        self.n = n  # None: each run's eval.n
        self.overrides = list(overrides)  # eval.* and data folders, for every run of the report
        self.data_dir = data_dir
        self.device = resolve_device(device)
        self.quiet = quiet
        self.neighbours = neighbours
        self.slugs: set[str] = set()
        self.timings: dict[str, float] = {}
        self.overview: list[list[str]] = []
        self.overview_classes: list[str] = []
        self._test: dict = {}

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[report] {text}", flush=True)

    def slug(self, name: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "run"
        slug, i = base, 2
        while slug in self.slugs:
            slug, i = f"{base}-{i}", i + 1
        self.slugs.add(slug)
        return slug

    def test_split(self, cfg, n: int):
        """The first n test points of the run's data set (cached across runs)."""
        key = (cfg.data.name, self.data_dir or cfg.data.test_dir or cfg.data.data_dir, cfg.data.split_seed)
        if key not in self._test:
            self._test[key] = evaluation_run.load_test_split(cfg, None, self.data_dir)[:2]
        x, y = self._test[key]
        return evaluation_run.first_points(x, y, n, cfg.data.name, say=lambda text: self.say(f"note: {text}"))


def _copy_analysis(run_dir: Path, name: str, figdir: Path) -> Path | None:
    """Copy ``RUN/analysis/<name>.png`` (and its CSV/JSON) into the report; None when absent."""
    source = run_dir / "analysis" / f"{name}.png"
    if not source.is_file():
        return None
    figdir.mkdir(parents=True, exist_ok=True)
    for suffix in (".png", ".json", ".csv"):
        if source.with_suffix(suffix).is_file():
            shutil.copyfile(source.with_suffix(suffix), figdir / f"{name}{suffix}")
    return figdir / f"{name}.png"


def _analysis_summary(run_dir: Path) -> dict:
    path = run_dir / "analysis" / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def overview_accuracies(results: dict | None) -> tuple[str, str]:
    """The overview's clean and per-suite cells: every number with its own n.

    The clean accuracy shown is the one measured on the most points (a 200-point suite never
    headlines over a 10,000-point one); each suite's worst case carries the n it was measured on.
    """
    suites = (results or {}).get("suites") or {}
    if not suites:
        return "–", "–"
    largest = max(suites.values(), key=lambda res: res.get("n") or 0)
    clean = f"{format_accuracy(largest.get('clean_accuracy'))} (n={largest.get('n', '?')})"
    worst = ", ".join(f"{name}: {format_accuracy(res.get('robust_accuracy'))} (n={res.get('n', '?')})"
                      for name, res in sorted(suites.items(), key=lambda item: -(item[1].get("n") or 0)))
    return clean, worst


def suite_blocks(name: str, res: dict, results: dict) -> list:
    """The blocks of one suite of ``results.json``: protocol, cascade table, sanity checks.

    ``res`` is ``results["suites"][name]``; nothing but these two dicts is read.
    """
    blocks = [Heading(4, f"Suite `{name}`")]
    norm = res.get("norm", "linf")
    blocks.append(Para(
        f"Protocol: data set **{results.get('dataset', '?')}**, {results.get('split', 'test')} split, first n = "
        f"{res.get('n', results.get('n'))} points (unshuffled), norm {norm}, eps = {format_eps(res.get('eps'), norm)}, "
        f"seed {res.get('seed', '?')}, {res.get('precision', 'fp32')}, model in eval mode. Cascade: each attack runs "
        "only on the points that every earlier attack failed on."))
    if res.get("votes", 1) > 1:
        blocks.append(Para(f"The model is randomised (two forward passes differ): a point counts as correct only if "
                           f"all {res['votes']} forward passes classify it correctly, for the clean accuracy and after "
                           "every attack, so that a lucky pass is not counted as robustness.", note=True))
    skipped = [e for e in res.get("attacks", []) if e.get("status", "done") != "done"]
    if skipped:
        blocks.append(Para("Not applicable to this model, so not run: " + "; ".join(
            f"{e.get('name', '?')} ({e.get('reason', '')})" for e in skipped) + ". They leave the accuracy unchanged; "
            "the worst case below rests on the attacks that ran.", warn=True))
    rows = [["", "clean (no attack)", "", "", "", "", format_accuracy(res.get("clean_accuracy")), ""]]
    classes = [""]
    for i, entry in enumerate(res.get("attacks", []), 1):
        if entry.get("status", "done") != "done":
            rows.append([str(i), f"{entry.get('name', '?')}: not applicable ({entry.get('reason', '')})", "–", "–", "–",
                         "0", "–", "–"])
            classes.append("warn")
            continue
        rows.append([str(i), entry.get("name", "?"), entry.get("loss") or "–", _fmt(entry.get("steps")),
                     _fmt(entry.get("restarts")), _fmt(entry.get("n_attacked")), format_accuracy(entry.get("accuracy")),
                     _fmt_seconds(entry.get("seconds"))])
        classes.append("")
    rows.append(["", "**worst case** (robust accuracy)", "", "", "", "", format_accuracy(res.get("robust_accuracy")), ""])
    classes.append("total")
    blocks.append(Table(["#", "attack", "loss", "steps / queries", "restarts", "points attacked", "accuracy after",
                         "time"], rows, classes))
    sanity = res.get("sanity")
    if sanity:
        warn = [v for v in sanity if not v.get("ok")]
        if warn:
            blocks.append(Para(f"{len(warn)} of {len(sanity)} sanity checks of suite `{name}` failed: the robust "
                               "accuracy above may be overstated (signs of gradient masking). "
                               + "; ".join(f"{v.get('name')}: {v.get('message')}" for v in warn), warn=True))
        blocks.append(Table(["verdict", "check", "value", "message"],
                            [["WARN" if not v.get("ok") else "ok", v.get("name", "?"), _fmt(v.get("value")),
                              v.get("message", "")] for v in sanity],
                            ["warn" if not v.get("ok") else "" for v in sanity],
                            caption="Gradient-masking sanity checks (the reading guide linked in the overview explains each)."))
    elif name in ("standard", "adaptive", "rand"):
        blocks.append(Para("No sanity checks recorded for this suite.", note=True))
    return blocks


def _training_blocks(run_dir: Path, figdir: Path, label: str, peak_lr: float | None = None) -> list:
    blocks = [Heading(3, "Training")]
    training = run_dir / "training.json"
    if training.is_file():
        t = ckpt.read_json(training, "training record")
        cost = t.get("cost", {}) or {}
        rows = [["weights selected", _fmt(t.get("selected"))],
                ["best validation epoch", _fmt(t.get("best_epoch"))],
                ["best validation metric", _fmt(t.get("best_val_metric"))],
                ["epochs run", _fmt(cost.get("epochs"))],
                ["training time", _fmt_seconds(cost.get("wall_seconds"))],
                ["forward / backward passes per example",
                 f"{_fmt(cost.get('forward_passes_per_example'))} / {_fmt(cost.get('backward_passes_per_example'))}"]]
        if t.get("stopped"):
            rows.append(["stopped", str(t["stopped"])])
        blocks.append(Table(["training record (training.json)", "value"], rows))
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        blocks.append(Para("No metrics.jsonl: the run has not finished an epoch.", note=True))
        return blocks
    records = analysis.read_metrics(metrics)
    stops = [r for r in records if r.get("stopped")]
    for r in stops:
        blocks.append(Para(f"Training stopped at epoch {r['epoch']}: {r['stopped']}", warn=bool(r.get("catastrophic_overfitting"))))
    if records:
        written = plot_training_curves(records, figdir / "training.png", title=f"Training of {label}", peak_lr=peak_lr)
        blocks.append(Figure(Path(written["png"]), "Training loss and accuracy on the training batches (left; for "
                             "adversarial methods, on the adversarial batches) and the learning rate (right), per epoch."))
        written = analysis.plot_metrics_over_epochs({label: metrics}, figdir / "validation.png",
                                                    title=f"Validation accuracy of {label}")
        summary = written["runs"].get(label, {})
        blocks.append(Figure(Path(written["png"]), "Validation accuracy per epoch: clean (dashed) and robust under "
                             "the training-time PGD with the CW loss (solid), on the validation split carved from the "
                             "training set. Best robust: "
                             f"{format_accuracy(summary.get('best_robust'))} at epoch {_fmt(summary.get('best_robust_epoch'))}; "
                             f"last: {format_accuracy(summary.get('last_robust'))} robust, "
                             f"{format_accuracy(summary.get('last_clean'))} clean."))
    return blocks


def _run_blocks(run_dir: Path, ctx: _Context, *, label: str, heading: str, brief: bool = False,
                n: int | None = None) -> list:
    """Every section of one run."""
    from ..config import load_run_config
    from ..data import DATASETS
    from ..training.methods import METHODS

    started = time.time()
    slug = ctx.slug(label)
    figdir = ctx.out / "figures" / slug
    figdir.mkdir(parents=True, exist_ok=True)
    cfg = load_run_config(run_dir, ctx.overrides)
    info = DATASETS[cfg.data.name]
    method = METHODS.get(cfg.train.method)
    results = ckpt.read_json(run_dir / "results.json", "results file") if (run_dir / "results.json").is_file() else None
    ctx.say(f"{label}: {run_dir}")

    blocks = [Heading(2, heading, anchor=slug)]
    code_version = (results or {}).get("code_version", "unknown (no results.json)")
    blocks.append(Para(f"Folder `{run_dir}`; method **{cfg.train.method}**"
                       + (f" ({method.summary})" if method is not None and getattr(method, "summary", "") else "")
                       + f"; model {cfg.model.name} (width {cfg.model.width:g}) on **{info.name}**; "
                       f"evaluated with repulsor {code_version}."))
    blocks.append(Details("Resolved config (config.toml)", (run_dir / "config.toml").read_text(encoding="utf-8"), "toml"))

    if not brief:
        blocks += _training_blocks(run_dir, figdir, label, peak_lr=cfg.train.lr)

    blocks.append(Heading(3, "Evaluation"))
    worst, warns = {}, 0
    if results and results.get("suites"):
        for name, res in results["suites"].items():
            blocks += suite_blocks(name, res, results)
            worst[name] = res.get("robust_accuracy")
            warns += sum(1 for v in res.get("sanity", []) if not v.get("ok"))
    else:
        blocks.append(Para(f"Not evaluated yet (no results.json): run `repulsor evaluate {run_dir}`.", note=True))
    ctx.overview.append([label, info.name, cfg.train.method, cfg.model.name, *overview_accuracies(results),
                         f"{warns} WARN" if warns else "ok" if results else "–"])
    ctx.overview_classes.append("warn" if warns else "")

    blocks += _model_blocks(run_dir, ctx, cfg, info, figdir, label, brief=brief, n=n or ctx.n or cfg.eval.n)
    ctx.timings[label] = round(time.time() - started, 2)
    return blocks


def _model_blocks(run_dir: Path, ctx: _Context, cfg, info, figdir: Path, label: str, *, brief: bool,
                  n: int) -> list:
    """The figures that need the model and the test data: attacks run here on a few points."""
    blocks = [Heading(3, "Adversarial examples and representation")]
    try:
        model = store.load_model(run_dir, device=ctx.device)
    except UserError as error:
        return blocks + [Para(f"Figures skipped: {error}", note=True)]
    try:
        x, y = ctx.test_split(cfg, n)
    except UserError as error:
        return blocks + [Para(f"Figures skipped: the test data is unavailable: {error}", note=True)]
    e = cfg.eval
    eps, norm, seed, batch_size = e.eps, e.norm, e.seed, e.batch_size
    ctx.say(f"{label}: PGD-20 at eps={eps:.4g} ({norm}) on {len(y)} test points")
    result = evaluate(model, x, y, suite="quick", eps=eps, norm=norm, batch_size=batch_size, seed=seed,
                                   device=ctx.device, quiet=True, checks=False)
    x_adv = result.pop("x_adv")
    blocks.append(Para(f"The figures below attack the first {len(y)} test points with the `quick` suite's PGD-20 "
                       f"(step eps/4, random start, cross-entropy) at {norm} eps = {format_eps(eps, norm)}, seed {seed}: "
                       f"clean {format_accuracy(result['clean_accuracy'])}, PGD-20 "
                       f"{format_accuracy(result['robust_accuracy'])} on these points (the tables above are the "
                       "reference numbers)."))
    with evaluating(model):
        clean_pred = analysis.class_scores(model, x, batch_size, ctx.device).argmax(1)
        adv_pred = analysis.class_scores(model, x_adv, batch_size, ctx.device).argmax(1)
    summary = _analysis_summary(run_dir)
    from_analysis = (f"Taken from `{run_dir / 'analysis'}` (`repulsor` analysis on the first {summary.get('n', '?')} "
                     "test points).")

    # Robustness curve (Figures 2-3 of the paper).
    if not brief:
        png = _copy_analysis(run_dir, "robustness_curve", figdir)
        note = from_analysis
        if png is None:
            # Every other value of the analysis grid (eps, 1.25 eps, ..., 2 eps) on at most
            # CURVE_N points: a curve costs a PGD-20 per eps value.
            eps_values = analysis.curve_eps_values(eps, norm)[::2]
            m = min(len(y), CURVE_N)
            ctx.say(f"{label}: robustness curve over {len(eps_values)} eps values on {m} points")
            curve = analysis.robustness_curve(model, x[:m], y[:m], eps_values=eps_values, norm=norm, steps=20,
                                              seed=seed, batch_size=batch_size, device=ctx.device)
            png = Path(analysis.plot_robustness_curves({label: curve}, figdir / "robustness_curve.png", norm=norm,
                                                       title=f"PGD-20 robustness curve ({info.name})")["png"])
            note = (f"Computed on the first {m} test points (`repulsor analyse` draws it on more points and eps "
                    "values; the report reuses its figure when present).")
        blocks.append(Figure(png, "Robustness curve: PGD-20 accuracy as eps grows from the run's eps to twice it; a "
                                  "point counts as robust at eps only if no attack of radius <= eps fooled it, so the "
                                  f"curve never rises. {note}"))

    # Adversarial confusion matrix (Figure 5a-b), as analysis.adversarial_confusion draws it, from the
    # predictions already at hand (no further forward passes).
    png = _copy_analysis(run_dir, "confusion", figdir)
    if png is not None:
        caption = f"Adversarial confusion matrix of the clean-correct points. {from_analysis}"
    else:
        correct = clean_pred == y
        matrix = analysis.confusion_matrix(y[correct], adv_pred[correct], info.num_classes)
        png = Path(analysis.plot_confusion(matrix, info.classes, figdir / "confusion.png",
                                           title=f"Adversarial confusion ({label})")["png"])
        caption = (f"Adversarial confusion matrix: rows are true classes, columns the PGD-20 prediction, of the "
                   f"{int(correct.sum())} clean-correct points ({int((correct & (adv_pred != y)).sum())} fooled); "
                   "rows sum to 100%, the diagonal is the robust fraction per class.")
    blocks.append(Figure(png, caption))

    # Prototype geometry.
    if hasattr(model, "prototypes") and hasattr(model, "embed"):
        P = model.prototypes.detach().float().cpu()
        written = plot_prototype_similarity(P, info.classes, figdir / "prototype_similarity.png",
                                            title=f"Prototype cosine similarity ({label})")
        blocks.append(Figure(Path(written["png"]),
                             f"Pairwise cosine similarity of the {P.shape[0]} prototypes (D = {P.shape[1]}): max "
                             f"off-diagonal {written['max_cosine']:.3f}, mean {written['mean_cosine']:.3f}. Repulsive "
                             "prototypes are spread apart: off-diagonal values near or below zero."))
        z = embed_points(model, x, batch_size, ctx.device)
        cosine = getattr(model, "distance", None) == "cosine"
        written = plot_embedding_pca(z, y, P, info.classes, figdir / "embedding_pca.png", normalise=cosine,
                                     title=f"Test embeddings, PCA ({label})")
        ev = written["explained_variance"]
        blocks.append(Figure(Path(written["png"]),
                             f"2-D PCA of the embeddings `model.embed(x)` of {len(y)} clean test points, coloured by "
                             "true class; stars are the prototypes projected with the same PCA"
                             + (" (embeddings and prototypes normalised to unit length: the cosine head decides by "
                                "direction)" if cosine else "")
                             + f". The two components explain {100 * (ev[0] + ev[1]):.1f}% of the variance."))
    else:
        blocks.append(Para("Linear head: no prototypes, so no prototype geometry.", note=True))

    # Clean / adversarial / perturbation grid.
    fooled = ((clean_pred == y) & (adv_pred != y)).nonzero().squeeze(1)
    others = torch.tensor([i for i in range(len(y)) if i not in set(fooled.tolist())], dtype=torch.long)
    chosen = torch.cat([fooled, others])[:GRID_COLUMNS]
    written = plot_adversarial_grid(x[chosen], x_adv[chosen], y[chosen], clean_pred[chosen], adv_pred[chosen],
                                    info.classes, figdir / "adversarial_examples.png", eps=eps, norm=norm,
                                    ids=chosen.tolist())
    blocks.append(Figure(Path(written["png"]),
                         f"Test points {', '.join(map(str, chosen.tolist()))}: clean image titled 'true: predicted', "
                         "its adversarial example titled with the adversarial prediction (red = wrong), and the "
                         + ("perturbation (x_adv - x) × 0.5/eps + 0.5 (grey: unchanged, black/white: -eps/+eps). "
                            if norm == "linf" else "perturbation scaled to its largest pixel change (grey: unchanged). ")
                         + "Pixels already at 0 or 1 can move one way only and often stay grey. Points the attack "
                           "fooled come first; where PGD-20 failed, the perturbation is not kept and shows as flat grey."))

    # Nearest correctly classified training samples (Figure 5c).
    if not brief and ctx.neighbours:
        png = _copy_analysis(run_dir, "neighbours", figdir)
        if png is not None:
            blocks.append(Figure(png, "Misclassified adversarial examples (left, 'true→predicted') and their nearest "
                                      f"correctly classified training samples of the predicted class. {from_analysis}"))
        else:
            ctx.say(f"{label}: nearest training neighbours")
            grid = analysis.NeighbourGrid(k=5, pool=NEIGHBOUR_POOL, rows=NEIGHBOUR_ROWS, restrict="predicted")
            summary = analysis.neighbours(model, cfg, (x, y, x_adv), figdir, grid, data_dir=ctx.data_dir, seed=seed,
                                          batch_size=batch_size, device=ctx.device)
            if "skipped" in summary:
                blocks.append(Para(f"Neighbour grid skipped: {summary['skipped']}", note=True))
            else:
                blocks.append(Figure(Path(summary["png"]),
                                     f"{summary['rows']} of the {summary['n_misclassified']} misclassified adversarial "
                                     "examples (left, titled 'true→predicted') and their 5 nearest correctly classified "
                                     f"training samples of the predicted class among the first {summary['pool']} "
                                     f"training images, by {summary['distance']} distance in representation space "
                                     "(embeddings for prototype models, class scores otherwise)."))
    return blocks


def _compare_blocks(compare_dir: Path, ctx: _Context) -> list:
    """A comparison folder: its tables, overlaid curves and a short section per run."""
    started = time.time()
    report = ckpt.read_json(compare_dir / "comparison.json", "comparison file")
    label = compare_dir.resolve().name
    slug = ctx.slug(f"compare-{label}")
    figdir = ctx.out / "figures" / slug
    figdir.mkdir(parents=True, exist_ok=True)
    protocol = report.get("protocol", {})
    blocks = [Heading(2, f"Comparison `{label}`", anchor=slug),
              Para(f"Folder `{compare_dir}`; data set **{protocol.get('dataset', '?')}**; methods "
                   f"{', '.join(report.get('methods', [])) or '?'}; repulsor {protocol.get('code_version', '?')}.")]
    config = report.get("config")
    if config:
        blocks.append(Details("Comparison config (resolved)", json.dumps(config, indent=2), "json"))
    tables = compare_dir / "tables.md"
    if tables.is_file():
        blocks += markdown_blocks(tables.read_text(encoding="utf-8"), shift=1)
    else:
        blocks.append(Para("No tables.md in this folder.", note=True))
    # Sanity verdicts per run, in plain sight.
    for name, run in (report.get("runs") or {}).items():
        for suite, res in (run.get("suites") or {}).items():
            warn = [v for v in res.get("sanity", []) if not v.get("ok")]
            if warn:
                blocks.append(Para(f"{name}, suite `{suite}`: {len(warn)} sanity check(s) failed ("
                                   + "; ".join(f"{v.get('name')}: {v.get('message')}" for v in warn)
                                   + "); its robust accuracy may be overstated.", warn=True))
    curve = compare_dir / "robustness_curves.png"
    if not curve.is_file() and (compare_dir / "robustness_curves.json").is_file():
        data = ckpt.read_json(compare_dir / "robustness_curves.json", "robustness curves")
        curve = Path(analysis.plot_robustness_curves(data["curves"], figdir / "robustness_curves.png",
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
    runs = [name for name in (report.get("runs") or {})]
    found = [p.name for p in sorted(compare_dir.iterdir()) if p.is_dir() and (p / "config.toml").is_file()]
    runs += [name for name in found if name not in runs]
    ctx.timings[label] = round(time.time() - started, 2)
    n = ctx.n  # None: each run's eval.n (a comparison's eval_n)
    for name in runs:
        run_dir = compare_dir / name
        if not (run_dir / "config.toml").is_file():
            continue
        if not (run_dir / "model.safetensors").is_file():
            blocks += [Heading(2, f"{label} / {name}"), Para("Training unfinished: no model.safetensors.", note=True)]
            continue
        blocks += _run_blocks(run_dir, ctx, label=f"{label}-{name}", heading=f"{label} / method run `{name}`",
                              brief=True, n=n)
    return blocks


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
        if (path / "comparison.json").is_file():
            kinds.append("compare")
        elif (path / "config.toml").is_file():
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
    ctx = _Context(out, n=n, data_dir=data_dir, device=device, quiet=quiet, neighbours=neighbours, overrides=overrides)
    body = []
    for path, kind in zip(paths, kinds):
        if kind == "compare":
            body += _compare_blocks(path, ctx)
        else:
            body += _run_blocks(path, ctx, label=path.resolve().name, heading=f"Run `{path.resolve().name}`")

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
