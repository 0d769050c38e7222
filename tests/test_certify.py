"""Certified bounds (issue 25): sound on random small networks, CROWN never below IBP, exact where
the network is affine on the box, and a one-line refusal for what they do not cover."""

import itertools

import pytest
import torch
from torch import nn

from repulsor.attacks import evaluating, pgd
from repulsor.certify import certify, ibp_margins, margin_bounds, network_layers
from repulsor.certify import rules
from repulsor.errors import UserError
from repulsor.models.heads import Network, Normalize, PrototypeClassifier


def _net(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        body = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
                             nn.Linear(10, 4))
    else:
        body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(2),
                             nn.Flatten(), nn.Linear(16, 4))
        bn = body[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(-1.5, 1.5)  # negative scales too
    return Network(Normalize((0.4, 0.6), (0.3, 0.2)), body).eval()


def _margins(model, x, y):
    with torch.no_grad():
        s = model(x)
    true = s.gather(1, y[:, None])
    others = torch.stack([torch.cat([s[i, :c], s[i, c + 1:]]) for i, c in enumerate(y.tolist())])
    return true - others  # [N, k-1], same order as the bounds


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_no_sampled_or_attacked_input_falls_below_the_bounds(kind, method):
    model = _net(kind)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 2, 4, 4, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    eps = 0.05
    bounds = margin_bounds(model, x, y, eps=eps, method=method)
    low, high = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    for _ in range(40):
        sample = low + (high - low) * torch.rand(x.shape, generator=g)
        assert (_margins(model, sample, y) >= bounds - 1e-5).all()
    corners = torch.where(torch.rand(x.shape, generator=g) > 0.5, high, low)  # vertices of the box
    assert (_margins(model, corners, y) >= bounds - 1e-5).all()
    with evaluating(model):
        x_adv = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=30, loss="cw", early_stop=False)
    assert (_margins(model, x_adv, y) >= bounds - 1e-5).all()


@pytest.mark.parametrize("method", ["crown-ibp", "crown"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_crown_is_never_looser_than_ibp(kind, method):
    model = _net(kind, seed=2)
    x, y = torch.rand(8, 2, 4, 4), torch.arange(8) % 4
    for eps in (0.01, 0.05, 0.2):
        ibp = margin_bounds(model, x, y, eps=eps, method="ibp")
        crown = margin_bounds(model, x, y, eps=eps, method=method)
        assert (crown >= ibp - 1e-5).all()
        assert certify(model, x, y, eps=eps, method=method)["certified_accuracy"] >= \
            certify(model, x, y, eps=eps, method="ibp")["certified_accuracy"]


def test_one_hidden_layer_bounds_are_exact_where_enumeration_says_so():
    torch.manual_seed(3)
    body = nn.Sequential(nn.Flatten(), nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 3))
    model = Network(Normalize((0.0,), (1.0,)), body).eval()
    x, y = torch.full((1, 1, 1, 3), 0.5), torch.tensor([0])
    # The first layer's interval is exact: its ends are attained at vertices of the box.
    eps = 0.3
    low, high = (x - eps).flatten(1), (x + eps).flatten(1)
    l1, u1 = rules.interval(body[1], low, high)
    vertices = torch.tensor(list(itertools.product(*zip(low[0].tolist(), high[0].tolist()))))
    pre = body[1](vertices)
    torch.testing.assert_close(l1[0], pre.min(0).values)
    torch.testing.assert_close(u1[0], pre.max(0).values)
    # With every hidden neuron stable, the network is affine on the box: CROWN's margin bound is the
    # exact minimum over the vertices.
    tiny = 1e-3
    low, high = (x - tiny).flatten(1), (x + tiny).flatten(1)
    l1, u1 = rules.interval(body[1], low, high)
    assert ((l1 > 0) | (u1 < 0)).all()
    vertices = torch.tensor(list(itertools.product(*zip(low[0].tolist(), high[0].tolist())))).view(-1, 1, 1, 3)
    exact = _margins(model, vertices, y.expand(len(vertices))).min(0).values
    torch.testing.assert_close(margin_bounds(model, x, y, eps=tiny, method="crown")[0], exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rule", ["cosine", "dot_l2", "dot_linf"])
def test_prototype_heads_with_a_linear_rule_are_bounded_soundly(rule):
    torch.manual_seed(4)
    body = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))
    model = PrototypeClassifier(Network(Normalize((0.5,), (0.25,)), body), torch.randn(3, 6), rule).eval()
    x, y = torch.rand(5, 1, 2, 4), torch.arange(5) % 3
    bounds = margin_bounds(model, x, y, eps=0.02, method="crown")
    for _ in range(30):
        sample = (x + 0.02 * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
        assert (_margins(model, sample, y) * 0 + _rule_margins(model, sample, y) >= bounds - 1e-5).all()


def _rule_margins(model, x, y):
    """Margins of <z, q_y - q_j>, the linear form of the head's decision (what the bounds bound)."""
    layers, q = network_layers(model)
    z = model.embed(x).detach()
    s = z @ q.T
    true = s.gather(1, y[:, None])
    return true - torch.stack([torch.cat([s[i, :c], s[i, c + 1:]]) for i, c in enumerate(y.tolist())])


def test_what_the_bounds_do_not_cover_is_refused_in_one_line():
    from repulsor.models.build import build_body

    fast = Network(Normalize((0.5,) * 3, (0.25,) * 3), build_body("fast_cifar", in_channels=3, out_dim=10, width=0.125))
    with pytest.raises(UserError, match="do not cover the body FastCIFAR"):
        certify(fast.eval(), torch.rand(1, 3, 32, 32), torch.tensor([0]), eps=0.01)
    gelu = Network(Normalize((0.5,), (0.25,)), nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.GELU())).eval()
    with pytest.raises(UserError, match="do not cover the layer GELU"):
        certify(gelu, torch.rand(1, 1, 2, 2), torch.tensor([0]), eps=0.01)
    nearest = PrototypeClassifier(gelu, torch.randn(2, 3), "l2").eval()
    with pytest.raises(UserError, match="rule is 'l2'"):
        certify(nearest, torch.rand(1, 1, 2, 2), torch.tensor([0]), eps=0.01)
    with pytest.raises(UserError, match="unknown certification method"):
        certify(_net("mlp"), torch.rand(1, 2, 4, 4), torch.tensor([0]), eps=0.01, method="lp")
    for eps, norm, message in [(-0.1, "linf", "finite number >= 0"), (0.1, "l3", "unknown norm"),
                               (2.0, "linf", "larger than 1")]:
        with pytest.raises(UserError, match=message):
            certify(_net("mlp"), torch.rand(1, 2, 4, 4), torch.tensor([0]), eps=eps, norm=norm)
    # a randomised model: its layers are covered, but no bound holds for a forward pass it has not made
    noisy = _net("mlp")
    noisy.body[0].register_forward_hook(lambda module, args, out: out + 0.1 * torch.randn_like(out))
    with pytest.raises(UserError, match="randomised"):
        certify(noisy, torch.rand(4, 2, 4, 4), torch.arange(4) % 4, eps=0.01)


def test_certified_accuracy_brackets_the_attacked_one_on_a_trained_net():
    """On a small net trained on separable data: certified <= robust (attacked) <= clean, and at eps = 0
    every correctly classified point is certified."""
    torch.manual_seed(5)
    templates = torch.rand(4, 2, 4, 4)
    y = torch.arange(200) % 4
    x = (templates[y] + 0.05 * torch.randn(200, 2, 4, 4)).clamp(0, 1)
    model = _net("mlp", seed=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    at_zero = certify(model, x, y, eps=0.0, method="ibp")
    assert at_zero["certified_accuracy"] == pytest.approx(at_zero["clean_accuracy"])
    result = certify(model, x, y, eps=0.03, method="crown")
    with evaluating(model):
        x_adv = pgd(model, x, y, eps=0.03, alpha=0.0075, steps=20, loss="cw")
    robust = (model(x_adv).argmax(1) == y).float().mean().item()
    assert result["certified_accuracy"] <= robust <= result["clean_accuracy"]


def test_certify_a_run_from_the_command_line_with_its_bracket(tmp_path, capsys):
    import json

    from repulsor import cli
    from repulsor.config import from_dict
    from repulsor.training.loop import train

    from conftest import TINY

    raw = {**TINY, "train": {**TINY["train"], "method": "ce", "epochs": 2}, "eval": {**TINY["eval"], "n": 30,
                                                                                      "after_train": True}}
    run = train(from_dict(raw), tmp_path / "run", quiet=True)
    assert cli.main(["certify", str(run), "--n", "30", "--eps", "0.01"]) == 0
    out = capsys.readouterr().out
    results = json.loads((run / "results.json").read_text())
    entry = results["certified"]["crown@linf:0.01"]
    assert entry["n"] == 30 and len(entry["certified"]) == 30 and "certified_accuracy_ci95" in entry
    assert "certified accuracy:" in out
    # no suite ran at eps 0.01 on these points: no bracket is claimed
    assert "lies between" not in out
    assert cli.main(["certify", str(run), "--n", "30"]) == 0  # at the run's own eps, beside its quick suite
    out = capsys.readouterr().out
    assert "lies between" in out and "after suite quick" in out
    assert results["suites"]["quick"]["robust_accuracy"] >= 0
    with pytest.raises(SystemExit) as stop:
        cli.main(["certify", str(run), "--method", "lp"])
    assert stop.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_ibp_through_batch_norm_in_training_mode_uses_the_batch_and_leaves_the_running_statistics():
    """Certified training of a network with batch norm (the small CNN): in training mode the intervals are
    normalised by the batch's statistics, as the forward pass is, so at eps = 0 the bounds are the
    training-mode margins themselves; the running statistics do not move, and gradients reach the weights."""
    model = _net("conv", seed=4).train()
    bn = model.body[1]
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(16, 2, 4, 4, generator=g), torch.arange(16) % 4
    with torch.no_grad():
        bn.momentum = 0.0  # a training-mode forward pass that leaves the statistics as they are
        expected = _margins(model, x, y)
        bn.momentum = 0.1
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    at_zero = ibp_margins(model, x, y, 0.0)
    torch.testing.assert_close(at_zero, expected, atol=1e-5, rtol=0)
    wider = ibp_margins(model, x, y, 0.05)
    assert (wider <= at_zero + 1e-6).all()
    wider.sum().backward()
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(before, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))


def test_ibp_schedule_ramps_eps_up_and_the_clean_weight_down():
    from repulsor.config import from_dict
    from repulsor.training.methods import ibp_schedule

    from conftest import TINY

    cfg = from_dict({**TINY, "train": {**TINY["train"], "method": "ibp", "eps": 0.2, "ibp_warmup": 0.1,
                                      "ibp_ramp": 0.4}}).train
    assert ibp_schedule(cfg, 0.05) == (0.0, 1.0)
    eps, kappa = ibp_schedule(cfg, 0.3)
    assert eps == pytest.approx(0.1) and kappa == pytest.approx(0.75)
    assert ibp_schedule(cfg, 0.9) == (pytest.approx(0.2), pytest.approx(0.5))


@pytest.mark.slow
def test_ibp_training_makes_certificates_that_cross_entropy_does_not_have(tmp_path):
    """The same small network and budget on the digits: IBP training certifies far more points at
    eps = 0.1 than cross-entropy training, whose IBP certificates are nearly empty."""
    import repulsor
    from repulsor.config import from_dict
    from repulsor.evaluation.run import load_test_split
    from repulsor.training.loop import train

    from conftest import TINY

    certified = {}
    for method in ("ibp", "ce"):
        raw = {**TINY, "model": {"name": "mlp", "width": 0.5},
               "train": {**TINY["train"], "method": method, "epochs": 10, "eps": 0.1, "val_n": 100}}
        run = train(from_dict(raw), tmp_path / method, quiet=True)
        x, y, _ = load_test_split(from_dict(raw), 300)
        certified[method] = certify(repulsor.load_model(run), x, y, eps=0.1, method="ibp")["certified_accuracy"]
    assert certified["ibp"] > certified["ce"] + 0.2, certified


def test_evaluate_with_certify_prints_and_reports_the_bracket(tmp_path, capsys):
    import json

    from repulsor import cli
    from repulsor.config import from_dict
    from repulsor.report.run_section import bracket_text
    from repulsor.training.loop import train

    from conftest import TINY

    raw = {**TINY, "train": {**TINY["train"], "method": "ce", "epochs": 2}}
    run = train(from_dict(raw), tmp_path / "run", quiet=True)
    assert cli.main(["evaluate", str(run), "--n", "40", "--certify", "crown", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Bracket: the robust accuracy on these 40 points lies between" in out
    results = json.loads((run / "results.json").read_text())
    text = bracket_text(results["suites"]["quick"], results)
    low = results["certified"][next(iter(results["certified"]))]["certified_accuracy"]
    assert low <= results["suites"]["quick"]["robust_accuracy"]  # the lower bound is below the upper one
    assert text and f"{100 * low:.2f}%" in text
    # the report draws it: certified <= attacked <= clean on one axis, the span between shaded
    from repulsor.report.blocks import Figure
    from repulsor.report.run_section import suite_blocks

    drawn = [b for b in suite_blocks("quick", results["suites"]["quick"], results, tmp_path / "fig")
             if isinstance(b, Figure)]
    assert len(drawn) == 1 and drawn[0].path.is_file()
    row = json.loads(drawn[0].path.with_suffix(".json").read_text())["rows"]["quick"]
    assert row["certified"] <= row["attacked"] <= row["clean"] and row["n"] == 40
    # a model the bounds do not cover is refused before any attack runs
    proto = train(from_dict({**TINY, "prototypes": {**TINY["prototypes"], "distance": "l2"}}), tmp_path / "p", quiet=True)
    assert cli.main(["evaluate", str(proto), "--certify", "ibp", "--quiet"]) == 2
    assert "rule is 'l2'" in capsys.readouterr().err
    assert "quick" not in json.loads((proto / "results.json").read_text()).get("suites", {}) if (proto / "results.json").exists() else True
