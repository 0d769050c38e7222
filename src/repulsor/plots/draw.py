"""Drawing figures: matplotlib on an Agg canvas (no pyplot, no display), PNG and CSV files
written atomically. Only drawing lives here; the numbers come from ``repulsor.analysis``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from ..store import files as ckpt
from ..errors import UserError

DPI = 120


def render_png(fig) -> bytes:
    """The PNG bytes of a matplotlib ``Figure`` drawn on an Agg canvas."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def legend(ax) -> None:
    """A legend inside the axes for a few lines, beside them (not over the data) for many."""
    if len(ax.get_legend_handles_labels()[0]) <= 4:
        ax.legend(fontsize=8)
    else:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` drawn on an Agg canvas.

    The figure never goes through pyplot, so it needs no display, does not change the
    global backend of a caller's session, and is not kept alive by pyplot's registry.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> None:
    data = render_png(fig)
    fig.clf()
    ckpt.atomic_write_bytes(path, data)


def csv_text(rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in rows:
        writer.writerow(["" if value is None else value for value in row])
    return buffer.getvalue()


def label_class_axes(ax, names: list[str]) -> None:
    """Class names on both axes of a k x k heat map (tick labels shrink for many classes, none past 40)."""
    k = len(names)
    if k <= 40:
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8 if k <= 20 else 5)
        ax.set_yticklabels(names, fontsize=8 if k <= 20 else 5)


def png_path(path) -> Path:
    path = Path(path)
    return path if path.suffix.lower() == ".png" else path.with_name(path.name + ".png")


def image_array(img: torch.Tensor):
    """An image [C, H, W] as (array, cmap) for ``imshow``: grey for 1 channel, RGB for 3."""
    img = img.detach().float().cpu().clamp(0, 1)
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise UserError(f"images must be [1 or 3, H, W]; got {tuple(img.shape)}")
    if img.shape[0] == 1:
        return img[0].numpy(), "gray"
    return img.permute(1, 2, 0).numpy(), None
