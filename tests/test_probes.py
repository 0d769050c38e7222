"""Tests of repulsor.evaluation.probes: what the cascade and the sanity checks measure about a
model before attacking it, on small models whose answers are known by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repulsor.evaluation import probes

CPU = torch.device("cpu")


def linear(k=3, d=12, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k)).eval()


def points(n=10, shape=(1, 3, 4), k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, k, (n,), generator=g)


class Noisy(nn.Module):
    """Adds fresh Gaussian noise to its input at every pass."""

    def __init__(self, inner, sigma):
        super().__init__()
        self.inner, self.sigma = inner, sigma

    def forward(self, x):
        return self.inner(x + self.sigma * torch.randn_like(x))


class Thresholded(nn.Module):
    """A non-differentiable input step: the scores do not reach the input through autograd."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x > 0.5).float())


class Detached(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).detach()


def test_autocast_dtype_per_device():
    assert probes.autocast_dtype(CPU) is torch.bfloat16
    assert probes.autocast_dtype(torch.device("cuda")) is torch.float16
    assert probes.autocast_dtype(torch.device("meta")) is None


def test_input_gradients_are_the_analytic_ce_gradient_in_any_batch_size():
    model = linear()
    x, y = points()
    weight = model[1].weight.detach()
    p = F.softmax(model(x), dim=1).detach()
    expected = (p - F.one_hot(y, 3).float()) @ weight  # d CE / d x for a linear model
    for batch_size in (3, 10, 64):
        got = probes.input_gradients(model, x, y, "ce", device=CPU, batch_size=batch_size)
        assert got.shape == (10, 12) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_input_gradients_under_autocast_are_close_but_not_fp32():
    model = linear()
    x, y = points()
    fp32 = probes.input_gradients(model, x, y, "ce", device=CPU, batch_size=10)
    low = probes.input_gradients(model, x, y, "ce", device=CPU, batch_size=10, autocast_dtype=torch.bfloat16)
    assert not torch.equal(fp32, low)
    assert probes.gradient_agreement(fp32, low)[0] > 0.99


def test_a_model_that_hides_its_input_gives_zero_gradients():
    x, y = points()
    for model in (Thresholded(linear()), Detached(linear())):
        grads = probes.input_gradients(model, x, y, "cw", device=CPU, batch_size=4)
        assert grads.shape == (10, 12) and (grads == 0).all()
        assert probes.useless_gradients(grads).all()
        assert not probes.has_input_gradient(model, x, y, device=CPU)
    assert probes.has_input_gradient(linear(), x, y, device=CPU)
    empty = probes.input_gradients(linear(), x[:0], y[:0], "ce", device=CPU, batch_size=4)
    assert empty.shape == (0, 0)


def test_eot_averages_the_gradient_over_the_randomness():
    base = linear()
    x, y = points(n=4)
    clean = probes.input_gradients(base, x, y, "ce", device=CPU, batch_size=4)
    model = Noisy(base, 0.3)
    torch.manual_seed(0)
    one = probes.input_gradients(model, x, y, "ce", device=CPU, batch_size=4)
    torch.manual_seed(0)
    many = probes.input_gradients(model, x, y, "ce", device=CPU, batch_size=4, eot=200)
    # averaging 200 samples brings the gradient far nearer its expectation than one sample is
    expected = torch.stack([probes.input_gradients(model, x, y, "ce", device=CPU, batch_size=4)
                            for _ in range(2000)]).mean(0)
    assert (many - expected).norm() < 0.3 * (one - expected).norm()
    assert probes.gradient_agreement(clean, many)[0] > 0.9


def test_useless_gradients_are_the_all_zero_and_the_non_finite_rows():
    g = torch.ones(5, 4)
    g[1] = 0
    g[2, 3] = float("nan")
    g[3, 0] = float("inf")
    g[4, 1:] = 0  # one non-zero entry is still a direction
    assert probes.useless_gradients(g).tolist() == [False, True, True, True, False]
    assert probes.useless_gradients(torch.empty(0, 4)).shape == (0,)


def test_gradient_agreement_of_one_sided_zeros_shapes_and_nothing():
    g = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    other = g.clone()
    other[0] = 0
    cosine, zero_ref, zero_other = probes.gradient_agreement(g, other)
    assert (zero_ref, zero_other) == (0.0, 0.25)
    assert cosine == pytest.approx(1.0)  # the median of [0, 1, 1, 1]
    other[1] = 0
    assert probes.gradient_agreement(g, other)[0] == 0.0  # torch's median of [0, 0, 1, 1] is the lower one
    assert probes.gradient_agreement(torch.empty(0, 6), torch.empty(0, 6)) == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="gradient shapes differ"):
        probes.gradient_agreement(g, g[:, :5])


def test_score_spread_and_randomness():
    x, _ = points(n=20)
    model = linear()
    diff, tolerance = probes.score_spread(model, x, device=CPU, batch_size=7)
    assert diff == 0.0 and tolerance == pytest.approx(probes.DETERMINISM_RTOL * model(x).abs().max().item())
    assert not probes.is_randomised(model, x, device=CPU, batch_size=7)
    noisy = Noisy(model, 0.05)
    diff, tolerance = probes.score_spread(noisy, x, device=CPU, batch_size=7)
    assert diff > tolerance
    assert probes.is_randomised(noisy, x, device=CPU, batch_size=7)


def test_scores_that_are_nan_in_both_passes_count_as_equal():
    class HalfNan(nn.Module):
        def forward(self, x):
            scores = torch.ones(len(x), 3)
            scores[0] = float("nan")
            return scores

    assert probes.score_spread(HalfNan(), torch.rand(4, 1, 2, 2), device=CPU, batch_size=4) == (0.0, 1e-6)
    assert not probes.is_randomised(HalfNan(), torch.rand(4, 1, 2, 2), device=CPU, batch_size=4)


def test_randomness_is_probed_on_the_first_check_points_only():
    class LateNoise(nn.Module):
        """Deterministic on the first CHECK_POINTS images, noisy after them (in a batch of its own)."""

        def forward(self, x):
            return x.flatten(1)[:, :3] + (x[:, 0, 0, 0:1] > 2).float() * torch.randn(len(x), 3)

    x = torch.rand(probes.CHECK_POINTS + 10, 1, 2, 2)
    x[probes.CHECK_POINTS:] += 5  # only these draw noise
    assert not probes.is_randomised(LateNoise(), x, device=CPU, batch_size=probes.CHECK_POINTS)
    assert probes.is_randomised(LateNoise(), x.flip(0), device=CPU, batch_size=probes.CHECK_POINTS)
