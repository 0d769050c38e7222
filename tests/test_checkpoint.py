"""Checkpoints: exact round trips, atomic writes, corruption reported clearly."""

import os

import pytest
import torch

from repulsor.store import files as ckpt
from repulsor.errors import UserError


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


def test_model_and_optimizer_round_trip_exact(tmp_path):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        optimizer.step()
    tensors = ckpt.model_state(model)
    opt_tensors, opt_meta = ckpt.optimizer_state(optimizer)
    ckpt.save_tensors(tmp_path / "c.safetensors", {**tensors, **opt_tensors}, {"optimizer": opt_meta, "epoch": 3})

    loaded, meta = ckpt.load_tensors(tmp_path / "c.safetensors")
    assert meta["epoch"] == 3
    clone = small_model()
    clone_opt = torch.optim.SGD(clone.parameters(), lr=0.5)
    ckpt.load_model_state(clone, loaded, tmp_path / "c.safetensors")
    ckpt.load_optimizer_state(clone_opt, loaded, meta["optimizer"])
    for a, b in zip(model.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(a, b)
    assert clone_opt.param_groups[0]["lr"] == 0.1
    # The next step is bitwise the same, so momentum buffers were restored exactly.
    x = torch.randn(16, 4)
    for m, o in ((model, optimizer), (clone, clone_opt)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_mismatched_model_is_a_user_error(tmp_path):
    ckpt.save_tensors(tmp_path / "c.safetensors", ckpt.model_state(small_model()), {})
    tensors, _ = ckpt.load_tensors(tmp_path / "c.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 5))
    with pytest.raises(UserError, match="does not match the model"):
        ckpt.load_model_state(other, tensors, tmp_path / "c.safetensors")


def test_corrupt_and_missing_files(tmp_path):
    path = tmp_path / "c.safetensors"
    ckpt.save_tensors(path, {"a": torch.ones(100)}, {"x": 1})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(UserError, match="corrupt"):
        ckpt.load_tensors(path)
    with pytest.raises(UserError, match="does not exist"):
        ckpt.load_tensors(tmp_path / "nope.safetensors")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(UserError, match="corrupt"):
        ckpt.read_json(tmp_path / "bad.json")


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    ckpt.atomic_write_json(path, {"v": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UserError, match="No space left"):
        ckpt.atomic_write_json(path, {"v": 2})
    assert ckpt.read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_unwritable_folder(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file" / "sub" / "x.json"
        (tmp_path / "file").write_text("a file, not a folder")
    else:
        os.chmod(tmp_path, 0o500)
        target = tmp_path / "x.json"
    with pytest.raises(UserError, match="cannot write"):
        ckpt.atomic_write_json(target, {})
