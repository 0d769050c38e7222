"""The cascade (repulsor.evaluate) and its suites (repulsor.suites): resuming after a kill, and
which attacks a model gets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repulsor import evaluate, load_dataset
from repulsor.attacks import ATTACKS, channels_last_weights
from repulsor.errors import UserError
from repulsor.models import PrototypeClassifier
from repulsor.evaluation.suites import SUITES, specs_for


@pytest.fixture(scope="module")
def mlp():
    """A small MLP trained on the digits in about a second, with its first 120 test points."""
    torch.manual_seed(0)
    x, y = load_dataset("digits", "train")
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    xt, yt = load_dataset("digits", "test")
    return net.eval(), xt[:120], yt[:120]


class Killed(Exception):
    pass


def test_a_killed_cascade_resumes_at_the_next_attack(mlp, tmp_path, monkeypatch):
    net, x, y = mlp
    whole = evaluate(net, x, y, suite="paper", eps=0.1)  # PGD-20 then PGD-100, uninterrupted
    state = tmp_path / "state.safetensors"
    real_pgd, calls = ATTACKS["pgd"], []

    def dies_in_the_second_attack(*args, **kwargs):
        calls.append(kwargs["steps"])
        if kwargs["steps"] == 100:
            raise Killed
        return real_pgd(*args, **kwargs)

    monkeypatch.setitem(ATTACKS, "pgd", dies_in_the_second_attack)
    with pytest.raises(Killed):
        evaluate(net, x, y, suite="paper", eps=0.1, state_path=state)
    assert state.exists() and calls == [20, 100]

    calls.clear()

    def counts(*args, **kwargs):
        calls.append(kwargs["steps"])
        return real_pgd(*args, **kwargs)

    monkeypatch.setitem(ATTACKS, "pgd", counts)
    resumed = evaluate(net, x, y, suite="paper", eps=0.1, state_path=state)
    assert calls == [100]  # PGD-20 was not run again
    assert resumed["robust_accuracy"] == whole["robust_accuracy"]
    assert [a["accuracy"] for a in resumed["attacks"]] == [a["accuracy"] for a in whole["attacks"]]
    assert torch.equal(resumed["x_adv"], whole["x_adv"])


def test_a_state_of_another_protocol_is_not_reused(mlp, tmp_path):
    net, x, y = mlp
    state = tmp_path / "state.safetensors"
    evaluate(net, x, y, suite="paper", eps=0.1, state_path=state)
    other = evaluate(net, x, y, suite="paper", eps=0.05, state_path=state)
    assert other["robust_accuracy"] == evaluate(net, x, y, suite="paper", eps=0.05)["robust_accuracy"]
    assert all(a["eps"] == 0.05 for a in other["attacks"])


def test_representation_attacks_run_on_prototype_models_only(mlp):
    net, _, _ = mlp
    prototype = PrototypeClassifier(net, torch.eye(10), "cosine")
    linear_names = [s.name for s in specs_for("adaptive", net)]
    prototype_specs = specs_for("adaptive", prototype)
    assert not any("proto" in name for name in linear_names)
    assert [s.name for s in prototype_specs if s.needs_prototypes] == [
        s.name for s in SUITES["adaptive"] if s.needs_prototypes] and len(prototype_specs) == len(SUITES["adaptive"])
    assert len(linear_names) == len(SUITES["adaptive"]) - 2


def test_the_paper_loss_is_the_authors_on_prototype_models_and_ce_otherwise(mlp):
    net, _, _ = mlp
    prototype = PrototypeClassifier(net, torch.eye(10), "linf")
    assert {s.loss for s in specs_for("paper", net)} == {"ce"}
    assert {s.loss for s in specs_for("paper", prototype)} == {"proto_linf"}


def test_every_suite_names_registered_attacks():
    for name, specs in SUITES.items():
        for spec in specs:
            assert spec.attack in ATTACKS, (name, spec.name)


def test_an_attack_is_named_for_what_ran():
    """The paper suite's attacks on a linear head run cross-entropy (the paper's protocol for a softmax
    model): their names say ce, not the authors' loss; records written before 0.6.0 are shown so too."""
    from repulsor.evaluation.suites import shown_name, specs_for

    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    names = [(s.name, s.loss) for s in specs_for("paper", linear)]
    assert names == [("pgd-20 (ce)", "ce"), ("pgd-100 (ce)", "ce")]
    assert shown_name({"name": "pgd-20 (authors' loss)", "loss": "ce"}) == "pgd-20 (ce)"
    assert shown_name({"name": "pgd-20 (authors' loss)", "loss": "proto_linf"}) == "pgd-20 (authors' loss)"


def test_a_suite_records_which_points_it_left_correct():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(30, 1, 4, 4), torch.arange(30) % 3
    result = evaluate(model, x, y, suite="quick", eps=0.05)
    assert len(result["robust_indices"]) == round(result["robust_accuracy"] * 30)
    assert len(result["clean_indices"]) == round(result["clean_accuracy"] * 30)
    assert set(result["robust_indices"]) <= set(result["clean_indices"])
    with torch.no_grad():
        assert set(result["clean_indices"]) == set((model(x).argmax(1) == y).nonzero().flatten().tolist())


def test_the_l1_standard_suite_is_autoattacks_l1_version(mlp):
    """L1: APGD-CE with 5 restarts, APGD-T with 5 targets, FAB-T; Square has no L1 form and is not
    run (the record lists what ran). A budget covering the box leaves nothing, and every adversarial
    point stays in the L1 ball and the box."""
    from repulsor.evaluation.suites import L1_STANDARD, suite_specs
    from repulsor.attacks import geometry

    assert [(s.name, s.restarts, s.settings.get("n_targets")) for s in suite_specs("standard", "l1")] == [
        ("apgd-ce (5 restarts)", 5, None), ("apgd-t", 1, 5), ("fab-t", 1, 9)]
    assert suite_specs("adaptive", "l1")[:3] == L1_STANDARD and suite_specs("quick", "l1") == SUITES["quick"]
    net, x, y = mlp
    result = evaluate(net, x[:60], y[:60], suite="standard", eps=2.0, norm="l1", checks=False)
    assert [a["name"] for a in result["attacks"]] == [s.name for s in L1_STANDARD]
    assert all(a["norm"] == "l1" and a["status"] == "done" for a in result["attacks"])
    assert result["robust_accuracy"] < result["clean_accuracy"]
    x_adv = result["x_adv"]
    assert (geometry("l1").norm((x_adv - x[:60]).double()) <= 2.0 + 1e-4).all()
    assert evaluate(net, x[:30], y[:30], suite="standard", eps=40.0, norm="l1", checks=False)["robust_accuracy"] == 0.0


def colour_net():
    """A small untrained convolutional net on 3 x 16 x 16 images, with labels it predicts."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.rand(24, 3, 16, 16)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


def test_channels_last_weights_change_the_order_not_the_values_and_put_them_back():
    net, x, y = colour_net()
    filters = [p for p in net.parameters() if p.dim() == 4]
    storage = [p.data_ptr() for p in filters]
    with torch.no_grad():
        before = net(x)
    with channels_last_weights(net):
        assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in filters)
        with torch.no_grad():
            assert torch.allclose(net(x), before, atol=1e-5)
        x_adv = ATTACKS["pgd"](net, x, y, eps=8 / 255, alpha=2 / 255, steps=2)
        assert x_adv.is_contiguous()  # the input gradient comes back in the input's order
    assert [p.data_ptr() for p in filters] == storage and all(p.is_contiguous() for p in filters)
    with pytest.raises(Killed), channels_last_weights(net):
        raise Killed
    assert [p.data_ptr() for p in filters] == storage


def test_evaluate_holds_colour_filters_channels_last_and_gives_them_back(mlp):
    net, x, y = colour_net()
    storage = [p.data_ptr() for p in net.parameters()]
    assert evaluate(net, x, y, suite="quick")["memory_format"] == "channels_last"
    assert [p.data_ptr() for p in net.parameters()] == storage and all(p.is_contiguous() for p in net.parameters())
    assert evaluate(net, x, y, suite="quick", channels_last=False)["memory_format"] == "contiguous"
    digits, xd, yd = mlp
    assert evaluate(digits, xd, yd, suite="quick", eps=0.1)["memory_format"] == "contiguous"  # one channel
    with pytest.raises(UserError, match="channels_last must be True, False or None"):
        evaluate(net, x, y, channels_last="yes")


class ViewsItsFilters(nn.Module):
    """Weight standardisation written with ``view``: it raises on channels-last filters."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        w = self.conv.weight
        w = w - w.view(4, -1).mean(1).view(4, 1, 1, 1)
        return self.head(F.conv2d(x, w, self.conv.bias).mean((2, 3)))


def test_a_model_that_cannot_take_channels_last_filters_is_evaluated_as_it_is():
    torch.manual_seed(0)
    net, x = ViewsItsFilters().eval(), torch.rand(12, 3, 16, 16)
    with torch.no_grad():
        y = net(x).argmax(1)
    result = evaluate(net, x, y, suite="quick")
    assert result["memory_format"] == "contiguous" and result["clean_accuracy"] == 1.0
    assert all(p.is_contiguous() for p in net.parameters())


def test_a_surrogate_gets_its_own_filter_order():
    """The layout is decided for each model: a surrogate that cannot take channels-last filters is
    run as it is beside a model that can, and the other way round."""
    net, x, y = colour_net()
    torch.manual_seed(1)
    refusing = ViewsItsFilters().eval()
    result = evaluate(net, x, y, suite="quick", surrogate=refusing)
    assert result["memory_format"] == "channels_last" and result["attacks"][-1]["status"] == "done"
    result = evaluate(refusing, x, y, suite="quick", surrogate=net)
    assert result["memory_format"] == "contiguous" and result["attacks"][-1]["status"] == "done"
    assert all(p.is_contiguous() for p in [*net.parameters(), *refusing.parameters()])
