"""Tests of repulsor.analysis with tiny stand-in models on small synthetic data."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repulsor import analyses as analysis
from repulsor.plots import curves
from repulsor.attacks import evaluating, pgd
from repulsor.config import Config, to_toml
from repulsor.errors import UserError

K = 3
SHAPE = (1, 6, 6)


def synthetic(n, *, k=K, shape=SHAPE, seed=0):
    """Images in [0, 1] whose class shifts a class-specific pattern; labels 0..k-1."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn((k, *shape), generator=torch.Generator().manual_seed(123))
    y = torch.arange(n) % k
    x = 0.5 + 0.15 * patterns[y] + 0.1 * torch.randn((n, *shape), generator=g)
    return x.clamp(0, 1), y


class MLP(nn.Module):
    """Logits model: no ``embed``."""

    def __init__(self, k=K, shape=SHAPE):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 16), nn.ReLU(), nn.Linear(16, k))

    def forward(self, x):
        return self.net(x)


class Proto(nn.Module):
    """Stand-in prototype model: embed, scores, prototypes buffer, distance."""

    def __init__(self, k=K, shape=SHAPE, dim=8, distance="cosine"):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), dim))
        prototypes = torch.randn(k, dim, generator=torch.Generator().manual_seed(7))
        self.register_buffer("prototypes", F.normalize(prototypes, dim=1))
        self.distance = distance

    def embed(self, x):
        return self.net(x)

    def scores(self, z):
        if self.distance == "cosine":
            return 10 * F.normalize(z, dim=1) @ self.prototypes.T
        return -torch.cdist(z, self.prototypes)

    def forward(self, x):
        return self.scores(self.embed(x))


def trained(model, x, y, steps=60):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def is_png(path, min_bytes=2000):
    data = open(path, "rb").read()
    return data.startswith(b"\x89PNG") and len(data) > min_bytes


@pytest.fixture(scope="module")
def data():
    return synthetic(90)


@pytest.fixture(scope="module")
def mlp(data):
    torch.manual_seed(1)
    return trained(MLP(), *data)


@pytest.fixture(scope="module")
def proto(data):
    torch.manual_seed(2)
    return trained(Proto(), *data)


# ------------------------------------------------------------------ robustness curves


def test_robustness_curve_non_increasing_and_one_entry_per_eps(mlp, data, tmp_path):
    x, y = data
    mlp.train()
    curve = analysis.robustness_curve(mlp, x, y, eps_values=[16 / 255, 2 / 255, 0.3], steps=5)
    assert mlp.training, "the model's mode must be restored"
    assert [e["eps"] for e in curve] == sorted([16 / 255, 2 / 255, 0.3])
    accs = [e["accuracy"] for e in curve]
    assert all(a >= b for a, b in zip(accs, accs[1:]))
    assert accs[-1] <= accs[0] and accs[-1] < 0.9  # eps = 0.3 breaks this weak model
    assert all(e["n"] == len(y) for e in curve)
    mlp.eval()

    default = analysis.robustness_curve(mlp, x[:20], y[:20], steps=2)
    assert [round(e["eps"] * 255) for e in default] == list(range(8, 17))
    other = analysis.robustness_curve(mlp, x[:20], y[:20], eps_values=[0.0, 0.1], steps=2)
    written = curves.plot_robustness_curves({"mlp": curve, "short": other}, tmp_path / "curve.png", "t")
    assert is_png(written["png"])
    stored = json.loads((tmp_path / "curve.json").read_text())
    assert stored["curves"]["mlp"] == curve and stored["norm"] == "linf"


def test_robustness_curve_matches_pgd_at_a_single_eps(proto, data):
    x, y = data
    eps = 0.1
    [entry] = analysis.robustness_curve(proto, x, y, eps_values=[eps], steps=3, batch_size=1000)
    with evaluating(proto), torch.no_grad():
        clean = proto(x).argmax(1) == y
    from repulsor.runtime import derive_seed

    idx = clean.nonzero().squeeze(1)
    with evaluating(proto):
        x_adv = pgd(proto, x[idx], y[idx], eps=eps, alpha=eps / 4, steps=3,
                    seed=derive_seed(0, "robustness-curve", repr(eps), 0))
        with torch.no_grad():
            survived = (proto(x_adv).argmax(1) == y[idx]).sum().item()
    assert entry["accuracy"] == pytest.approx(survived / len(y))


def test_robustness_curve_rejects_bad_norm(mlp, data):
    with pytest.raises(UserError):
        analysis.robustness_curve(mlp, *data, norm="l7")


# ------------------------------------------------------------------ confusion


def test_confusion_matrix_by_hand():
    y_true = torch.tensor([0, 0, 1, 2, 2, 2])
    y_pred = torch.tensor([0, 1, 1, 2, 0, 2])
    expected = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert torch.equal(analysis.confusion_matrix(y_true, y_pred, 3), expected)
    with pytest.raises(UserError):
        analysis.confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)


class Decoder(nn.Module):
    """Predicts the class written into the first pixel (value c / 10), differentiably."""

    def __init__(self, k=4):
        super().__init__()
        self.k = k
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        code = x[:, 0, 0, 0:1] * 10 * self.w
        return -(torch.arange(self.k, dtype=x.dtype) - code).abs()


def test_adversarial_confusion_counts_only_clean_correct_points(tmp_path):
    k = 4
    y = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    clean_code = torch.tensor([0, 0, 1, 2, 2, 3, 3])  # point 3 is wrong when clean
    adv_code = torch.tensor([0, 2, 1, 0, 1, 0, 0])
    x = torch.zeros(len(y), 3, 4, 4)
    x[:, 0, 0, 0] = clean_code / 10
    x_adv = x.clone()
    x_adv[:, 0, 0, 0] = adv_code / 10
    names = ["a", "b,c", "d", "e"]
    result = analysis.adversarial_confusion(Decoder(k), x, y, x_adv, names, tmp_path / "confusion")
    expected = torch.zeros(k, k, dtype=torch.long)
    for t, c, a in zip(y.tolist(), clean_code.tolist(), adv_code.tolist()):
        if t == c:
            expected[t, a] += 1
    assert torch.equal(result["matrix"], expected)
    assert result["n_correct"] == 6 and result["n_fooled"] == 4
    assert is_png(tmp_path / "confusion.png")
    rows = list(csv.reader(open(tmp_path / "confusion.csv")))
    assert rows[0][1:] == names and len(rows) == k + 1
    assert [[int(v) for v in row[1:]] for row in rows[1:]] == expected.tolist()


# ------------------------------------------------------------------ overlap


def test_misclassification_overlap_by_hand():
    wrong_a = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    wrong_b = torch.tensor([1, 0, 0, 1, 1, 1], dtype=torch.bool)
    confused_a = torch.tensor([[2, 1], [0, 2], [0, 1], [1, 2], [0, 1], [0, 3]])
    confused_b = torch.tensor([[2, 3], [0, 1], [2, 1], [2, 1], [1, 0], [0, 3]])
    r = analysis.misclassification_overlap(wrong_a, wrong_b, confused_a, confused_b)
    # both wrong: points 0, 3, 5; either: 0, 1, 3, 4, 5
    assert (r["n"], r["n_wrong_a"], r["n_wrong_b"], r["n_both"], r["n_either"]) == (6, 4, 4, 3, 5)
    assert r["jaccard"] == pytest.approx(3 / 5)
    assert r["shared_of_a"] == pytest.approx(3 / 4) and r["shared_of_b"] == pytest.approx(3 / 4)
    # top-1: point 0 agrees (2, 2), point 3 does not (1 vs 2), point 5 agrees (0, 0)
    assert r["n_top1_agree"] == 2 and r["top1_agreement"] == pytest.approx(2 / 3)
    # top-2 sets: {1,2} vs {2,3} no; {1,2} vs {1,2} yes; {0,3} vs {0,3} yes
    assert r["n_top2_agree"] == 2 and r["top2_agreement"] == pytest.approx(2 / 3)
    json.dumps(r)


def test_misclassification_overlap_nothing_wrong():
    none = torch.zeros(3, dtype=torch.bool)
    c = torch.zeros(3, 2, dtype=torch.long)
    r = analysis.misclassification_overlap(none, none, c, c)
    assert r["jaccard"] is None and r["top1_agreement"] is None and r["n_both"] == 0
    with pytest.raises(UserError):
        analysis.misclassification_overlap(none, none[:2], c, c)


def test_confusion_agreement_by_hand():
    a = torch.tensor([[5, 3, 1, 0], [0, 5, 0, 0], [2, 0, 5, 1], [0, 1, 2, 5]])
    b = torch.tensor([[5, 1, 3, 0], [0, 5, 0, 1], [1, 0, 5, 2], [0, 2, 1, 5]])
    r = analysis.confusion_agreement(a, b)
    # row 0: top1 1 vs 2; row 1: a has no wrong class; row 2: 0 vs 3; row 3: 2 vs 1
    assert r["n_classes_top1"] == 3 and r["top1_agreement"] == 0
    # top-2 sets: row 0 {1,2}={1,2}; row 2 {0,3}={0,3}; row 3 {1,2}={1,2}
    assert r["n_classes_top2"] == 3 and r["top2_agreement"] == 1
    assert r["top1_in_top2"] == 1


def test_compare_runs_overlap_matches_hand_computation(mlp, proto, data, tmp_path):
    x, y = data
    with evaluating(mlp), evaluating(proto):
        adv_a = pgd(mlp, x, y, eps=0.15, alpha=0.04, steps=5)
        adv_b = pgd(proto, x, y, eps=0.15, alpha=0.04, steps=5)
        with torch.no_grad():
            sa, sb = mlp(adv_a), proto(adv_b)
    r = analysis.compare_runs_overlap(mlp, proto, x, y, adv_a, adv_b, path=tmp_path / "overlap.json")
    wa, wb = sa.argmax(1) != y, sb.argmax(1) != y
    assert r["n_wrong_a"] == int(wa.sum()) and r["n_wrong_b"] == int(wb.sum())
    assert r["n_both"] == int((wa & wb).sum()) and r["n_both"] > 0
    top1 = sum(int(sa[i].argmax() == sb[i].argmax()) for i in range(len(y)) if wa[i] and wb[i])
    assert r["n_top1_agree"] == top1
    stored = json.loads((tmp_path / "overlap.json").read_text())
    assert stored["jaccard"] == pytest.approx(r["jaccard"])


# ------------------------------------------------------------------ nearest neighbours


def brute_force(zq, zt, correct, k, cosine, classes=None, y_train=None):
    out_i, out_d = [], []
    for i in range(len(zq)):
        cands = []
        for j in range(len(zt)):
            if not correct[j] or (classes is not None and y_train[j] != classes[i]):
                continue
            if cosine:
                d = 1 - (zq[i] @ zt[j]).item() / (zq[i].norm().item() * zt[j].norm().item())
            else:
                d = math.sqrt(sum((a - b) ** 2 for a, b in zip(zq[i].tolist(), zt[j].tolist())))
            cands.append((d, j))
        cands.sort()
        out_i.append([j for _, j in cands[:k]])
        out_d.append([d for d, _ in cands[:k]])
    return out_i, out_d


@pytest.mark.parametrize("kind", ["proto", "mlp"])
def test_nearest_neighbours_equal_brute_force_and_skip_misclassified(kind):
    torch.manual_seed(3)
    model = Proto() if kind == "proto" else MLP()  # untrained: many misclassified samples
    x_train, y_train = synthetic(60, seed=1)
    x_query, _ = synthetic(7, seed=2)
    with torch.no_grad():
        if kind == "proto":
            zt, zq = model.embed(x_train), model.embed(x_query)
        else:
            zt, zq = model(x_train), model(x_query)
        correct = model(x_train).argmax(1) == y_train
    assert 0 < correct.sum() < len(y_train) - 5
    idx, dist = analysis.nearest_training_neighbours(model, x_train, y_train, x_query, k=4, batch_size=16)
    assert idx.shape == (7, 4) and dist.shape == (7, 4)
    expected_i, expected_d = brute_force(zq, zt, correct, 4, cosine=kind == "proto")
    assert idx.tolist() == expected_i
    assert torch.allclose(dist, torch.tensor(expected_d), atol=1e-5)
    assert correct[idx.flatten()].all()

    classes = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    idx, dist = analysis.nearest_training_neighbours(model, x_train, y_train, x_query, k=3, query_classes=classes)
    expected_i, _ = brute_force(zq, zt, correct, 3, cosine=kind == "proto", classes=classes, y_train=y_train)
    for row, exp in zip(idx.tolist(), expected_i):
        assert row[: len(exp)] == exp and all(v == -1 for v in row[len(exp):])


def test_nearest_neighbours_pads_when_too_few_candidates(proto):
    x_train, y_train = synthetic(4, seed=5)
    idx, dist = analysis.nearest_training_neighbours(proto, x_train, y_train, x_train[:2], k=10)
    assert idx.shape == (2, 10)
    assert (idx[:, 4:] == -1).all() and torch.isinf(dist[:, 4:]).all()


# ------------------------------------------------------------------ metrics over epochs


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")


def test_plot_metrics_over_epochs_handles_null_robust(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, [{"epoch": e, "train_loss": 1 / e, "lr": 0.1, "val_clean": 0.5 + e / 20, "val_robust": None}
                    for e in range(1, 5)])
    write_jsonl(b, [{"epoch": 1, "train_loss": 1.0, "lr": 0.1},  # no validation this epoch
                    {"epoch": 2, "train_loss": 0.8, "lr": 0.1, "val_clean": 0.6, "val_robust": 0.3},
                    {"epoch": 3, "train_loss": 0.7, "lr": 0.05, "val_clean": 0.7, "val_robust": 0.4},
                    {"epoch": 4, "train_loss": 0.6, "lr": 0.01, "val_clean": 0.72, "val_robust": 0.35}])
    result = analysis.plot_metrics_over_epochs({"clean-only": a, "robust": b}, tmp_path / "epochs.png")
    assert is_png(result["png"])
    rows = list(csv.reader(open(tmp_path / "epochs.csv")))
    assert rows[0] == ["run", "epoch", "train_loss", "lr", "val_clean", "val_robust"]
    assert len(rows) == 1 + 8 and rows[1][5] == "" and rows[5][4] == ""
    assert result["runs"]["clean-only"]["best_robust"] is None
    assert result["runs"]["robust"]["best_robust"] == 0.4 and result["runs"]["robust"]["best_robust_epoch"] == 3
    assert result["runs"]["robust"]["last_robust"] == 0.35
    single = analysis.plot_metrics_over_epochs(a, tmp_path / "single.png")
    assert is_png(single["png"])
    with pytest.raises(UserError):
        analysis.plot_metrics_over_epochs({"x": tmp_path / "missing.jsonl"}, tmp_path / "m.png")


# ------------------------------------------------------------------ analyse_run


def fake_run(tmp_path, name, cfg_text, metrics=True):
    run = tmp_path / name
    run.mkdir()
    (run / "config.toml").write_text(cfg_text)
    if metrics:
        write_jsonl(run / "metrics.jsonl", [
            {"epoch": e, "train_loss": 1.0 / e, "lr": 0.1, "val_clean": 0.8, "val_robust": 0.1 * e} for e in (1, 2, 3)])
    return run


def test_analyse_run_on_a_fake_run(tmp_path, monkeypatch):
    from repulsor import data as data_mod
    from repulsor.evaluation import run as evaluation_run
    from repulsor.store import run as store

    k, shape = 10, (1, 8, 8)  # the digits data set of the default config
    x_test, y_test = synthetic(60, k=k, shape=shape, seed=8)
    x_train, y_train = synthetic(200, k=k, shape=shape, seed=9)
    torch.manual_seed(4)
    models = {"proto": trained(Proto(k, shape), x_train, y_train, steps=40),
              "mlp": trained(MLP(k, shape), x_train, y_train, steps=40)}
    calls = []

    def load_model(run_dir, *, device="cpu"):
        return models[run_dir.name]

    def load_test_split(cfg, n, data_dir=None, **kwargs):
        calls.append(n)
        return x_test[:n], y_test[:n], None

    def load_dataset(name, split, **kwargs):
        assert (name, split) == ("digits", "train")
        return x_train, y_train

    monkeypatch.setattr(store, "load_model", load_model)
    monkeypatch.setattr(evaluation_run, "load_test_split", load_test_split)
    monkeypatch.setattr(data_mod, "load_dataset", load_dataset)

    cfg_text = to_toml(Config())
    run = fake_run(tmp_path, "proto", cfg_text)
    other = fake_run(tmp_path, "mlp", cfg_text, metrics=False)
    eps_values = [0.05, 0.1, 0.2]
    result = analysis.analyse_run(run, n=50, other_run=other, eps_values=eps_values, grid_rows=3, device="cpu")
    out = run / "analysis"
    for name in ("robustness_curve.png", "confusion.png", "neighbours.png", "epochs.png"):
        assert is_png(out / name), name
    for name in ("robustness_curve.json", "confusion.csv", "neighbours.json", "epochs.csv", "overlap.json",
                 "summary.json"):
        assert (out / name).stat().st_size > 20, name
    assert calls == [50, 50] and result["n"] == 50
    assert set(result["robustness_curve"]) == {"proto", "mlp"}
    for curve in result["robustness_curve"].values():
        assert [e["eps"] for e in curve] == eps_values
        assert curve[-1]["accuracy"] <= curve[0]["accuracy"]
    assert 0 <= result["robust_accuracy"] <= result["clean_accuracy"] <= 1
    overlap = json.loads((out / "overlap.json").read_text())
    assert overlap["n"] == 50 and overlap["run_b"] == str(other)
    assert result["confusion"]["n_fooled"] == overlap["n_wrong_a"] - (50 - result["confusion"]["n_correct"])
    rows = json.loads((out / "neighbours.json").read_text())["rows"]
    assert len(rows) == result["neighbours"]["rows"] <= 3
    for row in rows:  # neighbours come from the predicted class, correctly classified
        assert all(c == row["pred"] for c in row["neighbour_classes"] if c is not None)
    assert json.loads((out / "summary.json").read_text())["paths"] == result["paths"]
    assert result["epochs"]["proto"]["best_robust_epoch"] == 3

    # Without another run or metrics, and without training data: the neighbour grid is skipped.
    def no_data(name, split, **kwargs):
        raise UserError("no data here")

    monkeypatch.setattr(data_mod, "load_dataset", no_data)
    alone = analysis.analyse_run(other, n=30, eps_values=[0.1])
    assert "skipped" in alone["neighbours"] and "overlap" not in alone and "epochs" not in alone
    assert is_png(other / "analysis" / "confusion.png")


def test_analyse_run_on_a_real_tiny_run(tmp_path):
    """End to end with the real training loop: a one-epoch MLP prototype run on digits."""
    pytest.importorskip("sklearn")
    from repulsor import load_config, train

    cfg = load_config(None, ['data.name="digits"', 'model.name="mlp"', "train.epochs=1", "eval.after_train=false",
                             'train.method="prototype"', "train.val_n=50", 'train.device="cpu"',
                             "data.train_subset=400", "prototypes.dim=20", "prototypes.epochs=5", "train.lr=0.01"])
    run = train(cfg, tmp_path / "run", quiet=True)
    result = analysis.analyse_run(run, n=40, eps_values=[8 / 255, 16 / 255], neighbour_pool=300, grid_rows=2,
                                  device="cpu")
    assert result["n"] == 40 and len(result["robustness_curve"]["run"]) == 2
    for name in ("robustness_curve.png", "confusion.png", "epochs.png"):
        assert is_png(run / "analysis" / name), name
    assert (run / "analysis" / "summary.json").exists()


def test_metrics_over_epochs_keep_every_extra_validation_loss(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, [{"epoch": 1, "train_loss": 1.0, "lr": 0.1, "val_clean": 0.5, "val_robust": 0.1,
                     "val_robust_proto_linf": 0.4, "val_robust_ce": 0.05}])
    write_jsonl(b, [{"epoch": 1, "train_loss": 1.0, "lr": 0.1, "val_clean": 0.6, "val_robust": 0.0}])
    result = analysis.plot_metrics_over_epochs({"p": a, "c": b}, tmp_path / "epochs.png")
    rows = list(csv.reader(open(tmp_path / "epochs.csv")))
    assert rows[0][-2:] == ["val_robust_proto_linf", "val_robust_ce"]
    assert rows[1][-2:] == ["0.4", "0.05"] and rows[2][-2:] == ["", ""]
    assert result["runs"]["p"]["best_robust"] == 0.1  # the selection attack's number, not the extra ones
