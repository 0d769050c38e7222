"""Defences that hide their gradients (Athalye, Carlini and Wagner, 2018), one per kind.

From one small CNN trained here on the embedded digits data, three masked models are
built: shattered (a hard threshold before the network), stochastic (fresh input noise at
every pass) and vanishing (logits scaled by 1000). Each must be flagged by the sanity
checks, evaluated without error, and brought by the matching attack (BPDA, EOT, the
scale-invariant DLR loss) to within 2 points of a reference attack written here, which
shares no code with the library's attacks. The unmasked network raises none of the flags.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repulsor import UserError, bpda, evaluate, load_dataset
from repulsor.attacks import apgd, fab_targeted, pgd
from repulsor.attacks.context import with_eot
from repulsor.attacks.losses import ce
from repulsor.evaluation.cascade import RANDOMISED_VOTES

EPS = 0.1  # L-inf, on 8x8 digits in [0, 1]: about half of the test points resist PGD
N = 200
TOLERANCE = 0.02  # "within 2 points"
MASKING_FLAGS = ("shattered_gradients", "zero_gradients", "deterministic")


@pytest.fixture(scope="module")
def digits():
    """(trained CNN in eval mode, the first N test images, their labels)."""
    torch.manual_seed(0)
    x, y = load_dataset("digits", "train")
    xt, yt = load_dataset("digits", "test")
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(30):
        for i in range(0, len(y), 128):
            opt.zero_grad()
            F.cross_entropy(net(x[i : i + 128]), y[i : i + 128]).backward()
            opt.step()
    net.eval()
    assert (net(xt).argmax(1) == yt).float().mean() > 0.95
    return net, xt[:N], yt[:N]


class Threshold(nn.Module):
    """A hard binarisation: no autograd path from its output back to its input."""

    def forward(self, x):
        return (x > 0.5).float()


class Noisy(nn.Module):
    """Adds fresh Gaussian noise to the input at every forward pass (a randomised defence)."""

    def __init__(self, body, sigma=0.05):
        super().__init__()
        self.body, self.sigma = body, sigma

    def forward(self, x):
        return self.body((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


class Scaled(nn.Module):
    """Logits times 1000: cross-entropy saturates in fp32 and its gradient is exactly zero."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return 1000 * self.body(x)


def reference_pgd(x, y, *, grad, correct, runs, seed=0, attacking=None):
    """L-inf PGD written out, as a cascade of runs ``[(steps, alpha), ...]``.

    Each run starts uniformly in the ball and takes sign steps of ``grad(x_adv, y)`` with
    projection, on the points every earlier run failed on. A point stops moving at the
    first iterate where ``attacking(x_adv, y)`` (default: ``correct``) is False, and is
    broken if ``correct`` is False at its final iterate. Returns the fraction never broken.
    """
    attacking = attacking or correct
    survivors = torch.ones(len(y), dtype=torch.bool)
    for run, (steps, alpha) in enumerate(runs):
        index = survivors.nonzero().squeeze(1)
        xs, ys = x[index], y[index]
        gen = torch.Generator().manual_seed(1000 * seed + run)
        x_adv = (xs + (torch.rand(xs.shape, generator=gen) * 2 - 1) * EPS).clamp(0, 1)
        moving = attacking(x_adv, ys)
        for _ in range(steps):
            m = moving.nonzero().squeeze(1)
            if len(m) == 0:
                break
            step = x_adv[m] + alpha * grad(x_adv[m], ys[m]).sign()
            x_adv[m] = torch.min(torch.max(step, xs[m] - EPS), xs[m] + EPS).clamp(0, 1)
            moving[m] = attacking(x_adv[m], ys[m])
        survivors[index] = correct(x_adv, ys)
    return survivors.float().mean().item()


def _ce_grad(forward, samples=1):
    def grad(x, y):
        total = torch.zeros_like(x)
        for _ in range(samples):
            xr = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(forward(xr), y, reduction="sum"), xr)
            total += g
        return total / samples

    return grad


def _correct(model, votes=1):
    def correct(x, y):
        with torch.no_grad():
            return torch.stack([model(x).argmax(1) == y for _ in range(votes)]).all(0)

    return correct


def _flags(result) -> set:
    return {v["name"] for v in result.get("sanity", []) if not v["ok"] and v["name"] in MASKING_FLAGS}


def _statuses(result) -> dict:
    return {a["name"]: a["status"] for a in result["attacks"]}


# ---------------------------------------------------------------- unmasked


def test_the_unmasked_network_raises_no_masking_flag(digits):
    net, x, y = digits
    result = evaluate(net, x, y, suite="quick", eps=EPS, checks=True)
    assert _flags(result) == set()
    assert result["randomised"] is False and result["votes"] == 1
    assert set(_statuses(result).values()) == {"done"}
    assert 0.2 < result["robust_accuracy"] < 0.8  # a non-trivial number to compare with


# ---------------------------------------------------------------- shattered


def test_bpda_is_the_step_forward_and_its_approximation_backward():
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    wrapped = bpda(Threshold())
    out = wrapped(x)
    assert torch.equal(out, (x > 0.5).float())  # exactly the step's values
    (g,) = torch.autograd.grad((out * 3).sum(), x)
    assert torch.equal(g, torch.full_like(x, 3.0))  # identity backward: straight through
    smooth = bpda(Threshold(), backward=lambda z: torch.sigmoid(10 * (z - 0.5)))
    out = smooth(x)
    assert torch.equal(out, (x > 0.5).float())
    (g,) = torch.autograd.grad(out.sum(), x)
    s = torch.sigmoid(10 * (x.detach() - 0.5))
    assert torch.allclose(g, 10 * s * (1 - s))


def test_bpda_refuses_a_shape_it_cannot_pass_through():
    with pytest.raises(UserError, match="backward="):
        bpda(lambda z: z.flatten(1))(torch.rand(2, 1, 8, 8))
    with pytest.raises(UserError, match="module or function"):
        bpda(3)


def test_a_shattered_model_is_evaluated_not_refused(digits):
    net, x, y = digits
    shattered = nn.Sequential(Threshold(), net)
    result = evaluate(shattered, x, y, suite="quick", eps=EPS, checks=True)
    statuses = _statuses(result)
    assert statuses == {"pgd-20": "not applicable", "transfer (apgd-ce on the surrogate)": "not applicable"}
    assert all(a["n_attacked"] == 0 for a in result["attacks"])
    assert result["attacks"][0]["reason"] == "no input gradient"
    assert result["robust_accuracy"] == result["clean_accuracy"]  # nothing ran: nothing claimed beyond clean
    assert "shattered_gradients" in _flags(result)
    verdict = next(v for v in result["sanity"] if v["name"] == "shattered_gradients")
    assert "repulsor.bpda" in verdict["message"]
    # The gradient checks say why they did not run instead of failing.
    skipped = [v for v in result["sanity"] if "no input gradient" in v["message"] and v["name"] != "shattered_gradients"]
    assert {v["name"] for v in skipped} >= {"unbounded", "loss_rises"} and all(v["ok"] for v in skipped)


def test_a_transfer_attack_from_a_surrogate_runs_on_a_shattered_model(digits):
    net, x, y = digits
    shattered = nn.Sequential(Threshold(), net)
    result = evaluate(shattered, x, y, suite="quick", eps=EPS, surrogate=net)
    transfer = result["attacks"][-1]
    assert transfer["attack"] == "transfer" and transfer["status"] == "done"
    assert transfer["n_attacked"] == round(result["clean_accuracy"] * N)
    assert transfer["accuracy"] < result["clean_accuracy"]  # examples from the surrogate fool some points


@pytest.mark.slow
def test_square_still_runs_on_a_shattered_model(digits):
    net, x, y = digits
    result = evaluate(nn.Sequential(Threshold(), net), x[:50], y[:50], suite="standard", eps=EPS)
    statuses = _statuses(result)
    assert statuses["square"] == "done" and statuses["apgd-ce"] == statuses["fab-t"] == "not applicable"
    assert next(v for v in result["sanity"] if v["name"] == "black_box_vs_white_box")["message"].find("skipped") > 0


def test_bpda_brings_the_shattered_model_to_the_straight_through_reference(digits):
    net, x, y = digits
    # The paper suite on a linear head: PGD-20 then PGD-100, cross-entropy, step eps/4.
    result = evaluate(nn.Sequential(bpda(Threshold()), net), x, y, suite="paper", eps=EPS, checks=True)
    assert "shattered_gradients" not in _flags(result)
    assert set(_statuses(result).values()) == {"done"}

    def straight_through(z):
        return net(z + ((z > 0.5).float() - z).detach())

    reference = reference_pgd(x, y, grad=_ce_grad(straight_through), correct=_correct(nn.Sequential(Threshold(), net)),
                              runs=[(20, EPS / 4), (100, EPS / 4)])
    assert abs(result["robust_accuracy"] - reference) <= TOLERANCE, (result["robust_accuracy"], reference)
    assert result["robust_accuracy"] < result["clean_accuracy"] - 0.1  # BPDA really attacks


# ---------------------------------------------------------------- stochastic


def test_eot_of_one_is_the_plain_attack(digits):
    net, x, y = digits
    fn = ce
    assert with_eot(fn, 1) is fn
    with pytest.raises(UserError, match="eot"):
        pgd(net, x[:4], y[:4], eps=EPS, alpha=0.01, steps=1, eot=0)
    # On a deterministic model every sample is the same: averaging changes no step.
    for attack, kwargs in ((pgd, {"alpha": EPS / 4, "steps": 10}), (apgd, {"steps": 10})):
        one = attack(net, x[:50], y[:50], eps=EPS, **kwargs)
        three = attack(net, x[:50], y[:50], eps=EPS, eot=3, **kwargs)
        assert torch.equal(one, three), attack.__name__
    one = fab_targeted(net, x[:20], y[:20], eps=EPS, steps=5, n_targets=2)
    assert torch.allclose(one, fab_targeted(net, x[:20], y[:20], eps=EPS, steps=5, n_targets=2, eot=2), atol=1e-6)


def test_a_lucky_forward_pass_is_not_counted(digits):
    net, x, y = digits

    class Coin(nn.Module):
        """The network's scores half of the time, a constant wrong class otherwise."""

        def forward(self, z):
            scores = net(z)
            wrong = F.one_hot((scores.argmax(1) + 1) % 10, 10).float() * 1e3
            return torch.where(torch.rand(len(z), 1) < 0.5, scores, wrong)

    result = evaluate(Coin(), x, y, suite="quick", eps=EPS)
    assert result["randomised"] and result["votes"] == RANDOMISED_VOTES
    # Correct in all ten passes happens with probability 1/1024 per point.
    assert result["clean_accuracy"] <= 0.02
    assert evaluate(Coin(), x, y, suite="quick", eps=EPS, votes=1)["clean_accuracy"] > 0.3


def test_a_randomised_evaluation_is_seeded_and_leaves_the_global_generator_alone(digits):
    net, x, y = digits
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = evaluate(Noisy(net), x[:60], y[:60], suite="quick", eps=EPS)
    assert torch.equal(torch.get_rng_state(), state)
    second = evaluate(Noisy(net), x[:60], y[:60], suite="quick", eps=EPS)
    assert first["robust_accuracy"] == second["robust_accuracy"] and torch.equal(first["x_adv"], second["x_adv"])


def test_a_randomised_model_is_flagged_and_pointed_to_the_rand_suite(digits):
    net, x, y = digits
    result = evaluate(Noisy(net), x[:100], y[:100], suite="quick", eps=EPS, checks=True)
    assert "deterministic" in _flags(result)
    verdict = next(v for v in result["sanity"] if v["name"] == "deterministic")
    assert "rand suite" in verdict["message"]


@pytest.mark.slow
def test_eot_brings_the_randomised_model_to_the_averaged_gradient_reference(digits):
    net, x, y = digits
    noisy = Noisy(net)
    n = N
    result = evaluate(noisy, x[:n], y[:n], suite="rand", eps=EPS)
    assert result["votes"] == RANDOMISED_VOTES
    assert [a["eot"] for a in result["attacks"]] == [20, 20]
    # Evaluated with EOT, the model's randomness is accounted for: no masking flag.
    assert _flags(result) == set()
    torch.manual_seed(1)

    def mean_prediction_correct(z, labels):  # the attack's own success test: scores averaged over 20 passes
        with torch.no_grad():
            return sum(F.softmax(noisy(z), 1) for _ in range(20)).argmax(1) == labels

    # The cascade's definition of robust: correct in every one of the votes at the final example.
    reference = reference_pgd(x[:n], y[:n], grad=_ce_grad(noisy, samples=20), correct=_correct(noisy, RANDOMISED_VOTES),
                              attacking=mean_prediction_correct, runs=[(100, EPS / 10), (100, EPS / 10)])
    assert abs(result["robust_accuracy"] - reference) <= TOLERANCE, (result["robust_accuracy"], reference)


# ---------------------------------------------------------------- vanishing


@pytest.mark.slow
def test_scale_invariant_losses_defeat_scaled_logits(digits):
    net, x, y = digits
    result = evaluate(Scaled(net), x, y, suite="standard", eps=EPS)
    assert "zero_gradients" in _flags(result)
    by_name = {a["name"]: a["accuracy"] for a in result["attacks"]}
    # Cross-entropy is fooled by the saturation; the targeted DLR attack is not.
    assert by_name["apgd-ce"] > result["clean_accuracy"] - 0.05
    assert by_name["apgd-t"] < by_name["apgd-ce"] - 0.3
    reference = reference_pgd(x, y, grad=_ce_grad(net), correct=_correct(net), runs=[(100, EPS / 10), (100, EPS / 10)])
    assert abs(result["robust_accuracy"] - reference) <= TOLERANCE, (result["robust_accuracy"], reference)
