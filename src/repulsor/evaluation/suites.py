"""The suites: attack cascades as plain data.

A suite is a list of ``AttackSpec`` run in order as a per-example worst-case cascade by
``repulsor.evaluate``; ``TRANSFER`` ends any suite when a surrogate model is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import UserError


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a suite: a registry name, its settings, and how it is reported."""

    name: str  # as reported, e.g. "apgd-ce"
    attack: str  # key of repulsor.attacks.ATTACKS
    steps: int = 0  # iterations (queries for square)
    restarts: int = 1
    settings: dict = field(default_factory=dict)  # further keyword arguments
    loss: str = ""
    needs_prototypes: bool = False  # representation-space losses: only for prototype models

    def kwargs(self, eps: float, norm: str) -> dict:
        """Keyword arguments of the attack function for this threat model."""
        kwargs = {"eps": eps, "norm": norm, **self.settings}
        if self.attack == "square":
            kwargs["queries"] = self.steps
        elif self.steps:
            kwargs["steps"] = self.steps
        if self.attack != "fgsm":
            kwargs["restarts"] = self.restarts
        if self.loss:
            kwargs["loss"] = self.loss
        if "alpha_over_eps" in kwargs:
            kwargs["alpha"] = kwargs.pop("alpha_over_eps") * eps
        return kwargs


def _pgd(name, steps, loss, restarts=1, alpha_over_eps=0.25, needs_prototypes=False):
    return AttackSpec(name, "pgd", steps, restarts, {"alpha_over_eps": alpha_over_eps}, loss, needs_prototypes)


STANDARD = [
    AttackSpec("apgd-ce", "apgd", 100, 1, loss="ce"),
    AttackSpec("apgd-t", "apgd_t", 100, 1, {"n_targets": 9}),
    AttackSpec("fab-t", "fab_t", 100, 1, {"n_targets": 9}),
    AttackSpec("square", "square", 5000, 1),
]

# AutoAttack's L1 version (Croce & Hein, "Mind the box", ICML 2021): L1-APGD with 5 restarts and
# L1-APGD-T with 5 targets (both in their three stages from 3 eps down), then FAB-T in its L1 form.
# Square has no L1 form here (its L-inf and L2 proposals are squares of constant magnitude, and
# writing a sound L1 proposal is left undone), so the L1 cascade has three attacks, not four.
L1_STANDARD = [
    AttackSpec("apgd-ce (5 restarts)", "apgd", 100, 5, loss="ce"),
    AttackSpec("apgd-t", "apgd_t", 100, 1, {"n_targets": 5}),
    AttackSpec("fab-t", "fab_t", 100, 1, {"n_targets": 9}),
]

ADAPTIVE_EXTRA = [
    AttackSpec("apgd-dlr (5 restarts)", "apgd", 100, 5, loss="dlr"),
    _pgd("pgd-100-cw (5 restarts)", 100, "cw", restarts=5, alpha_over_eps=0.1),
    AttackSpec("apgd-proto-margin (5 restarts)", "apgd", 100, 5, loss="proto_margin", needs_prototypes=True),
    AttackSpec("apgd-t-proto-margin", "apgd_t", 100, 1, {"n_targets": 9, "loss": "proto_margin"},
               needs_prototypes=True),
]

SUITES: dict[str, list[AttackSpec]] = {
    # PGD-20, step eps/4 (2/255 at 8/255), random start, cross-entropy on the class scores.
    "quick": [_pgd("pgd-20", 20, "ce")],
    # The same PGD-20 with the CW margin of the class scores: it aims at the decision rule
    # whatever the scores' scale (a softmax over large scores saturates cross-entropy).
    "margin": [_pgd("pgd-20 (cw)", 20, "cw")],
    # The paper's protocol: PGD-20 and PGD-100 with the loss the authors' code used (the
    # L-inf distance of f(x) to the true prototype; cross-entropy for linear heads), no restarts.
    "paper": [_pgd("pgd-20 (authors' loss)", 20, "paper"), _pgd("pgd-100 (authors' loss)", 100, "paper")],
    "standard": STANDARD,
    # standard, then margin losses with restarts and the representation-space losses.
    "adaptive": STANDARD + ADAPTIVE_EXTRA,
    # For randomised defences, as AutoAttack's "rand" version: APGD-CE and APGD-DLR with
    # Expectation over Transformation, 20 gradient samples averaged per step.
    "rand": [
        AttackSpec("apgd-ce (eot 20)", "apgd", 100, 1, {"eot": 20}, loss="ce"),
        AttackSpec("apgd-dlr (eot 20)", "apgd", 100, 1, {"eot": 20}, loss="dlr"),
    ],
}

# The suites whose L1 form differs (every other suite runs as written, its attacks in L1 geometry).
L1_SUITES: dict[str, list[AttackSpec]] = {"standard": L1_STANDARD, "adaptive": L1_STANDARD + ADAPTIVE_EXTRA}

# Appended to any suite when a surrogate model is given: APGD-CE on the surrogate, the
# examples checked on the model (which then needs forward passes only).
TRANSFER = AttackSpec("transfer (apgd-ce on the surrogate)", "transfer", 100, 1, {"via": "apgd"}, loss="ce")


def suite_specs(name: str, norm: str = "linf") -> list[AttackSpec]:
    """The attacks of suite ``name`` in the threat model ``norm`` (``L1_SUITES`` for L1)."""
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}: choose one of {', '.join(SUITES)}")
    return L1_SUITES.get(name, SUITES[name]) if norm == "l1" else SUITES[name]


def is_prototype_model(model) -> bool:
    """Whether ``model`` classifies by prototypes (it has ``embed`` and ``prototypes``)."""
    return hasattr(model, "embed") and hasattr(model, "prototypes")


def specs_for(name: str, model, norm: str = "linf") -> list[AttackSpec]:
    """The attacks of suite ``name`` in threat model ``norm`` as they run on ``model``: the ``paper`` loss is the
    authors' (``proto_linf``) on a prototype model and cross-entropy otherwise (the paper's
    protocol for a softmax model; the attack's name then says ``ce``, what ran), and the
    representation-space attacks (``needs_prototypes``) run on prototype models only."""
    prototype = is_prototype_model(model)
    specs = []
    for spec in suite_specs(name, norm):
        if spec.needs_prototypes and not prototype:
            continue
        if spec.loss == "paper":
            spec = replace(spec, loss="proto_linf") if prototype else replace(spec, loss="ce", name=_ran_with_ce(spec.name))
        specs.append(spec)
    return specs


_INTENT = "(authors' loss)"


def _ran_with_ce(name: str) -> str:
    return name.replace(_INTENT, "(ce)")


def shown_name(entry: dict) -> str:
    """The name of a recorded attack as it should be shown: what ran. Records written before 0.6.0
    named the ``paper`` suite's attacks "(authors' loss)" on a linear head too, where cross-entropy ran."""
    name = entry.get("name", "?")
    return _ran_with_ce(name) if _INTENT in name and entry.get("loss") == "ce" else name
