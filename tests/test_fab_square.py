"""FAB-T and Square Attack: threat-model bounds, purity, reproducibility, strength, budget."""

import pytest
import torch
import torch.nn as nn

from repulsor.attacks.fab import fab, fab_targeted, project_hyperplane_box
from repulsor.attacks.geometry import geometry
from repulsor.attacks.square import square
from repulsor.errors import UserError

K = 4  # classes of the synthetic task
EPS_BIG = {"linf": 0.15, "l2": 1.5, "l1": 8.0}  # generous: a clean point is ~0.1 (linf) / ~0.7 (l2) from the boundary
EPS_SMALL = {"linf": 0.03, "l2": 0.3, "l1": 1.0}

# Settings kept small so the whole file runs in a few seconds on one core.
ATTACKS = {
    "fab_targeted": lambda m, x, y, eps, norm, seed=0: fab_targeted(
        m, x, y, eps=eps, norm=norm, steps=30, restarts=2, seed=seed
    ),
    "fab": lambda m, x, y, eps, norm, seed=0: fab(m, x, y, eps=eps, norm=norm, steps=30, restarts=2, seed=seed),
    "square": lambda m, x, y, eps, norm, seed=0: square(m, x, y, eps=eps, norm=norm, queries=300, seed=seed),
}
NORMS = ["linf", "l2", "l1"]
# Square has no L1 form (it refuses one, test_user_errors): every other attack runs in every norm.
PAIRS = [(name, norm) for name in ATTACKS for norm in NORMS if (name, norm) != ("square", "l1")]


def accuracy_mask(model, x, y):
    with torch.no_grad():
        return model(x).argmax(dim=1) == y


@pytest.fixture(scope="module")
def task():
    """A tiny MLP trained for a fraction of a second on an easy 4-class 1x8x8 task."""
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(K, 1, 8, 8, generator=g) * 0.5 + 0.25

    def sample(n):
        y = torch.randint(0, K, (n,), generator=g)
        return (templates[y] + 0.08 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1), y

    x_train, y_train = sample(1024)
    x_test, y_test = sample(48)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, K))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    clean = accuracy_mask(model, x_test, y_test)
    assert clean.float().mean() > 0.9
    return model, x_test, y_test


def conv_model():
    """An untrained conv net on 3x8x8 with BatchNorm (mode-sensitive), 5 classes."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 5)
    )


def rgb_batch(n=12):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[:, :, :2] = (x[:, :, :2] > 0.5).float()  # pixels on the box edges exercise the clipping
    return x


@pytest.mark.parametrize("name,norm", PAIRS)
def test_output_inside_eps_ball_and_box(task, name, norm):
    model, x, y = task
    model3 = conv_model().eval()
    x3 = rgb_batch()
    with torch.no_grad():
        y3 = model3(x3).argmax(dim=1)  # all correctly classified, so all are attacked
    geo = geometry(norm)
    for m, xx, yy in ((model, x, y), (model3, x3, y3)):
        for eps in (EPS_SMALL[norm], EPS_BIG[norm]):
            x_adv = ATTACKS[name](m, xx, yy, eps, norm)
            assert x_adv.shape == xx.shape and x_adv.dtype == xx.dtype
            assert not x_adv.requires_grad
            assert (geo.norm(x_adv - xx) <= eps + 1e-5).all()  # float32 rounding, summed over the pixels in L1
            assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name,norm", PAIRS)
def test_model_mode_weights_and_grads_untouched(name, norm, mode):
    model = conv_model()
    model.train(mode == "train")
    modes = [m.training for m in model.modules()]
    weights = [p.detach().clone() for p in model.parameters()]
    x = rgb_batch(6)
    y = torch.arange(6) % 5
    ATTACKS[name](model, x, y, EPS_BIG[norm], norm)
    assert [m.training for m in model.modules()] == modes
    for p, w in zip(model.parameters(), weights):
        assert p.requires_grad and p.grad is None
        assert torch.equal(p.detach(), w)


@pytest.mark.parametrize("name,norm", PAIRS)
def test_reproducible_and_independent_of_global_rng(task, name, norm):
    model, x, y = task
    eps = EPS_SMALL[norm] * 2
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ATTACKS[name](model, x, y, eps, norm, seed=0)
    assert torch.equal(torch.get_rng_state(), state), "the attack consumed the global RNG"
    torch.manual_seed(456)
    b = ATTACKS[name](model, x, y, eps, norm, seed=0)
    assert torch.equal(a, b)
    if name == "square":
        c = ATTACKS[name](model, x, y, eps, norm, seed=1)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("name,norm", PAIRS)
def test_breaks_undefended_model_and_never_helps_it(task, name, norm):
    model, x, y = task
    clean = accuracy_mask(model, x, y)
    eps = EPS_BIG[norm]
    x_adv = ATTACKS[name](model, x, y, eps, norm)
    robust = accuracy_mask(model, x_adv, y)
    assert robust.float().mean() < 0.2, f"{name}/{norm}: robust accuracy {robust.float().mean():.2f}"
    assert not (robust & ~clean).any(), "an attack turned a misclassified point into a correct one"
    if name.startswith("fab"):
        # FAB minimises the perturbation: its successes sit well inside the ball, unlike a
        # big-step attack (FGSM / Square L-inf put every perturbation on the sphere of radius eps).
        found = ~robust & clean
        norms = geometry(norm).norm(x_adv - x)[found]
        assert norms.median() < 0.8 * eps


def test_misclassified_points_are_returned_unchanged(task):
    model, x, y = task
    wrong = (y + 1) % K  # every label wrong: nothing to attack
    for name, norm in PAIRS:
        assert torch.equal(ATTACKS[name](model, x, wrong, EPS_BIG[norm], norm), x)


class _RaiseOnBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("square must not backpropagate")


class _NoGradWatch(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        assert not torch.is_grad_enabled(), "square ran the model with autograd enabled"
        assert not x.requires_grad
        self.calls += 1
        return _RaiseOnBackward.apply(self.inner(x))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_uses_no_gradients(task, norm):
    model, x, y = task
    watched = _NoGradWatch(model)
    x_adv = square(watched, x, y, eps=EPS_BIG[norm], norm=norm, queries=100)
    assert watched.calls > 1
    assert accuracy_mask(model, x_adv, y).float().mean() < accuracy_mask(model, x, y).float().mean()


class _QueryCounter(nn.Module):
    """Counts forward passes per clean example, identified as the nearest clean image
    (the eps-balls are far apart, so the match is unambiguous)."""

    def __init__(self, inner, x_clean, norm, eps):
        super().__init__()
        self.inner, self.x_clean, self.geo, self.eps = inner, x_clean, geometry(norm), eps
        self.counts = torch.zeros(x_clean.shape[0], dtype=torch.long)

    def forward(self, x):
        dist = torch.stack([self.geo.norm(self.x_clean - xi.unsqueeze(0)) for xi in x])  # [n, N]
        nearest, owner = dist.min(dim=1)
        assert (nearest <= self.eps + 1e-6).all()
        self.counts += torch.bincount(owner, minlength=self.x_clean.shape[0])
        return self.inner(x)


class _Unbreakable(nn.Module):
    """Class 0 wins by a wide margin whatever the input."""

    def forward(self, x):
        s = x.flatten(1).mean(dim=1, keepdim=True)
        return torch.cat([10 + s, s.expand(-1, 3)], dim=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_query_budget(task, norm):
    model, _, _ = task
    g = torch.Generator().manual_seed(3)
    x = torch.rand(24, 1, 8, 8, generator=g)  # far apart: linf ~0.9, l2 ~3 between images
    eps = {"linf": 0.1, "l2": 0.5}[norm]
    queries = 60
    # A model that is never fooled uses exactly the whole budget, per run.
    for restarts in (1, 2):
        counter = _QueryCounter(_Unbreakable(), x, norm, eps)
        square(counter, x, torch.zeros(24, dtype=torch.long), eps=eps, norm=norm, queries=queries, restarts=restarts)
        assert (counter.counts == queries * restarts).all()
    # On a real model: never more than the budget, and fooled points stop early.
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    counter = _QueryCounter(model, x, norm, eps)
    x_adv = square(counter, x, y, eps=eps, norm=norm, queries=queries)
    assert counter.counts.max() <= queries
    fooled = ~accuracy_mask(model, x_adv, y)
    assert fooled.any()
    assert counter.counts[fooled].min() < queries


@pytest.mark.parametrize("norm", NORMS)
def test_fab_finds_the_minimal_perturbation_of_a_linear_model(norm):
    """For an affine binary classifier whose boundary lies inside the box, the smallest
    adversarial perturbation is known in closed form: |margin| / ||w||_dual."""
    torch.manual_seed(4)
    lin = nn.Linear(64, 2)
    model = nn.Sequential(nn.Flatten(), lin)
    x = 0.4 + 0.2 * torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
        margin = (model(x)[:, 0] - model(x)[:, 1]).abs()
    w = (lin.weight[0] - lin.weight[1]).detach()
    geo = geometry(norm)
    if norm == "l1":
        # The L1 minimum spends its budget on the largest |w| first, each to the box: the smallest move to the
        # hyperplane within the box (project_hyperplane_box, checked against an LP below).
        toward = torch.where(y == 0, -1.0, 1.0).unsqueeze(1) * w  # the direction that lowers the true class's lead
        exact = geo.norm(project_hyperplane_box(x.flatten(1), toward, margin, "l1"))
    else:
        exact = margin / (w.abs().sum() if norm == "linf" else w.norm())
        # Largest coordinate change of the exact minimal step: it must keep x inside the box.
        move = exact if norm == "linf" else margin * w.abs().max() / w.norm() ** 2
        assert (x.flatten(1).min(1).values - 1.2 * move > 0).all() and (x.max() + 1.2 * move < 1).all()
    for attack in (fab, fab_targeted):
        x_adv = attack(model, x, y, eps=10.0, norm=norm, steps=100)
        assert not accuracy_mask(model, x_adv, y).any()
        found = geo.norm(x_adv - x)
        assert (found >= exact * (1 - 1e-4)).all()
        assert (found <= exact * 1.02).all(), f"FAB overshoots the minimum by {(found / exact).max():.3f}x"
    # Below the minimal norm nothing can be found, and the clean points come back.
    assert torch.equal(fab_targeted(model, x, y, eps=0.9 * exact.min().item(), norm=norm), x)


def test_fab_targeted_caps_targets_at_k_minus_one(task):
    torch.manual_seed(5)
    model2 = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.rand(10, 1, 8, 8)
    with torch.no_grad():
        y = model2(x).argmax(dim=1)
    a = fab_targeted(model2, x, y, eps=0.3, steps=20, n_targets=9)
    b = fab_targeted(model2, x, y, eps=0.3, steps=20, n_targets=1)
    assert torch.equal(a, b)
    assert not accuracy_mask(model2, a, y).all()
    # More targets can only break more points (same seed, same first target).
    model, x, y = task
    eps = 0.08
    one = accuracy_mask(model, fab_targeted(model, x, y, eps=eps, steps=20, n_targets=1), y)
    all_ = accuracy_mask(model, fab_targeted(model, x, y, eps=eps, steps=20, n_targets=9), y)
    assert not (all_ & ~one).any()


@pytest.mark.parametrize("norm", NORMS)
def test_hyperplane_box_projection_is_exact(norm):
    """Against references that cannot fail to converge: an LP (L-inf, L1) and, for L2, bisection on
    the KKT multiplier plus the KKT conditions themselves (the problem is strictly convex, so a
    point that satisfies them is the unique optimum)."""
    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(6)
    d_dim = 10
    p = torch.rand(20, d_dim, generator=g, dtype=torch.float64)
    w = torch.randn(20, d_dim, generator=g, dtype=torch.float64)
    w[:, :2] = 0  # coordinates that do not matter
    c = torch.randn(20, generator=g, dtype=torch.float64)
    d = project_hyperplane_box(p, w, c, norm)
    assert torch.allclose((w * d).sum(dim=1), c, atol=1e-9)
    assert ((p + d) >= -1e-12).all() and ((p + d) <= 1 + 1e-12).all()
    for i in range(p.shape[0]):
        pi, wi, ci = p[i].numpy(), w[i].numpy(), c[i].item()
        lo, hi = -pi, 1 - pi
        if norm == "linf":  # variables (d, r): minimise r subject to |d_j| <= r
            eye = np.eye(d_dim)
            a_ub = np.block([[eye, -np.ones((d_dim, 1))], [-eye, -np.ones((d_dim, 1))]])
            res = optimize.linprog(
                np.r_[np.zeros(d_dim), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * d_dim),
                A_eq=np.r_[wi, 0.0][None], b_eq=[ci], bounds=list(zip(lo, hi)) + [(0, None)], method="highs",
            )
            assert res.status == 0
            assert abs(d[i].abs().max().item() - res.fun) < 1e-6
        elif norm == "l1":  # variables (d, t): minimise sum(t) subject to |d_j| <= t_j
            eye = np.eye(d_dim)
            a_ub = np.block([[eye, -eye], [-eye, -eye]])
            res = optimize.linprog(
                np.r_[np.zeros(d_dim), np.ones(d_dim)], A_ub=a_ub, b_ub=np.zeros(2 * d_dim),
                A_eq=np.r_[wi, np.zeros(d_dim)][None], b_eq=[ci], bounds=list(zip(lo, hi)) + [(0, None)] * d_dim,
                method="highs",
            )
            assert res.status == 0
            assert abs(d[i].abs().sum().item() - res.fun) < 1e-6
        else:
            # The minimiser of ||v||^2 on {<w, v> = c} within the box is clip(lam * w, lo, hi) for
            # the lam where <w, clip(lam * w)> = c, a nondecreasing function of lam: bisection.
            def reached(lam):
                return wi @ np.clip(lam * wi, lo, hi)
            low, high = -1.0, 1.0
            while reached(low) > ci:
                low *= 2
            while reached(high) < ci:
                high *= 2
            for _ in range(200):
                mid = 0.5 * (low + high)
                low, high = (mid, high) if reached(mid) < ci else (low, mid)
            reference = np.clip(0.5 * (low + high) * wi, lo, hi)
            assert abs(d[i].norm().item() - np.linalg.norm(reference)) < 1e-9
            # KKT: one multiplier explains every free coordinate; clipped ones sit at their bound
            # on the side the multiplier pushes them to.
            di = d[i].numpy()
            free = (di > lo + 1e-12) & (di < hi - 1e-12) & (wi != 0)
            assert free.any()  # with these seeds every row has a free coordinate
            lam = di[free] / wi[free]
            assert np.allclose(lam, lam[0], atol=1e-9)
            assert np.allclose(di[wi == 0], 0.0)
            at_lo, at_hi = (di <= lo + 1e-12) & (wi != 0), (di >= hi - 1e-12) & (wi != 0)
            assert (lam[0] * wi[at_lo] <= lo[at_lo] + 1e-9).all() and (lam[0] * wi[at_hi] >= hi[at_hi] - 1e-9).all()
    # A hyperplane out of reach: the closest box corner.
    d = project_hyperplane_box(torch.full((1, 3), 0.5), torch.tensor([[1.0, -1.0, 0.0]]), torch.tensor([5.0]), norm)
    assert torch.equal(d, torch.tensor([[0.5, -0.5, 0.0]]))


def test_edge_cases(task):
    model, x, y = task
    for name in ATTACKS:
        assert torch.equal(ATTACKS[name](model, x, y, 0.0, "linf"), x)
        empty = ATTACKS[name](model, x[:0], y[:0], 0.1, "l2")
        assert empty.shape == (0, 1, 8, 8)


def test_user_errors(task):
    model, x, y = task
    one_class = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    cases = [
        lambda: fab_targeted(model, x, y, eps=-0.1),
        lambda: square(model, x, y, eps=float("nan")),
        lambda: square(model, x * 2, y, eps=0.1),
        lambda: fab_targeted(model, x - 0.5, y, eps=0.1),
        lambda: square(model, x, y, eps=0.1, norm="l1"),
        lambda: fab_targeted(model, x, y, eps=0.1, norm="l3"),
        lambda: square(model, x, y, eps=0.1, queries=0),
        lambda: square(model, x, y, eps=0.1, p_init=0.0),
        lambda: fab_targeted(model, x, y, eps=0.1, n_targets=0),
        lambda: fab_targeted(model, x, y, eps=0.1, beta=0.0),
        lambda: fab_targeted(model, x, y[:3], eps=0.1),
        lambda: square(model, x[0], y, eps=0.1),
        lambda: square(model, x, y + K, eps=0.1),
        lambda: fab_targeted(one_class, x, torch.zeros_like(y), eps=0.1),
        lambda: square(one_class, x, torch.zeros_like(y), eps=0.1),
        lambda: fab(model, x, y, eps=0.1, target=torch.full_like(y, K)),
    ]
    for case in cases:
        with pytest.raises(UserError) as info:
            case()
        assert "\n" not in str(info.value) and str(info.value)


def test_square_linf_never_queries_an_unchanged_image():
    """Each L-inf query changes the current point: where a draw of window signs would leave the
    image as it is (the window already holds them), the signs are drawn again. A model that is
    never fooled keeps the starting stripes as the current point, so every query must differ from
    them; late in the schedule the windows are a pixel or two wide, within one stripe."""
    seen = []

    class Stubborn(nn.Module):  # always the true class 0, by the same margin: no proposal is kept
        def forward(self, x):
            seen.append(x.detach().clone())
            return torch.tensor([[1.0, 0.0]]).repeat(len(x), 1)

    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    square(Stubborn(), x, torch.zeros(6, dtype=torch.long), eps=0.05, norm="linf", queries=400, seed=1)
    start, queries = seen[1], seen[2:]  # seen[0]: the clean check
    assert len(queries) == 400 - 2
    assert all(((q - start).abs() > 1e-7).flatten(1).any(1).all() for q in queries)
