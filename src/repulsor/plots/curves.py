"""Line figures: robustness curves, validation accuracy over epochs, a training run's loss and
learning rate."""

from __future__ import annotations

from ..attacks import geometry
from ..errors import UserError
from ..formats import as_number, is_grey_levels, wilson_interval
from ..store import files as ckpt
from . import draw


def plot_robustness_curves(curves: dict[str, list[dict]], path, title: str = "Robustness curve (PGD-20)", *,
                           norm: str = "linf") -> dict:
    """Draw one robustness curve per model and write the PNG and a JSON of the numbers.

    Each curve carries its uncertainty: a band of the 95% Wilson interval at each eps where the entry
    says on how many points it was measured (``n``). Where entries hold a ``certified`` accuracy (a
    lower bound on the same points), it is drawn dashed in the curve's colour, so that each eps shows
    certified <= attacked.

    Args:
        curves: ``{label: robustness_curve(...)}``, each a list of ``{"eps", "accuracy", "n", ...}``.
        path: the PNG file; the numbers go to the same name with ``.json``.
        title: the plot title.
        norm: ``linf`` shows eps in /255 units when every eps is a whole number of grey
            levels (8/255..16/255), as is otherwise (MNIST's 0.3) and for ``l2``.

    Returns:
        ``{"png": str, "json": str}``.
    """
    geometry(norm)
    if not curves:
        raise UserError("no robustness curves to plot")
    png = draw.png_path(path)
    grey = norm == "linf" and all(is_grey_levels(entry["eps"]) for curve in curves.values() for entry in curve)
    scale = 255.0 if grey else 1.0
    fig = draw.new_figure(5.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    banded = False
    for i, (label, curve) in enumerate(curves.items()):
        entries = sorted(curve, key=lambda entry: entry["eps"])
        xs = [entry["eps"] * scale for entry in entries]
        color = f"C{i % 10}"
        ax.plot(xs, [100 * entry["accuracy"] for entry in entries], marker="o", markersize=4, color=color,
                label=str(label))
        if entries and all(entry.get("n") for entry in entries):
            bands = [wilson_interval(round(entry["accuracy"] * entry["n"]), int(entry["n"])) for entry in entries]
            ax.fill_between(xs, [100 * lo for lo, _ in bands], [100 * hi for _, hi in bands], color=color, alpha=0.15,
                            linewidth=0)
            banded = True
        certified = [(x, entry["certified"]) for x, entry in zip(xs, entries) if entry.get("certified") is not None]
        if certified:
            ax.plot(*zip(*[(x, 100 * c) for x, c in certified]), linestyle="--", marker="v", markersize=3,
                    color=color, label=f"{label}, certified (lower bound)")
    if banded:
        ax.text(0.99, 0.98, "bands: 95% Wilson intervals", ha="right", va="top", fontsize=7, transform=ax.transAxes)
    axis = {"linf": "L-inf", "l2": "L2", "l1": "L1"}[norm]
    ax.set_xlabel("ε (/255)" if grey else f"ε ({axis})")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)  # always the whole range: all-zero curves must not read as a measured 0.00-0.05
    ax.grid(True, alpha=0.3)
    draw.legend(ax)
    draw.save_figure(fig, png)
    json_path = png.with_suffix(".json")
    ckpt.atomic_write_json(json_path, {"title": title, "norm": norm, "curves": {str(k): v for k, v in curves.items()}})
    return {"png": str(png), "json": str(json_path)}


def plot_bracket(rows: dict[str, dict], path, *, title: str = "Where the robust accuracy lies") -> dict:
    """certified <= robust <= attacked <= clean, one row per suite, on one 0-100% axis.

    ``rows`` is ``{label: {"certified", "attacked", "clean", "n"}}`` (accuracies in [0, 1] on the same
    ``n`` points). The span from the certified accuracy (a lower bound no attack can go below) to the
    attacked one (an upper bound) is shaded: the true robust accuracy lies in it. Each of the three has
    its 95% Wilson interval as an error bar. Writes the PNG and a JSON of the numbers.
    """
    if not rows:
        raise UserError("no brackets to plot")
    png = draw.png_path(path)
    fig = draw.new_figure(6.0, 1.2 + 0.6 * len(rows))
    ax = fig.add_subplot(1, 1, 1)
    marks = (("certified", "C2", "v", "certified (lower bound)"), ("attacked", "C3", "^", "attacked (upper bound)"),
             ("clean", "C0", "o", "clean"))
    for i, (label, row) in enumerate(rows.items()):
        ax.barh(i, 100 * (row["attacked"] - row["certified"]), left=100 * row["certified"], height=0.5, color="0.85",
                label="the robust accuracy lies here" if i == 0 else None)
        for key, color, marker, name in marks:
            low, high = wilson_interval(round(row[key] * row["n"]), int(row["n"]))
            ax.errorbar([100 * row[key]], [i], xerr=[[100 * (row[key] - low)], [100 * (high - row[key])]], fmt=marker,
                        color=color, capsize=3, label=name if i == 0 else None)
    ax.set_yticks(range(len(rows)), [f"{label} (n={row['n']})" for label, row in rows.items()])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%), error bars: 95% Wilson intervals")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    draw.legend(ax)
    draw.save_figure(fig, png)
    json_path = png.with_suffix(".json")
    ckpt.atomic_write_json(json_path, {"title": title, "rows": rows})
    return {"png": str(png), "json": str(json_path)}


def draw_epochs(series: dict, path, *, title: str, last_epoch: int):
    """Robust (solid) and clean (dashed) validation accuracy per epoch, one colour per run, and the
    robust accuracy under each extra validation loss (dotted, then dash-dotted): ``series`` is
    ``{label: {"val_robust": [(epoch, value)], "val_clean": [...], "val_robust_<loss>": [...]}}``.
    Returns the PNG path."""
    png = draw.png_path(path)
    fig = draw.new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, lines) in enumerate(series.items()):
        color = f"C{i % 10}"
        if lines["val_robust"]:
            epochs, values = zip(*lines["val_robust"])
            ax.plot(epochs, [100 * v for v in values], color=color, marker="o", markersize=3, label=f"{label} robust, cw loss"
                    if any(key.startswith("val_robust_") for key in lines) else f"{label} robust")
        if lines["val_clean"]:
            epochs, values = zip(*lines["val_clean"])
            ax.plot(epochs, [100 * v for v in values], color=color, linestyle="--", marker="s", markersize=4,
                    markerfacecolor="white", label=f"{label} clean")
        extra = [key for key in lines if key.startswith("val_robust_") and lines[key]]
        for j, key in enumerate(extra):
            epochs, values = zip(*lines[key])
            ax.plot(epochs, [100 * v for v in values], color=color, linestyle=(":", "-.")[j % 2], marker="^",
                    markersize=3, label=f"{label} robust, {key.removeprefix('val_robust_')} loss")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, max(1, last_epoch) + 0.5)  # whole epochs, even for a one-epoch run
    ax.set_ylim(0, 100)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        draw.legend(ax)
    else:
        ax.text(0.5, 0.5, "no validation records", ha="center", va="center", transform=ax.transAxes)
    draw.save_figure(fig, png)
    return png


def plot_training_curves(records: list[dict], path, title: str = "Training", *, peak_lr: float | None = None) -> dict:
    """Training loss and accuracy per epoch (left) and the learning rate (right); writes PNG.

    The learning-rate axis starts at 0 and reaches the schedule's peak (``peak_lr``), so that the
    end-of-epoch value of a one-epoch cyclic run (almost 0) does not become an axis of 1e-11.
    """
    png = draw.png_path(path)
    fig = draw.new_figure(9.0, 3.4)
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
    draw.save_figure(fig, png)
    return {"png": str(png)}
