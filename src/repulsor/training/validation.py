"""What the held-out validation split says during training: clean and PGD accuracy, and
whether fgsm_rs has overfitted catastrophically.

Model selection and early stopping read these numbers, never the test split.
"""

from __future__ import annotations

import math

import torch

from ..attacks import evaluating, pgd
from ..config import Config
from ..runtime import derive_seed


def validate(model, x_val, y_val, cfg: Config, device, batch_size: int = 500) -> dict:
    """Clean and PGD accuracy on the validation split, in fp32, the model in eval mode.

    The attack is PGD-``val_attack_steps`` at the training threat model, step
    2.5 * eps / steps, with the CW margin loss, so that model selection (early stopping)
    is made against the decision rule on held-out training data, never on the test split.
    Each loss of ``train.val_losses`` runs the same PGD once more and gives
    ``val_robust_<loss>`` (Figure 4's curves under several losses).
    """
    t = cfg.train
    losses = ["cw", *(loss for loss in t.val_losses if loss != "cw")] if t.eps > 0 else []
    correct, robust = 0, dict.fromkeys(losses, 0)
    with evaluating(model):
        for start in range(0, len(x_val), batch_size):
            x = x_val[start : start + batch_size].to(device)
            y = y_val[start : start + batch_size].to(device)
            with torch.no_grad():
                correct += (model(x).argmax(1) == y).sum().item()
            for loss in losses:
                x_adv = pgd(model, x, y, eps=t.eps, alpha=2.5 * t.eps / t.val_attack_steps,
                            steps=t.val_attack_steps, norm=t.norm, loss=loss, seed=derive_seed(t.seed, "val", start))
                with torch.no_grad():
                    robust[loss] += (model(x_adv).argmax(1) == y).sum().item()
    n = max(1, len(x_val))
    record = {"val_clean": correct / n, "val_robust": robust["cw"] / n if t.eps > 0 else None}
    record.update({f"val_robust_{loss}": robust[loss] / n for loss in t.val_losses if t.eps > 0})
    return record


def catastrophic_overfitting(peak: float, now: float, n: int, drop: float) -> bool:
    """Whether validation PGD accuracy has collapsed from its peak (fgsm_rs's check).

    True when ``now`` is below ``(1 - drop) * peak`` and the fall exceeds three binomial
    standard errors of the peak on ``n`` points, so that validation noise never stops a run.
    A relative fall, not an absolute one: on CIFAR-10 at small scale FGSM training peaks at
    10-15% and collapses to 0%, which a fixed 0.2 drop would never see.
    """
    if n <= 0 or peak <= 0:
        return False
    noise = 3.0 * math.sqrt(peak * (1.0 - peak) / n)
    return now < (1.0 - drop) * peak and peak - now > noise
