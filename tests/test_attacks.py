"""Properties every white-box attack must have, on tiny models and synthetic 1x8x8 images.

The task: k = 4 classes, each a fixed random template plus noise, so a small MLP learns it
to 100% in well under a second. Attacks then run on 64 test points.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repulsor.attacks import (
    ATTACKS,
    LOSSES,
    apgd,
    apgd_targeted,
    evaluating,
    fgsm,
    geometry,
    get_attack,
    get_loss,
    pgd,
)
from repulsor.attacks.apgd import checkpoints, halve_at_checkpoint
from repulsor.errors import UserError

K = 4
EPS_LARGE = {"linf": 0.3, "l2": 3.0, "l1": 16.0}  # far beyond the distance between classes
EPS_MEDIUM = {"linf": 0.05, "l2": 0.5, "l1": 2.0}  # leaves a fraction of points robust
NORMS = ["linf", "l2", "l1"]


def make_data(n: int, seed: int, k: int = K):
    """Images [n, 1, 8, 8] in [0, 1]: a class template plus noise; a few saturated to 0/1."""
    templates = torch.rand(k, 1, 8, 8, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = (0.5 + 0.3 * (templates[y] - 0.5) + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    x[: n // 8] = (x[: n // 8] - 0.5).sign().clamp(min=0)  # images on the corners of the box
    return x, y


def train(model: nn.Module, k: int = K, steps: int = 150) -> nn.Module:
    """A fraction of a second of full-batch Adam: cross-entropy, or for a prototype model
    squared distance to the class prototype (cross-entropy trains L-inf scores badly)."""
    x, y = make_data(512, seed=1, k=k)
    torch.manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        if hasattr(model, "embed"):
            loss = (model.embed(x) - model.prototypes[y]).pow(2).sum(1).mean()
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimiser.step()
    model.eval()
    return model


def mlp(k: int = K) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, k))


@pytest.fixture(scope="module")
def model():
    return train(mlp())


@pytest.fixture(scope="module")
def batch():
    return make_data(64, seed=2)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def run(name, model, x, y, *, norm, eps, seed=0, **extra):
    """Each attack with small settings that keep the test fast."""
    if name == "fgsm":
        return fgsm(model, x, y, eps=eps, norm=norm, seed=seed, **extra)
    if name == "pgd":
        return pgd(model, x, y, eps=eps, alpha=eps / 4, steps=10, norm=norm, seed=seed, **extra)
    if name == "apgd":
        return apgd(model, x, y, eps=eps, norm=norm, steps=20, seed=seed, **extra)
    return apgd_targeted(model, x, y, eps=eps, norm=norm, steps=20, n_targets=3, seed=seed, **extra)


ALL = ["fgsm", "pgd", "apgd", "apgd_t"]


# ------------------------------------------------------------ the threat model


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ALL)
def test_perturbation_stays_in_ball_and_box(name, norm, model, batch):
    x, y = batch
    eps = EPS_MEDIUM[norm]
    with evaluating(model):
        x_adv = run(name, model, x, y, norm=norm, eps=eps)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert (geometry(norm).norm(x_adv - x) <= eps + 1e-5).all()  # float32 rounding of x + d - x, summed over 64 pixels in L1
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)  # it did something


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("attack,loss", [("pgd_full", "ce"), ("apgd", "ce"), ("apgd", "cw"), ("apgd", "dlr")])
def test_loss_not_below_clean_loss(attack, loss, norm, model, batch):
    x, y = batch
    eps = EPS_MEDIUM[norm]
    with evaluating(model):
        if attack == "pgd_full":
            x_adv = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=10, norm=norm, loss=loss, early_stop=False)
        else:
            x_adv = apgd(model, x, y, eps=eps, norm=norm, loss=loss, steps=20)
        with torch.no_grad():
            clean, _ = get_loss(loss)(model, x, y)
            adv, _ = get_loss(loss)(model, x_adv, y)
    assert (adv >= clean - 1e-6).all()
    assert (adv > clean).float().mean() > 0.9


# ----------------------------------------------------- the model is left alone


class TinyCNN(nn.Module):
    """A model with batch norm and dropout, whose mode changes its output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(4 * 8 * 8, K)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).flatten(1)))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ALL)
def test_attack_leaves_model_untouched(name, mode, batch):
    torch.manual_seed(0)
    net = TinyCNN().train(mode == "train")
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    x, y = batch
    x_adv = run(name, net, x[:16], y[:16], norm="linf", eps=0.05)
    assert x_adv.shape == (16, 1, 8, 8)
    assert all(m.training == (mode == "train") for m in net.modules())
    for n, p in net.named_parameters():
        assert torch.equal(p, params[n]), n
        assert p.requires_grad and p.grad is None, n
    if mode == "eval":  # in train mode batch norm updates its statistics by design
        assert all(torch.equal(b, buffers[n]) for n, b in net.named_buffers())

    # The intended use: the evaluating context, from train mode, restores everything.
    net.train()
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    with evaluating(net):
        run(name, net, x[:16], y[:16], norm="linf", eps=0.05)
    assert all(m.training for m in net.modules())
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in net.named_buffers())


def test_evaluating_restores_mode_and_flags_even_on_exception():
    net = TinyCNN().train()
    net.bn.eval()  # a module kept in eval mode on purpose must stay so
    net.conv.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"):
        with evaluating(net) as inside:
            assert inside is net
            assert not any(m.training for m in net.modules())
            assert not any(p.requires_grad for p in net.parameters())
            raise RuntimeError("boom")
    assert net.training and net.fc.training and net.drop.training and not net.bn.training
    assert not net.conv.weight.requires_grad
    assert all(p.requires_grad for n, p in net.named_parameters() if n != "conv.weight")


def test_attacks_work_under_no_grad(model, batch):
    x, y = batch
    with torch.no_grad():
        x_adv = pgd(model, x, y, eps=0.3, alpha=0.05, steps=5)
    assert accuracy(model, x_adv, y) < 0.1


# --------------------------------------------------------------- determinism


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ALL)
def test_seed_makes_attack_reproducible(name, norm, model, batch):
    x, y = batch
    eps = EPS_MEDIUM[norm]
    extra = {"random_start": True} if name == "fgsm" else {}
    with evaluating(model):
        torch.manual_seed(1)
        rng_before = torch.get_rng_state()
        first = run(name, model, x, y, norm=norm, eps=eps, seed=3, **extra)
        assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is not used
        torch.manual_seed(2)
        again = run(name, model, x, y, norm=norm, eps=eps, seed=3, **extra)
        other = run(name, model, x, y, norm=norm, eps=eps, seed=4, **extra)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# ------------------------------------------------------------------ strength


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ["pgd", "apgd", "apgd_t"])
def test_large_eps_breaks_undefended_model(name, norm, model, batch):
    x, y = batch
    assert accuracy(model, x, y) >= 0.95
    with evaluating(model):
        x_adv = run(name, model, x, y, norm=norm, eps=EPS_LARGE[norm])
    assert accuracy(model, x_adv, y) <= 0.05


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ["pgd", "apgd", "apgd_t"])
def test_more_restarts_never_raise_robust_accuracy(name, norm, model, batch):
    x, y = batch
    eps = EPS_MEDIUM[norm]
    with evaluating(model), torch.no_grad():
        one = model(run(name, model, x, y, norm=norm, eps=eps, restarts=1)).argmax(1) != y
        three = model(run(name, model, x, y, norm=norm, eps=eps, restarts=3)).argmax(1) != y
    assert 0 < one.sum() < len(y)  # the test is only meaningful when some points resist
    assert (three | ~one).all()  # every point fooled with one restart is fooled with three


def test_more_targets_never_raise_robust_accuracy(model, batch):
    x, y = batch
    with evaluating(model), torch.no_grad():
        fooled = [
            model(apgd_targeted(model, x, y, eps=0.05, steps=10, n_targets=n)).argmax(1) != y for n in (1, 3)
        ]
    assert (fooled[1] | ~fooled[0]).all()


def test_pgd_restart_keeps_highest_loss_without_early_stop(model, batch):
    x, y = batch
    with evaluating(model):
        losses = []
        for restarts in (1, 4):
            x_adv = pgd(model, x, y, eps=0.05, alpha=0.0125, steps=3, restarts=restarts, early_stop=False, loss="cw")
            losses.append(LOSSES["cw"](model, x_adv, y)[0].detach())
    assert (losses[1] >= losses[0] - 1e-6).all()


def test_early_stop_is_as_strong_and_cheaper(model, batch):
    x, y = batch
    seen = []
    hook = model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    try:
        with evaluating(model):
            costs, robust = {}, {}
            for early_stop in (True, False):
                seen.clear()
                x_adv = pgd(model, x, y, eps=0.05, alpha=0.0125, steps=10, early_stop=early_stop)
                costs[early_stop] = sum(seen)
                robust[early_stop] = accuracy(model, x_adv, y)
    finally:
        hook.remove()
    # steps forward passes of every point: a single run does not score its final iterate.
    assert costs[False] == len(y) * 10
    assert costs[True] < costs[False]
    assert robust[True] <= robust[False] + 1 / len(y)


def test_pgd_loss_trace_rises(model, batch):
    x, y = batch
    with evaluating(model):
        x_adv, trace = pgd(model, x, y, eps=0.05, alpha=0.01, steps=8, early_stop=False, return_trace=True)
        _, apgd_trace = apgd(model, x, y, eps=0.05, steps=8, return_trace=True)
        final, _ = LOSSES["ce"](model, x_adv, y)
    assert trace.shape == (9,) and apgd_trace.shape == (9,)
    assert trace[-1] > trace[0] and apgd_trace[-1] > apgd_trace[0]
    assert torch.isclose(trace[-1], final.mean())


def test_targeted_pgd_reaches_its_targets(model, batch):
    x, y = batch
    targets = (y + 1) % K
    with evaluating(model):
        x_adv = pgd(model, x, y, eps=0.5, alpha=0.05, steps=20, loss="ce_targeted", targets=targets, early_stop=False)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == targets).float().mean() >= 0.95


def test_apgd_targeted_returns_misclassified_points_unchanged(batch):
    x, y = batch
    untrained = mlp()
    with torch.no_grad():
        wrong = untrained(x).argmax(1) != y
    assert 0 < wrong.sum() < len(y)
    x_adv = apgd_targeted(untrained, x, y, eps=0.05, steps=5, n_targets=2)
    assert torch.equal(x_adv[wrong], x[wrong])
    assert not torch.equal(x_adv[~wrong], x[~wrong])


def test_apgd_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (the next, 1.05, is past the end).
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]
    assert checkpoints(0) == []


def test_apgd_checkpoint_conditions():
    # Four examples, 10 steps since the last checkpoint, rho = 0.75:
    # 0 progressing; 1 too few increases (condition 1); 2 best loss flat and step not
    # halved last time (condition 2); 3 flat but halved last time (kept).
    n = 4
    state = {
        "increases": torch.tensor([9.0, 5.0, 9.0, 9.0]),
        "loss_best": torch.tensor([2.0, 2.0, 1.0, 1.0]),
        "loss_best_at_mark": torch.tensor([1.0, 1.0, 1.0, 1.0]),
        "halved_at_mark": torch.tensor([False, False, False, True]),
        "eta": torch.full((n,), 0.1),
        "x_cur": torch.zeros(n, 1, 2, 2), "x_prev": torch.zeros(n, 1, 2, 2), "x_best": torch.ones(n, 1, 2, 2),
        "grad_cur": torch.zeros(n, 1, 2, 2), "grad_best": torch.ones(n, 1, 2, 2),
        "loss_cur": torch.zeros(n),
    }
    halve_at_checkpoint(state, rho=0.75, span=10)
    halved = torch.tensor([False, True, True, False])
    torch.testing.assert_close(state["eta"], torch.where(halved, 0.05, 0.1))
    assert torch.equal(state["halved_at_mark"], halved)
    assert torch.equal(state["x_cur"].flatten(1).mean(1) == 1, halved)  # restarted at the best point
    assert torch.equal(state["x_prev"].flatten(1).mean(1) == 1, halved)  # without momentum
    torch.testing.assert_close(state["loss_best_at_mark"], state["loss_best"])
    assert (state["increases"] == 0).all()


# -------------------------------------------------------------------- losses


def test_score_losses_match_their_definitions():
    scores = torch.tensor([[3.0, 1.0, 0.5, -1.0], [0.0, 2.0, 1.0, 4.0]])
    y = torch.tensor([0, 1])
    target = torch.tensor([2, 3])
    fixed = lambda x: scores  # noqa: E731 - a "model" returning fixed scores
    x = torch.zeros(2, 1)
    torch.testing.assert_close(LOSSES["ce"](fixed, x, y)[0], F.cross_entropy(scores, y, reduction="none"))
    torch.testing.assert_close(LOSSES["cw"](fixed, x, y)[0], torch.tensor([1.0 - 3.0, 4.0 - 2.0]))
    torch.testing.assert_close(LOSSES["dlr"](fixed, x, y)[0], torch.tensor([-(3.0 - 1.0) / (3.0 - 0.5), -(2.0 - 4.0) / (4.0 - 1.0)]))
    torch.testing.assert_close(
        LOSSES["dlr_targeted"](fixed, x, y, target)[0],
        torch.tensor([-(3.0 - 0.5) / (3.0 + 0.25), -(2.0 - 4.0) / (4.0 - 0.5)]),
    )
    torch.testing.assert_close(LOSSES["ce_targeted"](fixed, x, y, target)[0], -F.cross_entropy(scores, target, reduction="none"))
    # DLR is invariant to shifting and positive rescaling of the scores.
    shifted = lambda x: 7 * scores - 3  # noqa: E731
    torch.testing.assert_close(LOSSES["dlr"](shifted, x, y)[0], LOSSES["dlr"](fixed, x, y)[0])


def test_losses_are_float32_for_half_precision_scores():
    scores = torch.tensor([[3.0, 1.0, 0.5, -1.0]], dtype=torch.float16)
    for name in ("ce", "cw", "dlr"):
        loss, out = LOSSES[name](lambda x: scores, torch.zeros(1, 1), torch.tensor([0]))
        assert loss.dtype == torch.float32 and out.dtype == torch.float32


def test_dlr_needs_enough_classes(batch):
    x, y = batch
    two, three = mlp(2), mlp(3)
    with pytest.raises(UserError, match=r"DLR loss needs at least 3 classes \(got 2\); use --loss cw"):
        apgd(two, x, y % 2, eps=0.05, loss="dlr", steps=2)
    with pytest.raises(UserError, match=r"targeted DLR loss needs at least 4 classes \(got 3\)"):
        apgd_targeted(three, x, y % 3, eps=0.05, steps=2)
    with pytest.raises(UserError, match="needs at least 4 classes"):
        LOSSES["dlr_targeted"](three, x, y % 3, (y + 1) % 3)
    apgd_targeted(three, x, y % 3, eps=0.05, steps=2, loss="ce_targeted")  # works with k = 3


# ---------------------------------------------------------- prototype losses


try:
    from repulsor.models.heads import PrototypeClassifier
except ImportError:  # the models package is written separately; a stand-in with its interface

    class PrototypeClassifier(nn.Module):
        def __init__(self, network, prototypes, distance):
            super().__init__()
            self.network, self.distance = network, distance
            self.register_buffer("prototypes", prototypes)

        def embed(self, x):
            return self.network(x)

        def scores(self, z):
            p = self.prototypes
            if self.distance == "cosine":
                return F.normalize(z, dim=1) @ F.normalize(p, dim=1).T
            if self.distance == "linf":
                return -(z[:, None] - p[None]).abs().amax(2)
            squared = (z[:, None] - p[None]).pow(2).sum(2)
            return -squared.sqrt() if self.distance == "l2" else -squared

        def forward(self, x):
            return self.scores(self.embed(x))


def proto_model(distance: str) -> nn.Module:
    torch.manual_seed(0)
    prototypes = torch.eye(K, 6) * 2 - 1 if distance != "cosine" else torch.eye(K, 6)
    network = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 6))
    return train(PrototypeClassifier(network, prototypes, distance), steps=100)


@pytest.mark.parametrize("distance", ["cosine", "l2", "linf", "sqeuclid"])
def test_proto_margin_attacks_the_decision_rule(distance, batch):
    x, y = batch
    net = proto_model(distance)
    with torch.no_grad():
        margin, scores = LOSSES["proto_margin"](net, x, y)
        torch.testing.assert_close(scores, net(x).float())
        wrong = scores.argmax(1) != y
        # A positive margin means a wrong prototype is nearer: exactly a misclassification.
        assert torch.equal(margin > 0, wrong)
        d_linf, _ = LOSSES["proto_linf"](net, x, y)
        torch.testing.assert_close(d_linf, (net.embed(x) - net.prototypes[y]).abs().amax(1))
        targeted, _ = LOSSES["proto_margin"](net, x, y, (y + 1) % K)
        assert targeted.shape == (len(y),)
    assert accuracy(net, x, y) >= 0.9
    with evaluating(net):
        # Restarts: under the L-inf distance a far-out embedding can sit on a tie
        # d(z, p_y) = d(z, p_j) with zero gradient, where one random start gets stuck.
        x_adv = pgd(net, x, y, eps=0.5, alpha=0.05, steps=20, loss="proto_margin", restarts=3)
        x_linf = pgd(net, x, y, eps=0.5, alpha=0.05, steps=20, loss="proto_linf", restarts=3)
    assert accuracy(net, x_adv, y) <= 0.05
    assert accuracy(net, x_adv, y) <= accuracy(net, x_linf, y) < accuracy(net, x, y)


def test_proto_losses_need_a_prototype_model(model, batch):
    x, y = batch
    for name in ("proto_margin", "proto_linf"):
        with pytest.raises(UserError, match=f"loss '{name}' needs a prototype model"):
            pgd(model, x, y, eps=0.05, alpha=0.01, steps=1, loss=name)


# ------------------------------------------------------ user errors, registry


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"eps": -0.1}, "eps must be >= 0"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"steps": -1}, "steps must be >= 0"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"restarts": 0}, "restarts must be >= 1"),
        ({"norm": "l3"}, "unknown norm 'l3'"),
        ({"loss": "nope"}, "unknown attack loss 'nope': choose one of ce, "),
        ({"restarts": 2, "random_start": False}, "set random_start=True"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_bad_settings_raise_one_line_user_errors(settings, message, model, batch):
    x, y = batch
    kwargs = {"eps": 0.05, "alpha": 0.01, "steps": 2, **settings}
    with pytest.raises(UserError, match=message) as error:
        pgd(model, x, y, **kwargs)
    assert "\n" not in str(error.value)


def test_bad_inputs_raise_user_errors(model, batch):
    x, y = batch
    with pytest.raises(UserError, match=r"inputs must be images in \[0, 1\]; got min .* normalisation belongs inside the model"):
        apgd(model, (x - 0.5) / 0.25, y, eps=0.05)
    with pytest.raises(UserError, match="y must be an integer label tensor"):
        pgd(model, x, y.float(), eps=0.05, alpha=0.01, steps=1)
    with pytest.raises(UserError, match="targets must differ from the true labels"):
        pgd(model, x, y, eps=0.05, alpha=0.01, steps=1, loss="ce_targeted", targets=y)
    with pytest.raises(UserError, match="is targeted: pass targets"):
        pgd(model, x, y, eps=0.05, alpha=0.01, steps=1, loss="dlr_targeted")
    with pytest.raises(UserError, match=r"labels must lie in \[0, 3\]"):
        pgd(model, x, y + K, eps=0.05, alpha=0.01, steps=1)
    with pytest.raises(UserError, match="rho must be in"):
        apgd(model, x, y, eps=0.05, rho=1.5)


def test_empty_batch_and_zero_eps(model, batch):
    x, y = batch
    for name in ALL:
        assert run(name, model, x[:0], y[:0], norm="linf", eps=0.05).shape == (0, 1, 8, 8)
    assert torch.equal(fgsm(model, x, y, eps=0.0), x)
    assert torch.equal(pgd(model, x, y, eps=0.0, alpha=0.01, steps=3), x)
    assert torch.equal(apgd(model, x, y, eps=0.0, steps=3), x)


def test_registry():
    assert {"fgsm", "pgd", "apgd", "apgd_t"} <= set(ATTACKS)
    assert get_attack("apgd_t") is apgd_targeted
    with pytest.raises(UserError, match="unknown attack 'cw': choose one of fgsm, pgd, apgd, apgd_t"):
        get_attack("cw")
    assert set(LOSSES) == {"ce", "ce_targeted", "cw", "dlr", "dlr_targeted", "proto_margin", "proto_linf"}


@pytest.mark.parametrize("norm", NORMS)
def test_random_starts_are_drawn_by_the_cpu_generator_whatever_the_device(norm):
    # The draw happens on the CPU and moves to x's device, so that a seed gives the same start on
    # a GPU as here (a CPU generator cannot draw on CUDA at all).
    from repulsor.attacks.geometry import geometry
    x = torch.rand(3, 1, 4, 4)
    starts = [geometry(norm).random_start(x, 0.1, torch.Generator().manual_seed(5)) for _ in range(2)]
    torch.testing.assert_close(starts[0], starts[1], rtol=0, atol=0)
    if norm == "linf":
        noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(starts[0], (x + (2 * noise - 1) * 0.1).clamp(0, 1), rtol=0, atol=0)
    assert geometry(norm).norm(starts[0] - x).max() <= 0.1 + 1e-6


# ----------------------------------------------------------------------- L1


def _l1_projection_reference(x_adv, x, eps):
    """The projection onto the L1 ball and the box by bisection on the soft threshold, in float64:
    d_i = sign(v_i) min(max(|v_i| - lam, 0), room_i), lam the smallest >= 0 with ||d||_1 <= eps."""
    v, xf = (x_adv - x).flatten(1).double(), x.flatten(1).double()
    room = torch.where(v >= 0, 1 - xf, xf)
    rows = []
    for vi, ri in zip(v, room):
        def shrink(lam):
            return vi.sign() * torch.minimum((vi.abs() - lam).clamp_min(0), ri)
        low, high = 0.0, vi.abs().max().item()
        if shrink(low).abs().sum() > eps:
            for _ in range(200):
                mid = (low + high) / 2
                low, high = (mid, high) if shrink(mid).abs().sum() > eps else (low, mid)
            rows.append(shrink(high))
        else:
            rows.append(shrink(0.0))
    return (xf + torch.stack(rows)).reshape(x.shape)


@pytest.mark.parametrize("eps", [0.0, 0.3, 2.0, 12.0, 500.0])
def test_l1_projection_is_exact(eps):
    g = torch.Generator().manual_seed(7)
    x = torch.rand(16, 3, 4, 4, generator=g)
    x[:4] = (x[:4] > 0.5).float()  # clean points on the box's corners
    scale = torch.rand(16, 1, 1, 1, generator=g) * 3
    x_adv = x + scale * torch.randn(x.shape, generator=g)
    x_adv[-2:] = x[-2:] + 1e-3 * torch.randn(2, 3, 4, 4, generator=g)  # already inside the ball
    l1 = geometry("l1")
    projected = l1.project(x_adv, x, eps)
    torch.testing.assert_close(projected.double(), _l1_projection_reference(x_adv, x, eps), rtol=0, atol=2e-6)
    assert (l1.norm((projected - x).double()) <= eps + 1e-4).all()
    assert projected.min() >= 0 and projected.max() <= 1
    # where the budget binds it is spent, not left over as clipping after a ball projection would
    clipped = (x_adv.clamp(0, 1) - x).flatten(1).abs().sum(1)
    binding = clipped > eps
    torch.testing.assert_close(l1.norm(projected - x)[binding], torch.full((int(binding.sum()),), eps),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1.project(projected, x, eps), projected, rtol=0, atol=2e-6)  # idempotent


def test_l1_step_is_sparse_with_unit_norm():
    g = torch.Generator().manual_seed(8)
    grad = torch.randn(3, 1, 10, 10, generator=g)
    l1 = geometry("l1")
    d = l1.direction(grad, density=torch.tensor([0.01, 0.2, 1.0]))
    torch.testing.assert_close(d.flatten(1).abs().sum(1), torch.ones(3))
    assert (d.flatten(1) != 0).sum(1).tolist() == [1, 20, 100]
    # the coordinates moved are those of the largest |grad|, each in the gradient's direction
    top = grad[1].flatten().abs().topk(20).indices
    assert set(d[1].flatten().nonzero().flatten().tolist()) == set(top.tolist())
    assert (d.flatten(1) * grad.flatten(1) >= 0).all()
    assert (d[0].flatten() != 0).sum() == 1 and l1.direction(grad).ne(0).flatten(1).sum(1).eq(20).all()  # PGD's 20%


def test_l1_apgd_runs_autoattacks_three_stages():
    from repulsor.attacks.apgd import l1_stages
    assert l1_stages(100) == [(3.0, 30), (2.0, 30), (1.0, 40)]
    assert l1_stages(10) == [(3.0, 3), (2.0, 3), (1.0, 4)]
    assert l1_stages(3) == [(1.0, 3)]  # too few steps for three stages: one at eps


def test_l1_apgd_beats_l1_pgd(model, batch):
    """The sparse, adaptive L1-APGD is the stronger L1 attack on the same budget of steps."""
    x, y = batch
    eps = EPS_MEDIUM["l1"]
    with evaluating(model):
        by_pgd = accuracy(model, pgd(model, x, y, eps=eps, alpha=eps / 4, steps=20, norm="l1"), y)
        by_apgd = accuracy(model, apgd(model, x, y, eps=eps, steps=20, norm="l1"), y)
    assert by_apgd <= by_pgd


def test_eps_checks_are_one_per_norm():
    from repulsor.attacks.geometry import check_eps
    assert check_eps(12, "l1", 3072) == 12.0 and check_eps(2.0, "l2", 784) == 2.0 and check_eps(8 / 255, "linf") > 0
    for eps, norm, dim, fragment in [(8, "linf", 3072, 'write "8/255"'), (3073, "l1", 3072, "diameter of the image box"),
                                     (56, "l2", 3072, "diameter"), (-1, "l1", 3072, "finite number >= 0"),
                                     (float("nan"), "l2", None, "not a radius"), (1, "l3", None, "unknown norm")]:
        with pytest.raises(UserError) as info:
            check_eps(eps, norm, dim)
        assert fragment in str(info.value) and "\n" not in str(info.value)
