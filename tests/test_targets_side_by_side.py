"""APGD-T and FAB-T run their targets side by side (one row per target and example): the same
attacks as one target after the other, in fewer and larger passes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repulsor.attacks import context
from repulsor.attacks.apgd import apgd_targeted
from repulsor.attacks.fab import fab_targeted

K = 6


@pytest.fixture(scope="module")
def task():
    """A float64 MLP on a 6-class 1x8x8 task, trained for a fraction of a second, and 40 test
    points at a radius that breaks some of them and leaves others robust."""
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(K, 1, 8, 8, generator=g, dtype=torch.float64) * 0.5 + 0.25

    def sample(n):
        y = torch.randint(0, K, (n,), generator=g)
        return (templates[y] + 0.08 * torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)).clamp(0, 1), y

    x_train, y_train = sample(1024)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, K)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    model.eval().requires_grad_(False)
    x, y = sample(40)
    return model, x, y


def one_target_at_a_time(monkeypatch):
    """``target_chunk`` as before the targets ran side by side: one target per run."""
    monkeypatch.setattr(context, "TARGET_ROWS", 1)


def fooled(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


ATTACKS = {
    "apgd_t": lambda m, x, y, norm: apgd_targeted(m, x, y, eps={"linf": 0.04, "l2": 0.4, "l1": 1.5}[norm],
                                                 norm=norm, steps=20, n_targets=5, restarts=2),
    "fab_t": lambda m, x, y, norm: fab_targeted(m, x, y, eps={"linf": 0.04, "l2": 0.4, "l1": 1.5}[norm],
                                               norm=norm, steps=20, n_targets=5),
}


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_side_by_side_breaks_the_same_points_as_one_target_after_another(task, monkeypatch, name, norm):
    model, x, y = task
    together = ATTACKS[name](model, x, y, norm)
    one_target_at_a_time(monkeypatch)
    apart = ATTACKS[name](model, x, y, norm)
    broken_together, broken_apart = fooled(model, together, y), fooled(model, apart, y)
    correct = ~fooled(model, x, y)
    # The radius leaves both kinds of points, so the comparison says something.
    assert 0 < (broken_apart & correct).sum() < correct.sum()
    assert torch.equal(broken_together, broken_apart)
    if name == "apgd_t":
        # A point never broken keeps its highest-loss point over the targets: the same runs.
        robust = ~broken_apart
        assert torch.allclose(together[robust], apart[robust], atol=1e-9)


def test_chunks_hold_at_most_target_rows(monkeypatch):
    assert context.target_chunk(0, 9, 256) == range(0, 9)
    assert context.target_chunk(0, 9, 1000) == range(0, 2)  # 2304 rows hold two targets of 1000
    assert context.target_chunk(8, 9, 5000) == range(8, 9)  # at least one target, never past the last
    monkeypatch.setattr(context, "TARGET_ROWS", 1)
    assert context.target_chunk(3, 9, 40) == range(3, 4)


def test_side_by_side_rows_pass_through_the_model_together(task, monkeypatch):
    """What the change is for: five targets of the robust points take one pass per step, not five."""
    model, x, y = task
    sizes = []

    class Counting(nn.Module):
        def forward(self, inputs):
            sizes.append(inputs.shape[0])
            return model(inputs)

    fab_targeted(Counting(), x, y, eps=0.04, steps=3, n_targets=5)
    assert max(sizes) == 5 * int((~fooled(model, x, y)).sum())
    sizes.clear()
    one_target_at_a_time(monkeypatch)
    fab_targeted(Counting(), x, y, eps=0.04, steps=3, n_targets=5)
    assert max(sizes) == int((~fooled(model, x, y)).sum())
