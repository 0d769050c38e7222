"""Gradient-masking sanity checks: a sound model passes them all, masking models trip them.

The models are tiny MLPs and a tiny conv net trained for well under a second on an easy
synthetic 8x8 task (four classes, each a random binary template plus noise), so every
test runs the real checks on real trained networks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repulsor.evaluation import sanity
from repulsor.evaluation.probes import CHECK_POINTS, gradient_agreement
from repulsor.evaluation.sanity import CHECKS, check_name, format_verdicts, run_checks

K = 4
NAMES = [check_name(check) for check in CHECKS]
EXPECTED_NAMES = ["unbounded", "more_iterations", "black_box_vs_white_box", "zero_gradients",
                  "shattered_gradients", "loss_rises", "autocast_agreement", "deterministic"]
# At eps = 0.15 about half of the test points resist PGD, so the attack checks compare
# non-trivial accuracies.
EPS = {"linf": 0.15, "l2": 0.5}


def _task(channels: int, n_train: int, n_test: int, seed: int):
    """Easy synthetic images [n, C, 8, 8] in [0, 1]: a class template at contrast 0.4 plus noise."""
    gen = torch.Generator().manual_seed(seed)
    templates = (torch.rand(K, channels, 8, 8, generator=gen) > 0.5).float()

    def sample(n):
        y = torch.randint(0, K, (n,), generator=gen)
        x = (0.3 + 0.4 * templates[y] + 0.1 * torch.randn(n, channels, 8, 8, generator=gen)).clamp(0, 1)
        return x, y

    return sample(n_train), sample(n_test)


def _train(model: nn.Module, x, y, steps: int = 150) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def gray():
    """(trained MLP, x_test [200, 1, 8, 8], y_test [200])."""
    (x, y), (xt, yt) = _task(1, 1000, CHECK_POINTS, seed=0)
    torch.manual_seed(0)
    mlp = _train(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, K)), x, y)
    assert (mlp(xt).argmax(1) == yt).float().mean() > 0.95  # the task is learnt
    return mlp, xt, yt


@pytest.fixture(scope="module")
def colour():
    """(trained conv net with batch norm and dropout, x_test [200, 3, 8, 8], y_test [200])."""
    (x, y), (xt, yt) = _task(3, 1000, CHECK_POINTS, seed=1)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(8 * 4 * 4, K),
    )
    net = _train(net, x, y, steps=60)
    assert (net(xt).argmax(1) == yt).float().mean() > 0.95
    return net, xt, yt


def _run(model, x, y, entries=(), *, norm="linf", eps=None, seed=0, batch_size=128):
    return run_checks(model, x, y, list(entries), eps=EPS[norm] if eps is None else eps, norm=norm, seed=seed,
                      device="cpu", batch_size=batch_size, quiet=True)


def _by_name(verdicts) -> dict:
    return {v["name"]: v for v in verdicts}


# ---------------------------------------------------------------- test models


class Quantised(nn.Module):
    """Rounds the input to 5 grey levels first: torch.round has an exactly zero derivative."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(torch.round(x * 4) / 4)


class SaturatedSoftmax(nn.Module):
    """Returns softmax(1000 * logits): one-hot in fp32 on almost every point, so gradients vanish."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return torch.softmax(1000 * self.body(x), dim=1)


class Noisy(nn.Module):
    """Adds fresh Gaussian noise to the input at every forward pass (a randomised defence)."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


class Cancelling(nn.Module):
    """The MLP with its first layer written as ``x @ (A - B)^T``, A = 1 + W*s, B = 1.

    In fp32 it computes the same logits as the MLP (up to rounding). Under bf16 autocast A
    and B round to the same matrix (|W*s| < 2^-9, half of bf16's resolution at 1), so the
    two branches' input gradients cancel exactly: every input gradient is zero although the
    fp32 gradients are fine. It stands for any layer that relies on differences below the
    low-precision resolution.
    """

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        weight = mlp[1].weight.detach()
        self.scale = 2.0**-9 / weight.abs().max().item()
        self.register_buffer("a", 1 + weight * self.scale)
        self.register_buffer("b", torch.ones_like(weight))

    def forward(self, x):
        h = x.flatten(1)
        z = (F.linear(h, self.a) - F.linear(h, self.b)) / self.scale + self.mlp[1].bias
        return self.mlp[3](self.mlp[2](z))


class FailsUnderAutocast(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("this model does not support autocast")
        return self.body(x)


class BatchSpy(nn.Module):
    """Records the largest batch it is called with."""

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.largest = 0

    def forward(self, x):
        self.largest = max(self.largest, x.shape[0])
        return self.body(x)


# ---------------------------------------------------------------------- tests


def test_checks_are_the_documented_eight():
    assert NAMES == EXPECTED_NAMES


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_trained_mlp_passes_every_check(gray, norm):
    mlp, x, y = gray
    verdicts = _run(mlp, x, y, norm=norm)
    assert [v["name"] for v in verdicts] == EXPECTED_NAMES
    assert all(v["ok"] for v in verdicts), format_verdicts(verdicts)
    by = _by_name(verdicts)
    assert by["unbounded"]["value"] == 0.0
    assert by["zero_gradients"]["value"] == 0.0
    assert by["autocast_agreement"]["value"] > 0.9
    assert by["loss_rises"]["value"] > 0
    assert by["deterministic"]["value"] == 0.0


def test_attack_checks_measure_a_non_trivial_robust_accuracy(gray):
    # more_iterations must compare accuracies strictly between 0 and 1, else it proves nothing.
    mlp, x, y = gray
    from repulsor.attacks import pgd

    x_adv = pgd(mlp, x, y, eps=EPS["linf"], alpha=EPS["linf"] / 4, steps=10, loss="cw")
    accuracy = (mlp(x_adv).argmax(1) == y).float().mean().item()
    assert 0.1 < accuracy < 0.9


def test_trained_convnet_passes_every_check_and_is_left_as_it_was(colour):
    net, x, y = colour
    net.train()  # a caller in train mode must get it back in train mode
    for p in net.parameters():
        p.requires_grad_(True)
        p.grad = None  # left by training; the checks must not create one
    before = {k: v.clone() for k, v in net.state_dict().items()}  # includes batch-norm statistics
    verdicts = _run(net, x, y, norm="linf", eps=0.1, batch_size=64)
    assert all(v["ok"] for v in verdicts), format_verdicts(verdicts)
    after = net.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(m.training for m in net.modules())
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    net.eval()


def test_verdicts_have_the_documented_keys_and_types(gray):
    mlp, x, y = gray
    weights = [p.clone() for p in mlp.parameters()]
    verdicts = _run(mlp, x, y)
    assert len(verdicts) == len(CHECKS)
    for v in verdicts:
        assert set(v) == {"name", "ok", "message", "value"}
        assert isinstance(v["name"], str) and isinstance(v["ok"], bool) and isinstance(v["message"], str)
        assert v["value"] is None or (isinstance(v["value"], float) and math.isfinite(v["value"]))
        assert "\n" not in v["message"] and v["message"].startswith(v["name"].replace("_", " "))
    assert all(torch.equal(a, b) for a, b in zip(weights, mlp.parameters()))
    assert not mlp.training


def test_checks_are_seeded_and_print_nothing(gray, capsys):
    mlp, x, y = gray
    assert _run(mlp, x, y, seed=3) == _run(mlp, x, y, seed=3)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_only_the_first_check_points_are_used(gray):
    mlp, x, y = gray
    spy = BatchSpy(mlp)
    xx, yy = torch.cat([x, x[:50]]), torch.cat([y, y[:50]])
    verdicts = _run(spy, xx, yy, batch_size=10_000)
    assert spy.largest == CHECK_POINTS
    assert f"of {CHECK_POINTS} points" in _by_name(verdicts)["unbounded"]["message"]


def test_hard_quantisation_is_caught(gray):
    mlp, x, y = gray
    by = _by_name(_run(Quantised(mlp), x, y))
    assert not by["zero_gradients"]["ok"]
    assert by["zero_gradients"]["value"] == 1.0  # every gradient is exactly zero
    assert "100.0%" in by["zero_gradients"]["message"]
    assert not by["unbounded"]["ok"] or not by["loss_rises"]["ok"]
    # Zero gradients never move PGD: the unbounded attack keeps the clean accuracy.
    assert by["unbounded"]["value"] > 0.9
    assert not by["loss_rises"]["ok"] and by["loss_rises"]["value"] == 0.0


def test_saturated_softmax_is_caught(gray):
    mlp, x, y = gray
    by = _by_name(_run(SaturatedSoftmax(mlp), x, y))
    assert not by["zero_gradients"]["ok"] or not by["loss_rises"]["ok"]
    assert by["zero_gradients"]["value"] > 0.5


def test_randomised_model_is_caught(gray):
    mlp, x, y = gray
    by = _by_name(_run(Noisy(mlp), x, y))
    assert not by["deterministic"]["ok"]
    assert by["deterministic"]["value"] > 1e-3
    assert by["zero_gradients"]["ok"]  # its gradients are fine; only determinism fails


def test_gradients_that_vanish_under_autocast_are_caught(gray):
    mlp, x, y = gray
    model = Cancelling(mlp)
    with torch.no_grad():  # the construction computes the MLP's function in fp32
        assert torch.equal(model(x).argmax(1), mlp(x).argmax(1))
    by = _by_name(_run(model, x, y))
    assert not by["autocast_agreement"]["ok"]
    assert "100.0% vs 0.0%" in by["autocast_agreement"]["message"]
    assert by["zero_gradients"]["ok"]  # fp32 gradients are fine
    assert by["unbounded"]["ok"]


@pytest.mark.parametrize("robust_fewer, robust_more, ok", [(80, 80, True), (80, 82, True), (80, 83, False),
                                                           (80, 40, True)])
def test_more_iterations_warns_when_the_stronger_attack_leaves_more_points(monkeypatch, robust_fewer,
                                                                           robust_more, ok):
    # No honest model makes PGD-100 weaker than PGD-10, so the attacks' outcomes are faked:
    # 200 points, tolerance 1% = 2 points.
    def fake(inp, x, y, *, tag, **settings):
        robust = {"pgd-10": robust_fewer, "pgd-100x3": robust_more}[tag]
        assert settings["loss"] == "cw" and settings["steps"] == (10 if tag == "pgd-10" else 100)
        return torch.arange(len(y)) < robust

    monkeypatch.setattr(sanity, "still_correct", fake)
    inp = sanity.CheckInput(model=None, x=torch.zeros(200, 1, 8, 8), y=torch.zeros(200, dtype=torch.long),
                            entries=[], eps=0.1, norm="linf", seed=0, device=torch.device("cpu"), batch_size=64)
    verdict = sanity.check_more_iterations(inp)
    assert verdict["ok"] is ok
    assert verdict["value"] == pytest.approx((robust_more - robust_fewer) / 200)
    assert f"{robust_more / 2:.1f}%" in verdict["message"] and f"{robust_fewer / 2:.1f}%" in verdict["message"]


def test_gradient_agreement_on_synthetic_gradients():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(10, 64, generator=gen)
    assert gradient_agreement(g, g) == pytest.approx((1.0, 0.0, 0.0))
    assert gradient_agreement(g, -g)[0] == pytest.approx(-1.0)
    assert gradient_agreement(g, 3 * g + 1e-3 * torch.randn(10, 64, generator=gen))[0] > 0.99
    # Low precision loses 6 gradients of 10: median cosine 0, 60% zero vs 0%.
    low = g.clone()
    low[:6] = 0
    cosine, zero_ref, zero_low = gradient_agreement(g, low)
    assert cosine == 0.0 and zero_ref == 0.0 and zero_low == pytest.approx(0.6)
    # Tiny gradients still count: a sign step can use them.
    assert gradient_agreement(g * 1e-30, g * 1e-30) == pytest.approx((1.0, 0.0, 0.0))
    # Both zero: they agree, and the zero fractions carry the information.
    zeros = torch.zeros(4, 64)
    assert gradient_agreement(zeros, zeros) == (1.0, 1.0, 1.0)
    nan = g.clone()
    nan[0, 0] = float("nan")
    assert gradient_agreement(g, nan)[2] == pytest.approx(0.1)


def _entry(name, attack, accuracy, n=100):
    return {"name": name, "attack": attack, "loss": "", "norm": "linf", "eps": 8 / 255, "steps": 100,
            "restarts": 1, "n": n, "n_attacked": 0, "accuracy": accuracy, "seconds": 1.0}


def _black_box(entries):
    return sanity.check_black_box_vs_white_box(
        sanity.CheckInput(model=None, x=torch.zeros(0, 1, 8, 8), y=torch.zeros(0, dtype=torch.long),
                          entries=entries, eps=8 / 255, norm="linf", seed=0, device=torch.device("cpu"),
                          batch_size=1))


def test_black_box_beating_white_box_warns():
    entries = [_entry("apgd-ce", "apgd", 0.50), _entry("apgd-t", "apgd_t", 0.45), _entry("fab-t", "fab_t", 0.45),
               _entry("square", "square", 0.30)]
    verdict = _black_box(entries)
    assert not verdict["ok"]
    assert verdict["value"] == pytest.approx(0.15)
    assert "15.0%" in verdict["message"] and "1.0%" in verdict["message"]


@pytest.mark.parametrize("square_accuracy", [0.45, 0.44])  # nothing, or one point of 100 (= 1%)
def test_black_box_within_tolerance_is_ok(square_accuracy):
    entries = [_entry("apgd-ce", "apgd", 0.50), _entry("apgd-t", "apgd_t", 0.45),
               _entry("square", "square", square_accuracy), _entry("apgd-dlr", "apgd", square_accuracy - 0.02)]
    verdict = _black_box(entries)
    assert verdict["ok"]
    assert verdict["value"] == pytest.approx(0.45 - square_accuracy)


def test_black_box_compares_only_with_the_attack_just_before_square():
    # A later white-box attack finding more does not excuse square's drop.
    entries = [_entry("pgd", "pgd", 0.60), _entry("square", "square", 0.40), _entry("pgd-cw", "pgd", 0.10)]
    assert not _black_box(entries)["ok"]


@pytest.mark.parametrize("entries", [
    [],
    [_entry("pgd-20", "pgd", 0.4)],
    [_entry("square", "square", 0.2), _entry("pgd-20", "pgd", 0.1)],  # no white-box attack before square
])
def test_black_box_without_a_comparison_is_skipped(entries):
    verdict = _black_box(entries)
    assert verdict["ok"] and verdict["value"] is None and "skipped" in verdict["message"]


def test_a_check_that_crashes_is_reported_not_raised(gray):
    mlp, x, y = gray
    by = _by_name(_run(FailsUnderAutocast(mlp), x, y))
    assert not by["autocast_agreement"]["ok"]
    assert "could not run" in by["autocast_agreement"]["message"]
    assert "does not support autocast" in by["autocast_agreement"]["message"]
    assert by["zero_gradients"]["ok"] and by["unbounded"]["ok"]


def test_eps_zero_skips_the_attack_checks_at_eps(gray):
    mlp, x, y = gray
    verdicts = _run(mlp, x, y, eps=0.0)
    by = _by_name(verdicts)
    assert all(v["ok"] for v in verdicts), format_verdicts(verdicts)
    assert by["more_iterations"]["value"] is None and by["loss_rises"]["value"] is None
    assert by["unbounded"]["value"] == 0.0  # the unbounded budget does not depend on eps


def test_format_verdicts():
    verdicts = [{"name": "a", "ok": True, "message": "a: fine", "value": 0.0},
                {"name": "b", "ok": False, "message": "b: bad", "value": 1.0}]
    assert format_verdicts(verdicts) == ["ok   a: fine", "WARN b: bad"]


def test_evaluate_reports_the_checks(gray):
    # The caller's interface: evaluate(..., checks=True) stores the verdicts under "sanity".
    from repulsor.evaluation.cascade import evaluate

    mlp, x, y = gray
    result = evaluate(mlp, x[:64], y[:64], suite="quick", eps=EPS["linf"], checks=True, batch_size=64)
    assert [v["name"] for v in result["sanity"]] == EXPECTED_NAMES
    assert all(v["ok"] for v in result["sanity"]), format_verdicts(result["sanity"])
