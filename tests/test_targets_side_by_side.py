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


def fooled(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


EPS = {"linf": 0.04, "l2": 0.4, "l1": 1.5}
ATTACKS = {
    "apgd_t": lambda m, x, y, norm, rows: apgd_targeted(m, x, y, eps=EPS[norm], norm=norm, steps=20, n_targets=5,
                                                       restarts=2, rows=rows),
    "fab_t": lambda m, x, y, norm, rows: fab_targeted(m, x, y, eps=EPS[norm], norm=norm, steps=20, n_targets=5,
                                                     rows=rows),
}


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_side_by_side_breaks_the_same_points_as_one_target_after_another(task, name, norm):
    model, x, y = task
    together = ATTACKS[name](model, x, y, norm, rows=5 * len(y))  # all five targets in one pass
    apart = ATTACKS[name](model, x, y, norm, rows=1)  # one target per pass, as before rows existed
    broken_together, broken_apart = fooled(model, together, y), fooled(model, apart, y)
    correct = ~fooled(model, x, y)
    # The radius leaves both kinds of points, so the comparison says something.
    assert 0 < (broken_apart & correct).sum() < correct.sum()
    assert torch.equal(broken_together, broken_apart)
    if name == "apgd_t":
        # A point never broken keeps its highest-loss point over the targets: the same runs.
        robust = ~broken_apart
        assert torch.allclose(together[robust], apart[robust], atol=1e-9)


def test_chunks_hold_at_most_rows():
    assert context.target_chunk(0, 9, 81, 256) == range(0, 3)  # 3 x 81 rows fit in 256
    assert context.target_chunk(3, 9, 20, 256) == range(3, 9)  # never past the last target
    assert context.target_chunk(8, 9, 5000, 256) == range(8, 9)  # at least one target
    assert context.target_chunk(0, 9, 256, 256) == range(0, 1)  # a full batch: one target, as before


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_rows_bound_every_pass_and_fill_it(task, name):
    """What ``rows`` is for: the targets of the correctly classified points fill the passes up to
    ``rows`` and never beyond (the default, the rows of x, is the memory the caller allowed)."""
    model, x, y = task
    correct = int((~fooled(model, x, y)).sum())
    for rows, widest in ((5 * correct, 5 * correct), (2 * correct, 2 * correct), (None, len(y))):
        sizes = []

        class Counting(nn.Module):
            def forward(self, inputs):
                sizes.append(inputs.shape[0])
                return model(inputs)

        ATTACKS[name](Counting(), x, y, "linf", rows=rows)
        assert max(sizes) == widest


def test_the_standard_cascade_fills_its_batches_and_never_exceeds_them(task):
    """The cascade passes its batch size as ``rows``: APGD-T's passes over the survivors of
    APGD-CE hold all five targets at once when the batch has room, and never more rows."""
    import copy

    import repulsor

    model, x, y = task
    single = copy.deepcopy(model).float()
    sizes = []

    class Counting(nn.Module):
        def forward(self, inputs):
            sizes.append(inputs.shape[0])
            return single(inputs)

    result = repulsor.evaluate(Counting(), x.float(), y, suite="standard", eps=0.04, batch_size=5 * len(y))
    survivors = next(a for a in result["attacks"] if a["name"] == "apgd-t")["n_attacked"]
    assert survivors * 5 > len(y)  # larger than any pass over the points themselves
    assert max(sizes) == 5 * survivors <= 5 * len(y)
