"""Attacks on models returning class scores, sharing one norm geometry.

Every attack is a plain function ``attack(model, x, y, *, eps, ..., seed=0) -> x_adv`` on
images [N, C, H, W] in [0, 1]; it keeps no state and never switches the model's mode, so
run it inside ``with evaluating(model):``. ``ATTACKS`` maps names to attacks.
"""

from ..errors import UserError
from .apgd import apgd, apgd_targeted
from .bpda import BPDA, bpda, transfer
from .context import attack_survivors, batched, channels_last_weights, correct_every_time, evaluating
from .fab import fab, fab_targeted
from .geometry import GEOMETRIES, geometry
from .losses import LOSSES, get_loss
from .pgd import fgsm, pgd
from .square import square

ATTACKS = {
    "fgsm": fgsm,
    "pgd": pgd,
    "apgd": apgd,
    "apgd_t": apgd_targeted,
    "fab_t": fab_targeted,
    "square": square,
    "transfer": transfer,
}

# Attacks that need the model's input gradient; the others need forward passes only.
GRADIENT_ATTACKS = frozenset({"fgsm", "pgd", "apgd", "apgd_t", "fab_t"})


def get_attack(name: str):
    """The attack called ``name`` (a key of ``ATTACKS``)."""
    try:
        return ATTACKS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown attack {name!r}: choose one of {', '.join(ATTACKS)}") from None


__all__ = [
    "ATTACKS",
    "BPDA",
    "GRADIENT_ATTACKS",
    "GEOMETRIES",
    "LOSSES",
    "apgd",
    "apgd_targeted",
    "attack_survivors",
    "batched",
    "bpda",
    "channels_last_weights",
    "correct_every_time",
    "evaluating",
    "fab",
    "fab_targeted",
    "fgsm",
    "geometry",
    "get_attack",
    "get_loss",
    "pgd",
    "square",
    "transfer",
]
