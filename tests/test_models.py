"""Model bodies, normalisation and the prototype head."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from repulsor.errors import UserError
from repulsor.models import (DISTANCES, MODELS, Network, Normalize, PrototypeClassifier, build_body,
                             build_model)
from repulsor.models.pcl import feature_taps

# (name, input shape C,H,W, extra keyword arguments): tiny widths keep each case well under
# a second on one thread.
BODIES = [
    ("resnet18", (3, 32, 32), {"width": 0.125}),
    ("preact_resnet18", (3, 32, 32), {"width": 0.125}),
    ("wrn", (3, 32, 32), {"width": 0.25, "depth": 10, "widen_factor": 1}),
    ("small_cnn", (1, 28, 28), {"width": 0.25}),
    ("mlp", (1, 8, 8), {"width": 0.125}),
    ("fast_cifar", (3, 32, 32), {"width": 0.125}),
]


def test_registry_covers_every_body():
    assert sorted(MODELS) == sorted(name for name, _, _ in BODIES)


@pytest.mark.parametrize("name,shape,kwargs", BODIES, ids=[b[0] for b in BODIES])
def test_body_shape_finite_and_every_parameter_learns(name, shape, kwargs):
    torch.manual_seed(0)
    body = build_body(name, in_channels=shape[0], out_dim=7, input_size=shape[1:], **kwargs)
    x = torch.randn(4, *shape)
    out = body(x)
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for pname, p in body.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"


@pytest.mark.parametrize("name,shape,kwargs", BODIES, ids=[b[0] for b in BODIES])
def test_body_channels_last_and_bf16_autocast(name, shape, kwargs):
    torch.manual_seed(0)
    body = build_body(name, in_channels=shape[0], out_dim=5, input_size=shape[1:], **kwargs).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        ref = body(x)
        body_cl = body.to(memory_format=torch.channels_last)
        out_cl = body_cl(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = body_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)
    assert out_bf.shape == (2, 5) and torch.isfinite(out_bf.float()).all()


@pytest.mark.parametrize("hw", [28, 8])
def test_resnets_take_small_inputs(hw):
    for name in ("resnet18", "preact_resnet18"):
        body = build_body(name, in_channels=1, out_dim=3, width=0.0625)
        assert body(torch.rand(2, 1, hw, hw)).shape == (2, 3)


def test_full_size_parameter_counts():
    # The published sizes: ResNet-18 11.2M, WRN-34-10 46.2M; a wrong stage width shows here.
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(build_body("resnet18", in_channels=3, out_dim=10)) / 1e6, 1) == 11.2
    assert round(count(build_body("wrn", in_channels=3, out_dim=10)) / 1e6, 1) == 46.2


def test_build_body_rejects_bad_arguments():
    with pytest.raises(UserError, match="resnet18"):
        build_body("resnet19", in_channels=3, out_dim=10)
    with pytest.raises(UserError, match="width"):
        build_body("resnet18", in_channels=3, out_dim=10, width=0)
    with pytest.raises(UserError, match="depth"):
        build_body("wrn", in_channels=3, out_dim=10, depth=12)
    with pytest.raises(UserError, match="out_dim"):
        build_body("mlp", in_channels=1, out_dim=0)


def test_normalize_is_applied():
    torch.manual_seed(0)
    body = build_body("mlp", in_channels=3, out_dim=4, width=0.125, input_size=(8, 8))
    plain = Network(Normalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), body)
    normed = Network(Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), body)
    x = torch.rand(3, 3, 8, 8)
    assert not torch.allclose(plain(x), normed(x))
    expected = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(normed.normalize(x), expected)
    assert normed.normalize.mean.shape == (1, 3, 1, 1)
    assert [n for n, _ in normed.normalize.named_parameters()] == []
    with pytest.raises(UserError, match="std"):
        Normalize((0.5,), (0.0,))


def _classifier(distance, k=5, D=6):
    torch.manual_seed(0)
    body = build_body("mlp", in_channels=1, out_dim=D, width=0.125, input_size=(8, 8))
    P = torch.randn(k, D)
    return PrototypeClassifier(Network(Normalize((0.5,), (0.5,)), body), P, distance), P


@pytest.mark.parametrize("distance", DISTANCES)
def test_prototype_scores_match_direct_computation(distance):
    model, P = _classifier(distance)
    x = torch.rand(16, 1, 8, 8)
    z = model.embed(x)
    assert z.shape == (16, 6)
    s = model(x)
    assert s.shape == (16, 5) and s.dtype == torch.float32
    diff = z[:, None, :] - P[None, :, :]
    direct = {
        "cosine": F.cosine_similarity(z[:, None, :], P[None, :, :], dim=2),
        "l2": -diff.norm(dim=2),
        "linf": -diff.abs().amax(dim=2),
        "sqeuclid": -(diff ** 2).sum(2),
        # the authors' code's rules: the output divided by its L-inf / L2 norm, dotted with raw prototypes
        "dot_linf": (z / z.abs().amax(1, keepdim=True)) @ P.T,
        "dot_l2": (z / z.norm(dim=1, keepdim=True)) @ P.T,
    }[distance]
    torch.testing.assert_close(s, direct, rtol=1e-4, atol=1e-4)
    assert torch.equal(s.argmax(1), direct.argmax(1))
    if distance in ("l2", "linf", "sqeuclid"):
        nearest = {"l2": diff.norm(dim=2), "sqeuclid": diff.norm(dim=2),
                   "linf": diff.abs().amax(dim=2)}[distance].argmin(1)
        assert torch.equal(s.argmax(1), nearest)


@pytest.mark.parametrize("distance", DISTANCES)
def test_prototype_scores_have_input_gradients(distance):
    model, _ = _classifier(distance)
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x)[:, 0].sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_prototypes_are_a_fixed_buffer():
    model, P = _classifier("cosine")
    assert "prototypes" in dict(model.named_buffers())
    assert all("prototypes" not in n for n, _ in model.named_parameters())
    assert "prototypes" in model.state_dict()
    torch.testing.assert_close(model.prototypes, P)
    with pytest.raises(UserError, match="distance"):
        PrototypeClassifier(model.network, P, "manhattan")


@pytest.mark.parametrize("distance", DISTANCES)
def test_prototype_classifier_bf16_autocast_gives_float32_scores(distance):
    model, _ = _classifier(distance)
    model.eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.embed(x)
        s = model(x)
    assert z.shape == (4, 6)
    assert s.dtype == torch.float32 and s.shape == (4, 5) and torch.isfinite(s).all()


INFO = SimpleNamespace(name="tiny", num_classes=4, shape=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_build_model_linear_and_prototype_heads():
    cfg = SimpleNamespace(name="resnet18", width=0.0625, depth=None, widen_factor=None)
    x = torch.rand(2, 3, 16, 16)
    plain = build_model(cfg, INFO)
    assert isinstance(plain, Network) and plain(x).shape == (2, 4)
    P = torch.randn(4, 12)
    proto = build_model(cfg, INFO, prototypes=P, distance="linf")
    assert isinstance(proto, PrototypeClassifier)
    assert proto.embed(x).shape == (2, 12) and proto(x).shape == (2, 4)
    # Only ``name`` is required of the config object.
    assert build_model(SimpleNamespace(name="mlp"), INFO)(x).shape == (2, 4)
    wide = build_model(SimpleNamespace(name="wrn", width=0.25, depth=10, widen_factor=1), INFO)
    assert wide(x).shape == (2, 4)


def test_build_model_rejects_mismatches():
    cfg = SimpleNamespace(name="mlp", width=0.125)
    with pytest.raises(UserError, match="k=3"):
        build_model(cfg, INFO, prototypes=torch.randn(3, 12), distance="l2")
    with pytest.raises(UserError, match="distance"):
        build_model(cfg, INFO, prototypes=torch.randn(4, 12), distance=None)
    with pytest.raises(UserError, match="needs prototypes"):
        build_model(cfg, INFO, distance="cosine")


def test_fast_cifar_whitening_decorrelates_patches_and_costs_0_12_gmac():
    from torch.utils.flop_counter import FlopCounterMode

    from repulsor.models.fast import PATCH, WHITEN_EPS

    g = torch.Generator().manual_seed(0)
    # Correlated pixels: smooth random images, as natural images are.
    x = F.avg_pool2d(torch.randn(64, 3, 34, 34, generator=g), 3, stride=1)
    body = build_body("fast_cifar", in_channels=3, out_dim=10)
    body.fit(x)
    out = F.conv2d(x, body.whiten.weight)[:, : 3 * PATCH * PATCH]  # one sign of each direction
    flat = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).double()
    cov = flat.T @ flat / len(flat)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(x.double().unfold(2, 2, 1).unfold(3, 2, 1)
                                                  .permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).T, correction=0))
    # Whitened: the identity, up to the eps added to each eigenvalue (and the mean, not removed).
    assert torch.allclose(cov.diagonal(), torch.ones(12, dtype=torch.float64), atol=0.05)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 0.05
    assert eigenvalues.min() > 10 * WHITEN_EPS  # so the eps did not dominate the check above
    with FlopCounterMode(display=False) as counter:
        body(torch.rand(1, 3, 32, 32))
    assert abs(counter.get_total_flops() / 2e9 - 0.118) < 0.005  # the published ~0.12 GMAC per image


def test_fast_cifar_whitening_can_keep_only_the_largest_directions():
    from repulsor.models.fast import PATCH, WHITEN_EPS

    g = torch.Generator().manual_seed(0)
    # Images without colour detail (what JPEG's 4:2:0 chroma subsampling nearly achieves): grey
    # detail plus one colour per image, so no colour varies inside a 2x2 patch.
    x = torch.randn(64, 1, 32, 32, generator=g) + 0.5 * torch.randn(64, 3, 1, 1, generator=g)
    patches = x.double().unfold(2, PATCH, 1).unfold(3, PATCH, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    full = build_body("fast_cifar", in_channels=3, out_dim=10, width=0.125)
    kept = build_body("fast_cifar", in_channels=3, out_dim=10, width=0.125, whiten_directions=6)
    assert full.whiten.out_channels == 24 and kept.whiten.out_channels == 12
    assert kept.groups[0].conv1.in_channels == 12
    full.fit(x)
    kept.fit(x)
    filters = kept.whiten.weight.double().reshape(12, -1)
    torch.testing.assert_close(filters[6:], -filters[:6])  # each direction with both signs
    # They span the 6 largest directions, scaled to unit variance, and are the full whitening's last 6.
    top = eigenvectors[:, 6:]
    torch.testing.assert_close(filters[:6] @ top @ top.T, filters[:6], atol=1e-5, rtol=1e-4)
    scales = filters[:6].norm(dim=1) ** -2 - WHITEN_EPS
    torch.testing.assert_close(scales, eigenvalues[6:], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(kept.whiten.weight, torch.cat([full.whiten.weight[6:12], full.whiten.weight[18:24]]))
    # What is dropped is what these images lack: the colour inside a 2x2 patch, far below the rest.
    assert eigenvalues[:6].max() < 0.1 * eigenvalues[6:].min()
    assert kept(x[:4]).shape == (4, 10)
    with pytest.raises(UserError, match=r"whiten_directions must be an integer from 0 \(all\) to 12, got 13"):
        build_body("fast_cifar", in_channels=3, out_dim=10, whiten_directions=13)


def test_fit_to_data_fits_only_fresh_fast_cifar_networks():
    from repulsor.models import fit_to_data

    info = SimpleNamespace(name="cifar10", num_classes=10, shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    model = build_model(SimpleNamespace(name="fast_cifar", width=0.125), info,
                        prototypes=torch.eye(10, 12), distance="cosine")
    before = model.network.body.whiten.weight.clone()
    assert fit_to_data(model, torch.rand(32, 3, 32, 32))
    assert not torch.equal(before, model.network.body.whiten.weight)
    assert "network.body.whiten.weight" in model.state_dict()  # saved with the weights
    assert not fit_to_data(build_model(SimpleNamespace(name="mlp", width=0.125),
                                       SimpleNamespace(name="digits", num_classes=10, shape=(1, 8, 8),
                                                       mean=(0.3,), std=(0.4,))), torch.rand(4, 1, 8, 8))


def test_fast_cifar_centres_its_pooled_features_for_every_head():
    body = build_body("fast_cifar", in_channels=3, out_dim=10, width=0.125)
    seen = {}
    body.linear.register_forward_hook(lambda module, args, out: seen.update(features=args[0]))
    x = torch.rand(16, 3, 32, 32)
    body(x)
    # GELU and a max-pool leave the features nearly all positive; the linear layer sees them centred.
    assert seen["features"].mean(0).abs().max() < 1e-4
    assert seen["features"].std(0).mean() > 0.5
    assert body(x[:1]).shape == (1, 10)  # a last training batch of one image still runs
    body.eval()
    torch.testing.assert_close(body(x[:4]), body(x[:4]))


def test_fast_cifar_without_centred_features_is_the_published_network():
    plain = build_body("fast_cifar", in_channels=3, out_dim=10, width=0.125, centre_features=False)
    centred = build_body("fast_cifar", in_channels=3, out_dim=10, width=0.125)
    assert plain.pool_norm is None and "pool_norm.running_mean" not in plain.state_dict()
    assert {k for k in centred.state_dict() if not k.startswith("pool_norm.")} == set(plain.state_dict())
    seen = {}
    plain.linear.register_forward_hook(lambda module, args, out: seen.update(features=args[0]))
    plain(torch.rand(16, 3, 32, 32))
    assert seen["features"].mean() > 0.1  # GELU and max-pool features, uncentred
    cfg = SimpleNamespace(name="fast_cifar", width=0.125, centre_features=False)
    info = SimpleNamespace(shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, name="cifar10")
    assert build_model(cfg, info).body.pool_norm is None


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_cifar_batch_norm_is_a_shift_only_batch_norm(channels_last):
    # Its scale is a tensor of ones, passed explicitly (CUDA's backward drops the shift's gradient
    # when the scale is None); on the CPU that must be exactly the scale-free batch norm.
    body = build_body("fast_cifar", in_channels=3, out_dim=10, width=0.125)
    norm = body.groups[0].norm1
    with torch.no_grad():
        norm.bias.copy_(torch.linspace(-1, 1, norm.num_features))
    x = torch.randn(8, norm.num_features, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    out = norm(x)
    ref_bias = norm.bias.detach().clone().requires_grad_(True)
    ref = F.batch_norm(x, mean, var, None, ref_bias, True, 0.4, 1e-12)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad_x, grad_b = torch.autograd.grad(out.square().sum(), (x, norm.bias))
    ref_x, ref_b = torch.autograd.grad(ref.square().sum(), (x, ref_bias))
    torch.testing.assert_close(grad_x, ref_x, rtol=0, atol=0)
    torch.testing.assert_close(grad_b, ref_b, rtol=0, atol=0)
    torch.testing.assert_close(norm.running_mean, mean, rtol=0, atol=0)  # both updated the same way
    assert int(norm.num_batches_tracked) == 1
    assert "groups.0.norm1.weight" not in body.state_dict()


def test_pcl_taps_every_fast_cifar_group_but_the_last():
    cfg = SimpleNamespace(name="fast_cifar", width=0.125)
    info = SimpleNamespace(shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, name="cifar10")
    model = build_model(cfg, info, pcl=True)
    body = model.network.body
    taps, last = feature_taps(body)
    assert taps == list(body.groups)[:-1] and last is body.linear
    assert model(torch.rand(4, 3, 32, 32)).shape == (4, 10)


@pytest.mark.parametrize("name, shape", [("small_cnn", (3, 1, 28, 28)), ("mlp", (3, 1, 8, 8))])
def test_layers_compute_what_the_body_computes(name, shape):
    """``layers()`` (for layer-by-layer analyses) applied in order equals the body's own forward."""
    torch.manual_seed(0)
    body = build_body(name, in_channels=1, out_dim=10, width=0.25, **({"input_size": (8, 8)} if name == "mlp" else {}))
    body.eval()
    x = torch.rand(*shape)
    out = x
    for layer in body.layers():
        out = layer(out)
    torch.testing.assert_close(out, body(x))
    own = {id(p) for p in body.parameters()}
    assert {id(p) for layer in body.layers() for p in layer.parameters()} == own  # its own modules, no copies
