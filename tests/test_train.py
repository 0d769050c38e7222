"""The training loop end to end on the embedded digits data, and the methods plugged into it."""

import json
import math

import pytest
import torch

import repulsor
from repulsor.config import from_dict
from repulsor.data import DATASETS
from repulsor.errors import UserError
from repulsor.evaluate import load_test_split
from repulsor.methods import METHODS, TrainContext, mmc_centres, prototype_objective
from repulsor.models import build_model
from repulsor.train import lr_at, resolve_prototypes, head_distance, train

TINY = {
    "data": {"name": "digits"},
    "model": {"name": "mlp", "width": 0.25},
    "prototypes": {"dim": 16, "epochs": 20},
    "train": {"method": "prototype", "epochs": 2, "batch_size": 64, "lr": 0.05, "precision": "fp32",
              "eps": 0.1, "alpha": 0.025, "val_n": 100, "attack_steps": 2, "val_attack_steps": 2},
    "eval": {"n": 100, "eps": 0.1},
}


def tiny(**sections):
    raw = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        raw[section].update(values)
    return from_dict(raw)


def test_train_writes_run_and_results_match_loaded_model(tmp_path):
    run = train(tiny(), tmp_path / "run", quiet=True)
    results = json.loads((run / "results.json").read_text())
    assert results["dataset"] == "digits" and results["split"] == "test" and results["n"] == 100
    assert 0 <= results["clean_accuracy"] <= 1
    pgd = results["attacks"][0]
    assert {"name", "norm", "eps", "steps", "restarts", "n", "accuracy"} <= set(pgd)
    assert pgd["accuracy"] <= results["clean_accuracy"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["train_loss"]) and m["val_robust"] is not None for m in metrics)
    cost = json.loads((run / "training.json").read_text())["cost"]
    assert cost["epochs"] == 2 and cost["forward_passes_per_example"] == 1.0

    model = repulsor.load_model(run)
    assert not model.training
    x, y, _ = load_test_split(from_dict(TINY), 100)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).sum().item() / len(y)
    assert accuracy == results["clean_accuracy"]


def test_existing_run_is_not_overwritten(tmp_path):
    run = train(tiny(train={"epochs": 1}, eval={"after_train": False}), tmp_path / "run", quiet=True)
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny(), run, quiet=True)
    with pytest.raises(UserError, match="already finished"):
        train(None, run, resume=True, quiet=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny(train={"epochs": 3, "lr": 1e30, "schedule": "constant", "method": "ce"}, eval={"after_train": False})
    with pytest.raises(UserError, match="became nan|became inf"):
        train(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("schedule", ["cyclic", "onecycle", "multistep", "constant"])
def test_lr_schedules(schedule):
    cfg = tiny(train={"epochs": 10, "schedule": schedule, "lr": 0.1, "milestones": [5, 8]})
    values = [lr_at(cfg, e / 2) for e in range(21)]
    assert max(values) <= 0.1 + 1e-12 and min(values) >= 0
    if schedule == "cyclic":
        assert values[0] == 0 and values[8] == pytest.approx(0.1) and values[-1] == pytest.approx(0)
    if schedule == "multistep":
        assert values[0] == 0.1 and values[10] == pytest.approx(0.01) and values[16] == pytest.approx(0.001)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_gives_finite_loss_and_gradients(name):
    cfg = tiny(train={"method": name, "attack_steps": 2})
    method = METHODS[name]
    info = DATASETS["digits"]
    torch.manual_seed(0)
    prototypes = resolve_prototypes(cfg, method, info.num_classes)
    model = build_model(cfg.model, info, prototypes=prototypes, distance=head_distance(cfg, method)).train()
    x = torch.rand(16, 1, 8, 8)
    y = torch.arange(16) % 10
    loss, scores, passes = method.loss(TrainContext(model, model, cfg.train, seed=1), x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert scores.shape == (16, 10)
    assert passes.forward >= 1 and passes.backward >= 1
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname


def test_prototype_loss_is_zero_at_the_prototype():
    prototypes = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    for distance in ("cosine", "l2", "linf", "sqeuclid"):
        from repulsor.models import PrototypeClassifier

        head = PrototypeClassifier(torch.nn.Identity(), prototypes, distance)
        y = torch.arange(4)
        loss = prototype_objective(head(prototypes * (3 if distance == "cosine" else 1)), y, distance)
        assert torch.allclose(loss, torch.zeros(4), atol=1e-6), distance
        off = prototype_objective(head(prototypes.flip(0)), y, distance)
        assert (off > 0.1).all(), distance


def test_mmc_centres_are_a_regular_simplex():
    centres = mmc_centres(10, 32, scale=10.0)
    assert centres.shape == (10, 32)
    assert torch.allclose(centres.norm(dim=1), torch.full((10,), 10.0), atol=1e-5)
    cos = torch.nn.functional.normalize(centres, dim=1) @ torch.nn.functional.normalize(centres, dim=1).T
    off = cos[~torch.eye(10, dtype=bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / 9), atol=1e-5)


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny(eval={"after_train": False}), tmp_path / "run", quiet=True, tensorboard=True)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_clean", "val_robust", "lr"} <= tags
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]
