"""Prototype generation (bounded Eq. 5), statistics and files."""

import math

import pytest
import torch

from repulsor.errors import UserError
from repulsor.prototypes import (check_prototypes, generate_prototypes, load_prototypes, prototype_stats,
                                 save_prototypes)

METRICS = ["cosine", "l2", "linf"]


@pytest.mark.parametrize("metric", METRICS)
def test_deterministic_per_seed(metric):
    a = generate_prototypes(10, 16, metric=metric, epochs=20, seed=3)
    b = generate_prototypes(10, 16, metric=metric, epochs=20, seed=3)
    c = generate_prototypes(10, 16, metric=metric, epochs=20, seed=4)
    assert a.dtype == torch.float32 and a.shape == (10, 16) and a.device.type == "cpu"
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_independent_of_global_rng_and_grad_mode():
    ref = generate_prototypes(6, 8, metric="l2", epochs=10)
    torch.manual_seed(123)
    with torch.no_grad():
        assert torch.equal(generate_prototypes(6, 8, metric="l2", epochs=10), ref)
    with torch.inference_mode():
        assert torch.equal(generate_prototypes(6, 8, metric="l2", epochs=10), ref)


def _separation(stats, metric):
    """A number that grows with separation, for each metric."""
    return {"cosine": -stats["max_cosine"], "l2": stats["min_l2"], "linf": stats["min_linf"]}[metric]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k,D", [(10, 100), (10, 5), (100, 50)])
def test_separation_grows_with_paper_settings(metric, k, D):
    start = prototype_stats(generate_prototypes(k, D, metric=metric, epochs=0))
    end = prototype_stats(generate_prototypes(k, D, metric=metric, epochs=100, lr=0.01))
    assert _separation(end, metric) > _separation(start, metric) + 0.01


@pytest.mark.parametrize("metric", METRICS)
def test_bounded_even_with_long_large_steps(metric):
    P = generate_prototypes(12, 8, metric=metric, epochs=2000, lr=0.1)
    assert torch.isfinite(P).all()
    if metric == "linf":
        assert P.abs().max() <= 1.0
        assert prototype_stats(P)["min_linf"] > 1.0
    else:
        norms = P.norm(dim=1)
        assert (norms <= 1 + 1e-5).all() and (norms >= 1 - 1e-5).all()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("k,D", [(10, 100), (10, 9), (5, 4), (3, 2)])
def test_sphere_prototypes_well_separated_when_k_at_most_D_plus_1(metric, k, D):
    # The optimum is the regular simplex, with every cosine -1/(k-1).
    stats = prototype_stats(generate_prototypes(k, D, metric=metric))
    assert stats["max_cosine"] < 0
    assert stats["max_cosine"] < -1 / (k - 1) + 0.05


def test_linf_prototypes_reach_the_box_limit():
    stats = prototype_stats(generate_prototypes(10, 100, metric="linf"))
    assert stats["min_linf"] == pytest.approx(2.0)


def test_stats_on_a_known_set():
    P = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    s = prototype_stats(P)
    assert s["min_l2"] == pytest.approx(math.sqrt(2))
    assert s["mean_l2"] == pytest.approx((2 * math.sqrt(2) + 2) / 3)
    assert s["min_linf"] == pytest.approx(1.0)
    assert s["mean_linf"] == pytest.approx(4 / 3)
    assert s["max_cosine"] == pytest.approx(0.0, abs=1e-12)
    assert all(isinstance(v, float) for v in s.values())


def test_save_load_round_trip(tmp_path):
    P = generate_prototypes(5, 7, metric="cosine", epochs=3, lr=0.01, seed=2)
    meta = {"metric": "cosine", "epochs": 3, "lr": 0.01, "seed": 2}
    path = tmp_path / "prototypes.safetensors"
    save_prototypes(path, P, meta)
    P2, meta2 = load_prototypes(path)
    assert torch.equal(P, P2)
    assert meta2 == {"k": 5, "D": 7, "metric": "cosine", "epochs": 3, "lr": 0.01, "seed": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["prototypes.safetensors"]  # no temp file left


def test_load_rejects_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="nothere.safetensors"):
        load_prototypes(tmp_path / "nothere.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(UserError, match="bad.safetensors"):
        load_prototypes(bad)
    good = tmp_path / "good.safetensors"
    save_prototypes(good, torch.zeros(3, 4), {})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated.safetensors"):
        load_prototypes(truncated)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(2, 2)}, str(other))
    with pytest.raises(UserError, match="other.safetensors.*'prototypes'"):
        load_prototypes(other)


def test_check_prototypes():
    P = torch.zeros(10, 100)
    check_prototypes(P, 10, 100, "p.safetensors")
    with pytest.raises(UserError, match=r"p.safetensors have k=10, D=100; the model needs k=100, D=100"):
        check_prototypes(P, 100, 100, "p.safetensors")
    with pytest.raises(UserError, match="D=50"):
        check_prototypes(P, 10, 50, "p.safetensors")


@pytest.mark.parametrize("kwargs,word", [
    ({"num_classes": 1, "dim": 10}, "num_classes"),
    ({"num_classes": 10, "dim": 1}, "dim"),
    ({"num_classes": 10, "dim": 10, "metric": "l1"}, "metric"),
    ({"num_classes": 10, "dim": 10, "epochs": -1}, "epochs"),
    ({"num_classes": 10, "dim": 10, "lr": 0.0}, "lr"),
    ({"num_classes": 10, "dim": 10, "lr": float("nan")}, "lr"),
    ({"num_classes": 2.5, "dim": 10}, "num_classes"),
])
def test_invalid_arguments(kwargs, word):
    with pytest.raises(UserError, match=word):
        generate_prototypes(**kwargs)
