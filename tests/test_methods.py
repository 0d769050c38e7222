"""The training methods (repulsor.methods): each one's loss on a tiny model, the prototype
objective, the Max-Mahalanobis centres and the PCL conformity loss."""

import pytest
import torch

from repulsor.data import DATASETS
from repulsor.errors import UserError
from repulsor.training.methods import METHODS, TrainContext, conformity_loss, prototype_objective
from repulsor.models import PrototypeClassifier, build_for_method
from repulsor.prototypes import mmc_centres
from repulsor.training.loop import resolve_prototypes

from test_train import tiny


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_gives_finite_loss_and_gradients(name):
    cfg = tiny(train={"method": name, "attack_steps": 2})
    method = METHODS[name]
    info = DATASETS["digits"]
    torch.manual_seed(0)
    prototypes = resolve_prototypes(cfg, method, info.num_classes)
    model = build_for_method(cfg, method, prototypes).train()
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


def test_conformity_loss_pulls_to_own_centre_and_pushes_from_others():
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    y = torch.tensor([0, 1, 2])
    # Features on their own centres: only the (negative) push term is left.
    at_centres = conformity_loss(centres.clone(), centres, y, push=0.0)
    assert at_centres.item() == pytest.approx(0.0, abs=1e-6)
    # Mean over the batch of ||f - w_y||^2 / d: the three points are 1, 4 and 9 away (squared), d = 2.
    moved = centres + torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    assert conformity_loss(moved, centres, y, push=0.0).item() == pytest.approx((1 + 4 + 9) / 3 / 2)
    # The push term: for f = w_y it is (1/(k-1)) sum_j 2 ||w_y - w_j||^2 / d, averaged over the batch.
    d = torch.cdist(centres, centres) ** 2
    expected = -0.5 * (2 * d.sum(1) / 2).mean() / 2
    assert conformity_loss(centres.clone(), centres, y, push=0.5).item() == pytest.approx(expected.item())
    # Moving a centre away from the others lowers the loss (it is pushed, not pulled).
    spread = centres * 2
    assert conformity_loss(spread, spread, y, push=0.5) < conformity_loss(centres, centres, y, push=0.5)


def test_label_smoothing_only_for_cross_entropy_losses():
    with pytest.raises(UserError, match="applies to cross-entropy losses only"):
        tiny(train={"method": "prototype", "label_smoothing": 0.2})
    cfg = tiny(train={"method": "ce", "label_smoothing": 0.2})
    model = build_for_method(cfg, METHODS["ce"], None)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 10
    loss, scores, _ = METHODS["ce"].loss(TrainContext(model, model, cfg.train), x, y)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(scores.float(), y, label_smoothing=0.2))
