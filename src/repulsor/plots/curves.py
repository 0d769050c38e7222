"""Line figures: robustness curves, validation accuracy over epochs, a training run's loss and
learning rate."""

from __future__ import annotations

from ..attacks import geometry
from ..errors import UserError
from ..formats import as_number, is_grey_levels
from ..store import files as ckpt
from . import draw


def plot_robustness_curves(curves: dict[str, list[dict]], path, title: str = "Robustness curve (PGD-20)", *,
                           norm: str = "linf") -> dict:
    """Draw one robustness curve per model and write the PNG and a JSON of the numbers.

    Args:
        curves: ``{label: robustness_curve(...)}``, each a list of ``{"eps", "accuracy", ...}``.
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
    for i, (label, curve) in enumerate(curves.items()):
        points = sorted((entry["eps"], entry["accuracy"]) for entry in curve)
        ax.plot([e * scale for e, _ in points], [100 * a for _, a in points], marker="o", markersize=4,
                color=f"C{i % 10}", label=str(label))
    ax.set_xlabel("ε (/255)" if grey else f"ε ({'L-inf' if norm == 'linf' else 'L2'})")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)  # always the whole range: all-zero curves must not read as a measured 0.00-0.05
    ax.grid(True, alpha=0.3)
    draw.legend(ax)
    draw.save_figure(fig, png)
    json_path = png.with_suffix(".json")
    ckpt.atomic_write_json(json_path, {"title": title, "norm": norm, "curves": {str(k): v for k, v in curves.items()}})
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
