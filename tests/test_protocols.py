"""The authors' code, rebuilt as settings (prototypes, losses, rules, no normalisation) and its
evaluation paths as diagnostic protocols run by the one PGD (issue 30)."""

import math

import pytest
import torch
import torch.nn.functional as F

from repulsor.attacks import evaluating, pgd
from repulsor.config import from_dict
from repulsor.errors import UserError
from repulsor.evaluation.protocols import PROTOCOLS, QUIRKS, SOUND, code_ball, get_protocol, run_protocol
from repulsor.models import build_for_method
from repulsor.models.heads import Network, Normalize, PrototypeClassifier
from repulsor.prototypes import generate_prototypes
from repulsor.training.methods import METHODS, TrainContext, prototype_batch_loss

from conftest import TINY

MEAN, STD = (0.4, 0.5, 0.45), (0.25, 0.2, 0.3)


def _prototype_model(rule="dot_linf", normalize=False, seed=0):
    torch.manual_seed(seed)
    body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 12))
    norm = Normalize(MEAN, STD) if normalize else Normalize((0.0,) * 3, (1.0,) * 3)
    P = generate_prototypes(5, 12, metric="linf_sum", epochs=20, seed=seed)
    return PrototypeClassifier(Network(norm, body), P, rule).eval()


def _linear_model(seed=0):
    torch.manual_seed(seed)
    body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    return Network(Normalize(MEAN, STD), body).eval()


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


# ------------------------------------------------------------------ the code's model, as settings


def test_linf_sum_prototypes_grow_without_bound_and_are_seeded():
    P = generate_prototypes(10, 100, metric="linf_sum", epochs=100, seed=0)
    assert 50 < P.abs().max() < 120  # the code's "about +-73": unbounded, unlike every other metric
    assert torch.equal(P, generate_prototypes(10, 100, metric="linf_sum", epochs=100, seed=0))
    assert not torch.equal(P, generate_prototypes(10, 100, metric="linf_sum", epochs=100, seed=1))
    assert generate_prototypes(10, 100, metric="linf", epochs=100, seed=0).abs().max() <= 1


def test_code_objectives_compute_what_they_are_named_for():
    model = _prototype_model()
    x, y = _data(16)
    scores, z = model(x, return_embedding=True)
    P = model.prototypes[y]
    for objective, expected in [
        ("linf_distance", (z - P).abs().amax(1).mean()),
        # one cosine per output coordinate, across the batch: not Eq. 6's per-example cosine
        ("batch_cosine", torch.stack([1 - F.cosine_similarity(z[:, d], P[:, d], dim=0) for d in range(12)]).mean()),
    ]:
        cfg = from_dict({**TINY, "train": {**TINY["train"], "objective": objective},
                         "prototypes": {**TINY["prototypes"], "distance": "dot_linf"}}).train
        ctx = TrainContext(model, model, cfg)
        torch.testing.assert_close(prototype_batch_loss(ctx, scores, z, y), expected)


def test_batch_cosine_couples_the_examples_of_a_batch():
    model = _prototype_model()
    x, y = _data(16)
    cfg = from_dict({**TINY, "train": {**TINY["train"], "objective": "batch_cosine"},
                     "prototypes": {**TINY["prototypes"], "distance": "dot_l2"}}).train
    ctx = TrainContext(model, model, cfg)
    x0 = x.clone().requires_grad_(True)
    scores, z = model(x0, return_embedding=True)
    (grad,) = torch.autograd.grad(prototype_batch_loss(ctx, scores, z, y), x0)
    x1 = x.clone()
    x1[1:] = torch.rand_like(x1[1:])  # change every other example of the batch
    x1.requires_grad_(True)
    scores, z = model(x1, return_embedding=True)
    (other,) = torch.autograd.grad(prototype_batch_loss(ctx, scores, z, y), x1)
    assert not torch.allclose(grad[0], other[0])  # example 0's gradient depends on the rest of its batch


def test_code_settings_are_checked_in_one_line():
    with pytest.raises(UserError, match="no loss of its own"):
        from_dict({**TINY, "prototypes": {**TINY["prototypes"], "distance": "dot_linf"}})
    with pytest.raises(UserError, match="is not one of"):
        from_dict({**TINY, "train": {**TINY["train"], "objective": "inf"}})
    with pytest.raises(UserError, match="is not one of"):
        from_dict({**TINY, "prototypes": {**TINY["prototypes"], "distance": "dot"}})
    with pytest.raises(UserError, match="loss of prototype heads"):
        from_dict({**TINY, "train": {**TINY["train"], "method": "ce", "objective": "linf_distance"}})


def test_a_model_without_normalisation_feeds_raw_pixels_to_its_body():
    cfg = from_dict({**TINY, "model": {**TINY["model"], "normalize": False}})
    model = build_for_method(cfg, METHODS["prototype"], torch.randn(10, 16))
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(model.network.normalize(x), x)
    plain = build_for_method(from_dict(TINY), METHODS["prototype"], torch.randn(10, 16))
    assert not torch.equal(plain.network.normalize(x), x)


# ------------------------------------------------------------------ per-coordinate radii in the one PGD


def test_pgd_with_a_radius_per_coordinate_stays_in_that_box():
    model = _linear_model()
    x, y = _data(20)
    radius = torch.tensor([1 / 255, 4 / 255, 16 / 255]).view(1, 3, 1, 1)
    with evaluating(model):
        x_adv = pgd(model, x, y, eps=radius, alpha=2 / 255, steps=10, early_stop=True)
        same = pgd(model, x, y, eps=torch.full((1, 3, 1, 1), 8 / 255), alpha=2 / 255, steps=10, seed=3)
        scalar = pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, seed=3)
    assert ((x_adv - x).abs() <= radius + 1e-7).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert ((x_adv - x).abs().amax(dim=(0, 2, 3)) > 0.5 * radius.flatten()).all()  # every channel's radius is used
    assert torch.equal(same, scalar)  # a uniform radius tensor is the scalar radius
    with pytest.raises(UserError, match="L-inf threat model"):
        pgd(model, x, y, eps=radius, alpha=0.1, steps=1, norm="l2")


def test_the_ball_reproduces_the_codes_projection_outside_the_box():
    g = torch.Generator().manual_seed(0)
    fed = torch.rand(2000, generator=g) * 6 - 3  # normalised values, many outside [0, 1]
    radius = torch.full_like(fed, 0.3)
    centre, half, a, b = code_ball(fed, radius)
    assert centre.min() >= 0 and centre.max() <= 1 and (half >= 0).all()
    for _ in range(5):
        v = torch.rand(2000, generator=g) * 8 - 4
        code = torch.min(torch.max(v, fed - radius), fed + radius).clamp(0, 1)
        ours = torch.min(torch.max(v, centre - half), centre + half).clamp(0, 1)
        torch.testing.assert_close(ours, code, rtol=0, atol=1e-6)
        torch.testing.assert_close(code.clamp(a, b), code)


# ------------------------------------------------------------------ the paths


def test_protocols_are_labelled_diagnostic_and_are_not_suites():
    from repulsor.evaluation.suites import SUITES

    assert all(name.startswith("diagnostic:") for name in PROTOCOLS)
    assert not set(PROTOCOLS) & set(SUITES)
    assert set(get_protocol("authors-path-b").quirks()) == {"fp16", "eps_space", "clamp_space", "mismatch",
                                                             "code_rule", "per_batch"}
    assert set(get_protocol("authors-path-a").quirks()) == {"random_start", "fp16", "code_rule", "per_batch"}


def test_bad_protocol_requests_fail_in_one_line():
    model, linear = _prototype_model(), _linear_model()
    x, y = _data(8)
    with pytest.raises(UserError, match="unknown diagnostic protocol.*authors-path-a"):
        run_protocol(model, x, y, protocol="path-c", loss="inf")
    with pytest.raises(UserError, match="no quirk 'mismatch'"):
        run_protocol(model, x, y, protocol="authors-path-a", loss="inf", off=["mismatch"])
    with pytest.raises(UserError, match="needs a prototype model"):
        run_protocol(linear, x, y, protocol="authors-path-a", loss="inf")
    with pytest.raises(UserError, match="unknown loss setting"):
        run_protocol(model, x, y, protocol="authors-path-a", loss="cw")
    with pytest.raises(UserError, match="needs the data set's mean and std"):
        run_protocol(model, x, y, protocol="authors-path-b", loss="inf")
    with pytest.raises(UserError, match="crafts its examples on a cross-entropy model"):
        run_protocol(model, x, y, protocol="authors-transfer", loss="inf")


@pytest.mark.parametrize("loss", ["inf", "mean"])
def test_paths_differ_only_by_their_switches(loss):
    """With every quirk off, path A and path B are the same sound PGD: identical outcomes."""
    model = _prototype_model()
    x, y = _data(40)
    a = get_protocol("authors-path-a")
    b = get_protocol("authors-path-b")
    sound_a = run_protocol(model, x, y, protocol=a, loss=loss, mean=MEAN, std=STD, off=a.quirks())
    sound_b = run_protocol(model, x, y, protocol=b, loss=loss, mean=MEAN, std=STD, off=b.quirks())
    keys = ("accuracy", "accuracy_at_start", "accuracy_as_fed", "clean_accuracy")
    assert sound_a["switches"] == {**sound_b["switches"], "transfer": False}
    assert all(sound_a[k] == sound_b[k] for k in keys)
    assert sound_a["accuracy_as_fed"] == sound_a["clean_accuracy"]  # the sound path scores the model as it is
    assert sound_a["accuracy"] <= sound_a["clean_accuracy"]


def test_mismatch_changes_nothing_for_a_model_that_normalises_itself():
    model = _prototype_model(rule="cosine", normalize=True)
    x, y = _data(40)
    on = run_protocol(model, x, y, protocol="authors-path-b", loss="inf", mean=MEAN, std=STD, off=["fp16"])
    off = run_protocol(model, x, y, protocol="authors-path-b", loss="inf", mean=MEAN, std=STD, off=["fp16", "mismatch"])
    assert abs(on["accuracy_as_fed"] - off["accuracy_as_fed"]) <= 1 / 40
    raw = _prototype_model(rule="cosine", normalize=False)
    fed_raw = run_protocol(raw, x, y, protocol="authors-path-b", loss="inf", mean=MEAN, std=STD, off=["fp16"])
    assert fed_raw["switches"]["mismatch"] and fed_raw["n"] == 40


def test_normalised_clamp_changes_the_starting_image_and_path_a_starts_clean():
    model = _prototype_model()
    x, y = _data(40)
    a = run_protocol(model, x, y, protocol="authors-path-a", loss="inf", off=["fp16"], mean=MEAN, std=STD)
    assert a["accuracy_at_start"] == a["accuracy_as_fed"]  # pixel clamp: the clean image is its own start
    code_rule = a["switches"]["code_rule"] and a["switches"]["per_batch"] and not a["switches"]["random_start"]
    assert code_rule and a["protocol"] == "diagnostic:authors-path-a"


def test_transfer_path_crafts_on_the_source_and_scores_the_target():
    model, source = _prototype_model(), _linear_model()
    x, y = _data(40)
    out = run_protocol(model, x, y, protocol="authors-transfer", loss="inf", surrogate=source)
    assert out["switches"]["source_unnormalised"] and out["accuracy_at_start"] == out["accuracy_as_fed"]
    sound = run_protocol(model, x, y, protocol="authors-transfer", loss="inf", surrogate=source,
                         off=["source_unnormalised", "code_rule", "per_batch"])
    assert sound["accuracy_as_fed"] == sound["clean_accuracy"]


def test_fp16_quirk_stores_weights_activations_and_gradients_in_half_precision():
    from repulsor.evaluation.protocols import HalfStorage, View

    model = _prototype_model()
    view = View(model, torch.tensor(MEAN), torch.tensor(STD), normalised=False, mismatch=False, rule=None, fp16=True)
    x = torch.rand(6, 3, 8, 8, requires_grad=True)
    z = view.embed(x)
    assert z.dtype == torch.float32 and torch.equal(z, z.half().float())  # fp16 values
    (grad,) = torch.autograd.grad(z.abs().amax(1).mean() / 6, x)
    assert torch.equal(grad, grad.half().float())
    half = HalfStorage(model.network.body)
    weight = half.network[1].weight
    assert torch.equal(weight, weight.half().float()) and not torch.equal(model.network.body[1].weight, weight)
    # A gradient below float16's smallest step (2**-24) is lost, as in apex O2 with a loss scale of 1.
    tiny = torch.full((1, 3, 8, 8), 1e-9, requires_grad=True)
    (lost,) = torch.autograd.grad((half(tiny) * 1e-9).sum(), tiny)
    assert (lost == 0).all()
    assert set(QUIRKS) == set(SOUND)


def test_fast_body_output_scale_multiplies_its_output_and_travels_with_the_config():
    from repulsor.models.build import body_kwargs, build_body
    from repulsor.data import DATASETS

    torch.manual_seed(0)
    published = build_body("fast_cifar", in_channels=3, out_dim=10, width=0.125).eval()
    torch.manual_seed(0)
    unit = build_body("fast_cifar", in_channels=3, out_dim=10, width=0.125, output_scale=1.0).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), 9 * published(x), rtol=1e-5, atol=1e-6)
    cfg = from_dict({"data": {"name": "cifar10"}, "model": {"name": "fast_cifar", "output_scale": 1.0}})
    assert body_kwargs(cfg.model, DATASETS["cifar10"], 10)["output_scale"] == 1.0
    assert "output_scale" not in body_kwargs(from_dict({"data": {"name": "cifar10"}, "model": {"name": "fast_cifar"}}).model,
                                             DATASETS["cifar10"], 10)
