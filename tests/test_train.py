"""The training loop end to end on the embedded digits data (the methods' losses: test_methods.py)."""

import json
import math

import pytest
import torch

import repulsor
from repulsor.config import from_dict
from repulsor.errors import UserError
from repulsor.evaluation.run import load_test_split
from repulsor.training.methods import METHODS
from repulsor.models import build_for_method
from repulsor.training.loop import train
from repulsor.training.schedule import lr_at
from repulsor.training.validation import catastrophic_overfitting

from conftest import TINY as BASE

# The shared tiny run, trained for two epochs and validated and evaluated on 100 points.
TINY = {**BASE, "prototypes": {**BASE["prototypes"], "epochs": 20},
        "train": {**BASE["train"], "epochs": 2, "val_n": 100}, "eval": {"n": 100, "eps": 0.1}}


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


def test_pcl_run_classifies_by_logits_and_exports_its_network(tmp_path):
    from repulsor.export import export_model
    from repulsor.models import Network, PCLClassifier

    run = train(tiny(train={"method": "pcl", "epochs": 3}, eval={"after_train": False}), tmp_path / "run", quiet=True)
    model = repulsor.load_model(run)
    assert isinstance(model, PCLClassifier) and isinstance(model.network, Network)
    x, y, _ = load_test_split(from_dict(TINY), 100)
    with torch.no_grad():
        logits, features = model(x, return_features=True)
        assert torch.equal(model(x), model.network(x)) and torch.equal(logits, model.network(x))
    assert [f.shape[1] for f in features] == [c.shape[1] for c in model.centres]
    assert (logits.argmax(1) == y).float().mean() > 0.5  # it learned something in 3 epochs
    cfg = from_dict(TINY)
    written = export_model(model, cfg, tmp_path / "export")
    assert written["spec"]["head"] == "linear" and written["max_abs_diff"] <= 1e-5


def _scripted_validation(monkeypatch, robust: list[float]):
    """Make the loop's validation report the given PGD accuracies, epoch by epoch, and keep a copy
    of the weights it was shown at each epoch. The detector and the selection then see one history
    on every CPU: what a CPU's kernels do to an FGSM trajectory no longer decides the test."""
    import repulsor.training.loop as loop

    seen = []

    def validate(model, x_val, y_val, cfg, device):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"val_clean": 0.9, "val_robust": robust[len(seen) - 1]}

    monkeypatch.setattr(loop, "validate", validate)
    return seen


def _fgsm_run(tmp_path, epochs: int):
    cfg = tiny(train={"method": "fgsm_rs", "epochs": epochs, "val_n": 400, "schedule": "constant"},
               eval={"after_train": False})
    run = train(cfg, tmp_path / "run", quiet=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, metrics, json.loads((run / "training.json").read_text())


def test_fgsm_rs_stops_on_catastrophic_overfitting_and_keeps_the_peak_epoch(tmp_path, monkeypatch):
    """Validation PGD accuracy 30% -> 45% -> 40% -> 10% on 400 points: a collapse below half the
    peak and beyond the noise. Training stops there and the final weights are those of the peak
    epoch (Wong et al.'s rule), not the last ones."""
    seen = _scripted_validation(monkeypatch, [0.30, 0.45, 0.40, 0.10, 0.05, 0.05])
    run, metrics, record = _fgsm_run(tmp_path, epochs=6)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1].get("catastrophic_overfitting") and "catastrophic overfitting" in metrics[-1]["stopped"]
    assert not any(m.get("catastrophic_overfitting") for m in metrics[:-1])
    assert record["catastrophic_overfitting"] and record["selected"] == "best (epoch 2)"
    assert record["cost"]["epochs"] == 4
    # the validation accuracy that chose the epoch carries its interval on the points it was measured on
    from repulsor.formats import wilson_interval

    n_val = record["val_n"]  # val_n = 400 asked; the digits' validation split holds fewer
    assert record["best_val_metric"] == 0.45 and 0 < n_val <= 400
    assert record["best_val_metric_ci95"] == pytest.approx(list(wilson_interval(round(0.45 * n_val), n_val)), abs=1e-6)
    final = repulsor.load_model(run).state_dict()
    for name, tensor in seen[1].items():
        assert torch.equal(final[name], tensor), name
    assert any(not torch.equal(final[name], seen[3][name]) for name in final)  # not the last epoch's
    assert "WARN catastrophic overfitting" in (run / "log.txt").read_text()


def test_fgsm_rs_runs_to_the_end_when_validation_only_dips(tmp_path, monkeypatch):
    """The control: dips that keep more than half of the peak do not stop a run."""
    _scripted_validation(monkeypatch, [0.30, 0.45, 0.25, 0.40, 0.30])
    _, metrics, record = _fgsm_run(tmp_path, epochs=5)
    assert len(metrics) == 5 and not any(m.get("catastrophic_overfitting") for m in metrics)
    assert record["stopped"] is None and record["selected"] == "last" and not record["catastrophic_overfitting"]


def test_catastrophic_overfitting_rule_is_relative_and_ignores_noise():
    # CIFAR-10 at small scale: a 14% peak collapsing to 4.4% on 250 points is a collapse ...
    assert catastrophic_overfitting(0.14, 0.044, 250, 0.5)
    # ... a fall of the same size on 20 points is noise, and so is a dip that keeps 60% of the peak.
    assert not catastrophic_overfitting(0.14, 0.044, 20, 0.5)
    assert not catastrophic_overfitting(0.80, 0.50, 10000, 0.5)
    assert catastrophic_overfitting(0.80, 0.39, 10000, 0.5)
    assert not catastrophic_overfitting(0.0, 0.0, 1000, 0.5)


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny(eval={"after_train": False}), tmp_path / "run", quiet=True, tensorboard=True)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_clean", "val_robust", "lr"} <= tags
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]


def test_warmup_moves_the_cyclic_peak():
    cfg = tiny(train={"epochs": 10, "lr": 1.0, "lr_min": 0.1, "warmup": 0.25})
    rates = [lr_at(cfg, e / 10) for e in range(101)]
    assert max(rates) == pytest.approx(1.0) and rates.index(max(rates)) == 25
    assert rates[0] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.1)


def test_bias_groups_train_at_their_scale():
    from repulsor.training.schedule import make_optimizer

    model = build_for_method(tiny(), METHODS["ce"], None)
    plain = make_optimizer(model, tiny().train)
    assert len(plain.param_groups) == 1
    t = tiny(train={"bias_lr_scale": 64.0, "weight_decay": 1e-3}).train
    groups = make_optimizer(model, t).param_groups
    biases = [name for name, p in model.named_parameters() if any(p is q for q in groups[1]["params"])]
    assert biases and all(name.endswith("bias") for name in biases)
    assert groups[1]["lr_scale"] == 64.0 and groups[1]["weight_decay"] == pytest.approx(1e-3 / 64)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lookahead_pulls_towards_the_slow_weights():
    from repulsor.training.schedule import Lookahead

    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    look = Lookahead(model, every=5, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    look.step(model, 4, 0.5)  # not a multiple of every: nothing happens
    assert torch.equal(model.weight, start["weight"] + 1)
    look.step(model, 5, 0.5)
    d = 0.9 ** 5 * 0.5 ** 3
    torch.testing.assert_close(model.weight, start["weight"] * d + (start["weight"] + 1) * (1 - d))
    torch.testing.assert_close(look.state()["lookahead.weight"], model.weight)


@pytest.mark.slow
def test_fast_cifar_recipe_trains_and_resumes_exactly(tmp_path, shared_data):
    """The fast recipe's pieces together (whitening fit, bias groups, lookahead, label smoothing,
    reflect-padded translations, alternating flips) on a Fashion-MNIST subset: interrupted inside epoch 2 and resumed, the run ends
    with exactly the weights of an uninterrupted one (the lookahead's slow weights are in the
    checkpoint)."""
    import os
    import signal
    import threading
    import time

    from repulsor.errors import Interrupted

    raw = {"data": {"name": "fashion_mnist", "data_dir": str(shared_data / "fashion_mnist"), "train_subset": 2048,
                    "augment": "crop_flip", "crop_padding": 2, "padding": "reflect", "flip": "alternate"},
           "model": {"name": "fast_cifar", "width": 0.125},
           "train": {"method": "ce", "epochs": 2, "batch_size": 64, "lr": 1.5, "lr_min": 0.1, "warmup": 0.23,
                     "momentum": 0.85, "nesterov": True, "weight_decay": 2e-6, "bias_lr_scale": 64.0,
                     "label_smoothing": 0.2, "lookahead_every": 3, "precision": "fp32", "val_n": 100,
                     "eps": 0.1, "alpha": 0.025, "val_attack_steps": 2},
           "eval": {"after_train": False}}
    full = train(from_dict(raw), tmp_path / "full", quiet=True)

    part = tmp_path / "part"
    last = part / "checkpoints" / "last.safetensors"

    def interrupt_in_epoch_2():
        while not last.exists():
            time.sleep(0.005)
        time.sleep(0.05)  # a few steps into epoch 2
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt_in_epoch_2)
    watcher.start()
    with pytest.raises(Interrupted, match="--resume"):
        train(from_dict(raw), part, quiet=True)
    watcher.join()
    assert not (part / "model.safetensors").exists()
    train(None, part, resume=True, quiet=True)
    a, b = repulsor.load_model(full).state_dict(), repulsor.load_model(part).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["val_clean"] > 0.5  # two epochs of 2048 images already learn something


def test_auto_precision_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch):
    import repulsor.runtime as runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("auto", cpu) is None  # fp32: bf16 is 10-20x slower without AVX-512 BF16
    assert runtime.resolve_precision("bf16", cpu) == torch.bfloat16  # asked for explicitly: still honoured
    assert runtime.precision_name(None) == "fp32"


def test_validation_tracks_figure_4s_losses_beside_the_selection_attack(tmp_path):
    from repulsor.training.validation import validate

    cfg = tiny(train={"method": "prototype", "epochs": 1, "val_losses": ["proto_linf", "ce"]},
               eval={"after_train": False})
    run = train(cfg, tmp_path / "run", quiet=True)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_robust", "val_robust_proto_linf", "val_robust_ce"} <= set(record)
    # The extra losses are the same PGD with another loss: against the model they were recorded for,
    # they give exactly what a fresh call gives, and the selection number is the CW one, unchanged.
    model = repulsor.load_model(run)
    x_val, y_val = torch.rand(40, 1, 8, 8), torch.arange(40) % 10
    plain = validate(model, x_val, y_val, tiny(train={"method": "prototype"}), torch.device("cpu"))
    both = validate(model, x_val, y_val, cfg, torch.device("cpu"))
    assert both["val_robust"] == plain["val_robust"] and both["val_clean"] == plain["val_clean"]
    assert set(both) == {"val_clean", "val_robust", "val_robust_proto_linf", "val_robust_ce"}
    assert all(0 <= both[k] <= both["val_clean"] for k in both if k.startswith("val_robust"))


def test_validation_losses_are_checked_against_the_method():
    with pytest.raises(UserError, match="not one of"):
        tiny(train={"val_losses": ["fgsm"]})
    with pytest.raises(UserError, match="attacks a prototype head"):
        tiny(train={"method": "ce", "val_losses": ["proto_linf"]})
    assert tiny(train={"method": "ce", "val_losses": ["ce", "dlr"]}).train.val_losses == ["ce", "dlr"]
