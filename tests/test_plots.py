"""Tests of repulsor.plots: what each figure draws (axes, scales, labels, read off the figure
before it is written) and the numbers it writes beside the PNG."""

import csv
import json

import pytest
import torch

from repulsor.errors import UserError
from repulsor.plots import curves, draw, images, matrices


def is_png(path, min_bytes=2000):
    data = open(path, "rb").read()
    return data.startswith(b"\x89PNG") and len(data) > min_bytes


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plots save, kept (as ``(figure, axes)``) before they are written."""
    kept = []
    real = draw.save_figure

    def keep(fig, path):
        kept.append((path, [ax for ax in fig.axes], {id(ax): (ax.get_xlim(), ax.get_ylim(), ax.get_yscale(),
                                                             ax.get_xlabel(), ax.get_ylabel(),
                                                             [t.get_text() for t in ax.texts],
                                                             [line.get_xydata().tolist() for line in ax.lines],
                                                             ax.get_title(), ax.get_legend(),
                                                             [(line.get_linestyle(), line.get_color()) for line in ax.lines],
                                                             [c.get_paths()[0].vertices.tolist() for c in ax.collections
                                                              if c.get_paths()])
                                                    for ax in fig.axes}))
        real(fig, path)

    monkeypatch.setattr(draw, "save_figure", keep)
    return kept


def axes_info(record, i):
    _, axes, info = record
    xlim, ylim, yscale, xlabel, ylabel, texts, lines, title, legend, styles, areas = info[id(axes[i])]
    return {"xlim": xlim, "ylim": ylim, "yscale": yscale, "xlabel": xlabel, "ylabel": ylabel, "texts": texts,
            "lines": lines, "title": title, "legend": legend, "styles": styles, "areas": areas}


# ------------------------------------------------------------------ draw


def test_png_path_csv_text_and_image_array():
    assert draw.png_path("a/b.png").name == "b.png" and draw.png_path("a/b").name == "b.png"
    assert draw.png_path("a/b.PNG").name == "b.PNG"
    assert draw.csv_text([["x", None, 1.5], ["a,b", 2, ""]]) == 'x,,1.5\n"a,b",2,\n'
    grey, cmap = draw.image_array(torch.full((1, 4, 5), 2.0))
    assert grey.shape == (4, 5) and cmap == "gray" and grey.max() == 1.0  # clamped to [0, 1]
    rgb, cmap = draw.image_array(torch.rand(3, 4, 5))
    assert rgb.shape == (4, 5, 3) and cmap is None
    with pytest.raises(UserError, match=r"\[1 or 3, H, W\]"):
        draw.image_array(torch.rand(2, 4, 5))


def test_a_legend_of_many_lines_goes_beside_the_axes():
    fig = draw.new_figure(4, 3)
    few, many = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i in range(3):
        few.plot([0, 1], [i, i], label=f"l{i}")
    for i in range(6):
        many.plot([0, 1], [i, i], label=f"l{i}")
    draw.legend(few)
    draw.legend(many)
    assert few.get_legend().get_bbox_to_anchor().x0 == pytest.approx(few.bbox.x0)
    assert many.get_legend().get_bbox_to_anchor().x0 > many.bbox.x1  # anchored right of the axes


# ------------------------------------------------------------------ curves


def test_robustness_curves_in_grey_levels_and_plain_eps(tmp_path, drawn):
    grey = [{"eps": e / 255, "accuracy": a} for e, a in [(16, 0.1), (8, 0.4), (12, 0.2)]]
    written = curves.plot_robustness_curves({"m": grey}, tmp_path / "grey", "t")
    assert written["png"].endswith("grey.png") and is_png(written["png"])
    info = axes_info(drawn[-1], 0)
    assert info["xlabel"] == "ε (/255)" and info["ylabel"] == "robust accuracy (%)"
    assert sum(info["lines"][0], []) == pytest.approx([8, 40, 12, 20, 16, 10])  # sorted by eps, in /255 and %
    assert info["ylim"][0] == 0
    mnist = [{"eps": 0.3, "accuracy": 0.5}, {"eps": 0.1, "accuracy": 0.9}]
    curves.plot_robustness_curves({"m": mnist}, tmp_path / "plain.png")
    info = axes_info(drawn[-1], 0)
    assert info["xlabel"] == "ε (L-inf)" and sum(info["lines"][0], []) == pytest.approx([0.1, 90, 0.3, 50])
    curves.plot_robustness_curves({"m": grey}, tmp_path / "l2.png", norm="l2")
    assert axes_info(drawn[-1], 0)["xlabel"] == "ε (L2)"  # /255 only for L-inf
    stored = json.loads((tmp_path / "l2.json").read_text())
    assert stored == {"title": "Robustness curve (PGD-20)", "norm": "l2", "curves": {"m": grey}}
    with pytest.raises(UserError, match="no robustness curves"):
        curves.plot_robustness_curves({}, tmp_path / "none.png")
    with pytest.raises(UserError):
        curves.plot_robustness_curves({"m": grey}, tmp_path / "bad.png", norm="l3")


def test_robustness_curves_carry_their_intervals_and_the_certified_bound(tmp_path, drawn):
    """Entries that say on how many points they were measured get a 95% Wilson band; a certified
    accuracy beside them is a dashed line of the same colour, never above the attacked curve here."""
    from repulsor.formats import wilson_interval

    curve = [{"eps": 0.1, "accuracy": 0.8, "n": 100, "certified": 0.6},
             {"eps": 0.3, "accuracy": 0.0, "n": 100, "certified": 0.0}]
    curves.plot_robustness_curves({"ibp": curve}, tmp_path / "bands.png", norm="l1")
    details = axes_info(drawn[-1], 0)
    band = details["areas"][0]
    low, high = wilson_interval(80, 100)
    assert max(y for _, y in band) == pytest.approx(100 * high) and min(y for _, y in band) == pytest.approx(0.0)
    assert min(y for x, y in band if x == pytest.approx(0.1)) == pytest.approx(100 * low)
    assert "bands: 95% Wilson intervals" in details["texts"] and details["xlabel"] == "ε (L1)"
    assert sum(details["lines"][1], []) == pytest.approx([0.1, 60.0, 0.3, 0.0])
    labels = [t.get_text() for t in details["legend"].get_texts()]
    assert labels == ["ibp", "ibp, certified (lower bound)"]
    (solid, colour), (dashed, same) = details["styles"]
    assert solid == "-" and dashed == "--" and colour == same
    plain = [{"eps": 0.1, "accuracy": 0.8}]  # no n: no band to draw, and no claim of one
    curves.plot_robustness_curves({"m": plain}, tmp_path / "plain.png")
    assert "bands: 95% Wilson intervals" not in axes_info(drawn[-1], 0)["texts"]


def test_epochs_use_whole_epochs_and_say_when_empty(tmp_path, drawn):
    series = {"a": {"val_robust": [(1, 0.2), (2, 0.3)], "val_clean": [(1, 0.5), (2, 0.6)]},
              "b": {"val_robust": [], "val_clean": [(1, 0.7)]}}
    png = curves.draw_epochs(series, tmp_path / "epochs", title="t", last_epoch=2)
    assert png.name == "epochs.png" and is_png(png)
    info = axes_info(drawn[-1], 0)
    assert info["xlim"] == (0.5, 2.5) and info["ylim"] == (0, 100)
    assert info["lines"] == [[[1, 20], [2, 30]], [[1, 50], [2, 60]], [[1, 70]]]
    assert [t.get_text() for t in info["legend"].get_texts()] == ["a robust", "a clean", "b clean"]
    curves.draw_epochs({"a": {"val_robust": [], "val_clean": []}}, tmp_path / "none", title="t", last_epoch=1)
    info = axes_info(drawn[-1], 0)
    assert info["texts"] == ["no validation records"] and info["xlim"] == (0.5, 1.5)


def test_training_curves_lr_axis_reaches_the_peak_and_loss_goes_log_when_it_spans_much(tmp_path, drawn):
    records = [{"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.3, "lr": 0.1},
               {"epoch": 2, "train_loss": 0.05, "train_accuracy": 0.9, "lr": 1e-11}]
    written = curves.plot_training_curves(records, tmp_path / "train.png", peak_lr=0.4)
    assert is_png(written["png"])
    loss, lr = axes_info(drawn[-1], 0), axes_info(drawn[-1], 1)
    assert loss["yscale"] == "log" and loss["xlim"] == (0.5, 2.5)  # 2.0 / 0.05 > 20
    assert lr["ylim"] == pytest.approx((0, 0.44)) and lr["lines"][0] == [[1, 0.1], [2, 1e-11]]
    accuracy = axes_info(drawn[-1], 2)  # the twin axis
    assert accuracy["ylim"] == (0, 100) and sum(accuracy["lines"][0], []) == pytest.approx([1, 30, 2, 90])
    one = [{"epoch": 1, "train_loss": 1.0, "train_accuracy": None, "lr": None}]
    curves.plot_training_curves(one, tmp_path / "one.png")
    loss = axes_info(drawn[-1], 0)
    assert loss["yscale"] == "linear" and loss["xlim"] == (0.5, 1.5)
    assert len(drawn[-1][1]) == 2  # no accuracy, no twin axis


# ------------------------------------------------------------------ matrices


def test_row_normalise_keeps_empty_rows_zero():
    out = matrices.row_normalise(torch.tensor([[1, 3], [0, 0]]))
    assert out.dtype == torch.float32 and out.tolist() == [[0.25, 0.75], [0.0, 0.0]]


def test_confusion_writes_counts_and_refuses_a_wrong_number_of_names(tmp_path, drawn):
    matrix = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 0, 5]])
    written = matrices.plot_confusion(matrix, ["a", "b", "c"], tmp_path / "conf")
    assert is_png(written["png"]) and written["csv"].endswith("conf.csv")
    rows = list(csv.reader(open(written["csv"])))
    assert rows == [["true \\ predicted", "a", "b", "c"], ["a", "3", "1", "0"], ["b", "0", "0", "0"],
                    ["c", "2", "0", "5"]]
    assert sorted(axes_info(drawn[-1], 0)["texts"]) == sorted(["75", "25", "29", "71"])  # non-zero cells, % of row
    with pytest.raises(UserError, match="2 class names for a 3-class"):
        matrices.plot_confusion(matrix, ["a", "b"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_confusion_plot_many_classes(tmp_path, drawn):
    k = 100
    matrix = torch.zeros(k, k, dtype=torch.long)
    matrix[torch.arange(300) % k, (torch.arange(300) * 7) % k] += 1
    written = matrices.plot_confusion(matrix, [f"c{i}" for i in range(k)], tmp_path / "big.png")
    assert is_png(written["png"])
    assert axes_info(drawn[-1], 0)["texts"] == []  # no numbers written into 10,000 cells


def test_prototype_similarity_reports_the_off_diagonal(tmp_path):
    cos = torch.tensor([[1.0, -0.5, 0.2], [-0.5, 1.0, 0.1], [0.2, 0.1, 1.0]])
    written = matrices.plot_prototype_similarity(cos, [0, 1, 2], tmp_path / "cos.png")
    assert is_png(written["png"])
    assert written["max_cosine"] == pytest.approx(0.2) and written["mean_cosine"] == pytest.approx(-0.4 / 6)
    rows = list(csv.reader(open(written["csv"])))
    assert rows[0] == ["class", "0", "1", "2"] and [float(v) for v in rows[1][1:]] == [1.0, -0.5, 0.2]


# ------------------------------------------------------------------ images


def test_magnified_perturbation_maps_eps_to_black_and_white():
    x = torch.full((1, 1, 1, 3), 0.5)
    x_adv = x + torch.tensor([-0.1, 0.0, 0.1]).view(1, 1, 1, 3)
    assert flat(images.magnify_perturbation(x, x_adv, 0.1, "linf")) == pytest.approx([0, 0.5, 1], abs=1e-6)
    half = x + torch.tensor([-0.05, 0.0, 0.2]).view(1, 1, 1, 3)  # l2: scaled to the largest change
    assert flat(images.magnify_perturbation(x, half, 1.0, "l2")) == pytest.approx([0.375, 0.5, 1], abs=1e-6)
    assert flat(images.magnify_perturbation(x, x, 1.0, "l2")) == pytest.approx([0.5] * 3)


def flat(t):
    return t.flatten().tolist()


@pytest.mark.parametrize("channels", [1, 3])
def test_adversarial_grid_records_every_point(tmp_path, channels, drawn):
    x = torch.rand(4, channels, 6, 6)
    x_adv = (x + 0.05 * torch.sign(torch.randn_like(x))).clamp(0, 1)
    y, clean, adv = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 0, 2])
    written = images.plot_adversarial_grid(x, x_adv, y, clean, adv, ["a", "b", "c"], tmp_path / "adv.png",
                                           eps=0.05, norm="linf", ids=[7, 8, 9, 10])
    assert is_png(written["png"])
    stored = json.loads((tmp_path / "adv.json").read_text())
    assert stored["eps"] == 0.05 and stored["norm"] == "linf"
    assert [(p["id"], p["true"], p["clean_pred"], p["adv_pred"]) for p in stored["points"]] == [
        (7, 0, 0, 1), (8, 1, 1, 1), (9, 2, 1, 0), (10, 0, 0, 2)]
    assert all(p["max_abs_change"] <= 0.05 + 1e-6 for p in stored["points"])
    titles = [axes_info(drawn[-1], i)["title"] for i in range(12)]  # per point: clean, adversarial, perturbation
    assert titles[0::3] == ["a: a", "b: b", "c: b", "a: a"] and titles[1::3] == ["→ b", "→ b", "→ a", "→ c"]
    empty = images.plot_adversarial_grid(x[:0], x[:0], y[:0], y[:0], y[:0], ["a", "b", "c"], tmp_path / "e.png",
                                         eps=0.05, norm="linf")
    assert is_png(empty["png"], 500) and json.loads((tmp_path / "e.json").read_text())["points"] == []


def synthetic(n, *, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.arange(n) % 3


@pytest.mark.parametrize("channels", [1, 3])
def test_neighbour_grid_png(tmp_path, channels):
    shape = (channels, 8, 8)
    x_train, y_train = synthetic(20, shape=shape)
    x_query, y_query = synthetic(3, shape=shape, seed=4)
    neighbours = torch.tensor([[0, 1, 2], [3, 4, -1], [5, 6, 7]])
    written = images.neighbour_grid(x_query, y_query, (y_query + 1) % 3, x_train, neighbours, ["a", "b", "c"],
                                    tmp_path / "grid.png", y_train=y_train, distances=torch.rand(3, 3),
                                    query_ids=[10, 11, 12])
    assert is_png(written["png"])
    rows = json.loads((tmp_path / "grid.json").read_text())["rows"]
    assert [r["query"] for r in rows] == [10, 11, 12] and rows[1]["neighbours"] == [3, 4, -1]
    assert rows[1]["neighbour_classes"] == [0, 1, None] and rows[1]["distances"][2] is not None
    empty = images.neighbour_grid(x_query[:0], y_query[:0], y_query[:0], x_train, torch.zeros(0, 3),
                                  ["a", "b", "c"], tmp_path / "empty.png")
    assert is_png(empty["png"], 500)
    with pytest.raises(UserError, match=r"\[Q, k\] with Q = 3"):
        images.neighbour_grid(x_query, y_query, y_query, x_train, torch.zeros(2, 3), ["a", "b", "c"],
                              tmp_path / "bad.png")


def test_neighbour_grid_records_gathered_training_ids(tmp_path):
    x_train, y_train = synthetic(4, shape=(1, 5, 5))
    written = images.neighbour_grid(x_train[:1], y_train[:1], y_train[:1], x_train, torch.tensor([[2, 0]]), ["a", "b", "c"],
                                    tmp_path / "g.png", train_ids=[100, 101, 102, 103])
    assert json.loads(open(written["json"]).read())["rows"][0]["neighbours"] == [102, 100]


def test_embedding_pca_writes_its_variance(tmp_path, drawn):
    projected = {"points": torch.randn(30, 2), "prototypes": torch.eye(3, 2), "explained_variance": [0.6, 0.25]}
    written = images.plot_embedding_pca(projected, torch.arange(30) % 3, ["a", "b", "c"], tmp_path / "pca.png",
                                        normalise=True)
    assert is_png(written["png"]) and written["explained_variance"] == pytest.approx([0.6, 0.25])
    stored = json.loads((tmp_path / "pca.json").read_text())
    assert stored["n"] == 30 and stored["normalised"] is True and stored["prototypes_2d"] == torch.eye(3, 2).tolist()
    info = axes_info(drawn[-1], 0)
    assert info["xlabel"] == "PC 1 (60.0% of variance)" and info["ylabel"] == "PC 2 (25.0% of variance)"
    assert info["title"].endswith("on the unit sphere") and sorted(info["texts"]) == ["a", "b", "c"]


def test_epochs_draw_each_extra_validation_loss_in_the_runs_colour(tmp_path, drawn):
    series = {"p": {"val_robust": [(1, 0.1), (2, 0.0)], "val_clean": [(1, 0.5), (2, 0.6)],
                    "val_robust_proto_linf": [(1, 0.4), (2, 0.3)], "val_robust_ce": [(1, 0.05), (2, 0.0)]}}
    curves.draw_epochs(series, tmp_path / "epochs", title="t", last_epoch=2)
    info = axes_info(drawn[-1], 0)
    assert info["lines"][2:] == [[[1, 40], [2, 30]], [[1, 5], [2, 0]]]
    assert [t.get_text() for t in info["legend"].get_texts()] == [
        "p robust, cw loss", "p clean", "p robust, proto_linf loss", "p robust, ce loss"]


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_accuracy_axes_span_0_to_100_percent_even_for_flat_curves(tmp_path, drawn, value):
    """All-zero (or all-one) curves: the axis stays 0-100% in the unit its label names, so nothing
    reads as a measured range of 0.00-0.05."""
    flat = [{"eps": e / 255, "accuracy": value} for e in (8, 12, 16)]
    curves.plot_robustness_curves({"a": flat, "b": flat}, tmp_path / "flat")
    info = axes_info(drawn[-1], 0)
    assert info["ylim"] == pytest.approx((0, 100)) and info["ylabel"].endswith("(%)")
    assert sum(info["lines"][0], [])[1::2] == pytest.approx([100 * value] * 3)
    series = {"a": {"val_robust": [(1, value), (2, value)], "val_clean": [(1, value), (2, value)]}}
    curves.draw_epochs(series, tmp_path / "epochs", title="t", last_epoch=2)
    assert axes_info(drawn[-1], 0)["ylim"] == pytest.approx((0, 100))
