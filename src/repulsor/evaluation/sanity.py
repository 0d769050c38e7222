"""Gradient-masking sanity checks: signs that an evaluation was fooled by the defence.

Carlini et al. (2019, "On evaluating adversarial robustness") list symptoms of an attack
that failed because the model hides or breaks its gradients rather than because the model
is robust; AutoAttack automates some of them. Each check here is one symptom:

- ``unbounded``: with a budget covering the whole image box, PGD must reach about 0%.
- ``more_iterations``: PGD-100 with restarts must not leave more points robust than PGD-10.
- ``black_box_vs_white_box``: the score-based Square attack must not beat the white-box
  attacks that ran before it in the cascade.
- ``zero_gradients``: input gradients of the attack losses must not be exactly zero.
- ``loss_rises``: PGD's mean loss must rise over its iterations.
- ``autocast_agreement``: input gradients under autocast (bf16 on the CPU, fp16 on CUDA)
  must point the same way as in fp32 and must not vanish more often (fp16 underflow
  masked the gradients of the original authors' code).
- ``shattered_gradients``: the scores must reach the input through autograd, with an
  input gradient that is not zero everywhere; otherwise only BPDA (``repulsor.bpda``), a
  transfer or a black-box attack can measure the model.
- ``deterministic``: two forward passes must give the same scores, unless the cascade's
  attacks averaged gradient samples (EOT, the ``rand`` suite).

Every check reuses the attacks of ``repulsor.attacks`` (never a PGD of its own), runs on
the first ``CHECK_POINTS`` points with seeds derived from the evaluation's seed, takes
gradients with ``torch.autograd.grad`` with respect to the input only, and leaves the
model's parameters and train/eval mode as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attacks import GRADIENT_ATTACKS, attack_survivors, evaluating, geometry, pgd
from ..runtime import derive_seed
from .probes import (CHECK_POINTS, autocast_dtype, gradient_agreement, has_input_gradient,
                     input_gradients, score_spread, useless_gradients)

TOLERANCE = 0.01  # one percent of the checked points (or one point, if that is more)
MIN_COSINE = 0.5  # median cosine between fp32 and autocast input gradients


@dataclass(frozen=True)
class CheckInput:
    """What every check reads: the model and the checked points, the threat model, the cascade.

    ``x`` [n, C, H, W] in [0, 1] and ``y`` [n] are on the CPU (moved to ``device`` one batch
    at a time); ``n <= CHECK_POINTS``.
    """

    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    entries: list
    eps: float
    norm: str
    seed: int
    device: torch.device
    batch_size: int
    eot: int = 1  # gradient samples per step, as the cascade's strongest EOT attack
    votes: int = 1  # forward passes per correctness decision, as the cascade counted

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def tolerance(self) -> float:
        """Allowed fraction of points: 1%, but never less than one point."""
        return max(TOLERANCE, 1 / self.n) if self.n else TOLERANCE

    def batches(self):
        """Yield ``(start, x_batch, y_batch)`` on ``device``, in order."""
        for start in range(0, self.n, self.batch_size):
            stop = start + self.batch_size
            yield start, self.x[start:stop].to(self.device), self.y[start:stop].to(self.device)


def _verdict(name: str, ok: bool, message: str, value: float | None) -> dict:
    # A non-finite value becomes None (the message keeps it): results files are strict JSON.
    value = None if value is None or not math.isfinite(value) else float(value)
    return {"name": name, "ok": bool(ok), "message": message, "value": value}


def _skipped(name: str, reason: str) -> dict:
    """A check that could not say anything is not a warning: ok, no value."""
    return _verdict(name, True, f"{name.replace('_', ' ')}: skipped, {reason}", None)


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _eps_text(eps: float) -> str:
    return f"{eps:.4g}"


# ------------------------------------------------------------------ helpers


def still_correct(inp: CheckInput, x: torch.Tensor, y: torch.Tensor, *, tag: str, loss: str, eps: float,
                   alpha: float, steps: int, restarts: int, random_start: bool) -> torch.Tensor:
    """Which of the points ``x`` [m, C, H, W], ``y`` [m] (CPU) PGD fails to fool.

    Returns a bool tensor [m] on the CPU. Seeds derive from the evaluation's seed, ``tag``
    and the batch, so a check gives the same verdict every time.
    """
    correct = torch.ones(len(y), dtype=torch.bool)
    attack_survivors(inp.model, lambda xb, yb, start: pgd(
        inp.model, xb, yb, eps=eps, alpha=alpha, steps=steps, norm=inp.norm, loss=loss, restarts=restarts,
        random_start=random_start, eot=inp.eot, seed=derive_seed(inp.seed, "sanity", tag, start)),
        x, y, correct, batch_size=inp.batch_size, device=inp.device, votes=inp.votes)
    return correct


# ------------------------------------------------------------------- checks


def check_unbounded(inp: CheckInput) -> dict:
    """PGD-100 (CW loss, then CE on the survivors) with a budget covering the whole box must
    fool about every point.

    L-inf: eps = 1; L2: eps = sqrt(C*H*W); L1: eps = C*H*W: the diameter of the box. Any image is then
    reachable, so a classifier that predicts more than one class can be fooled on every
    point; one that keeps more than 1% of the points correct hides its gradients (or is
    broken). No random start: from the clean point, a failure is the gradients' fault, not
    bad luck, and random noise images would fool a gradient-masking model by chance.
    """
    name = "unbounded"
    if inp.n == 0:
        return _skipped(name, "no points to check")
    dim = inp.x[0].numel()
    eps = geometry(inp.norm).max_eps(dim)
    # Step eps/20: 100 steps cross the box five times, yet fine enough to settle in narrow
    # regions of another class.
    settings = dict(eps=eps, alpha=eps / 20, steps=100, restarts=1, random_start=False)
    correct = still_correct(inp, inp.x, inp.y, tag=name, loss="cw", **settings)
    # Cross-entropy on the survivors: a margin loss can be locally flat where cross-entropy
    # is not (negative L-inf distance heads), and that weakness is zero_gradients' to report;
    # this check asks whether gradient attacks can move the model's decisions at all.
    if correct.any():
        index = correct.nonzero().squeeze(1)
        correct[index] = still_correct(inp, inp.x[index], inp.y[index], tag=name + "-ce", loss="ce", **settings)
    accuracy = correct.double().mean().item()
    ok = accuracy <= TOLERANCE
    return _verdict(
        name, ok,
        f"unbounded attack (PGD-100 with CW then CE loss, {inp.norm} eps={_eps_text(eps)}): accuracy "
        f"{_pct(accuracy)} of {inp.n} points (expected at most {_pct(TOLERANCE)})",
        accuracy,
    )


def check_more_iterations(inp: CheckInput) -> dict:
    """PGD-100 with 3 restarts must not leave more points robust than PGD-10 (both CW loss).

    Step sizes: eps/4 for PGD-10 (the usual 2/255 at 8/255) and eps/10 for PGD-100 (as in
    the adaptive suite). Warns when the stronger attack's accuracy exceeds the weaker one's
    by more than 1% of the points (at least one point).
    """
    name = "more_iterations"
    if inp.n == 0:
        return _skipped(name, "no points to check")
    if inp.eps == 0:
        return _skipped(name, "eps = 0 leaves the attacks nothing to do")
    common = dict(loss="cw", eps=inp.eps, random_start=True)
    fewer = still_correct(inp, inp.x, inp.y, tag="pgd-10", alpha=inp.eps / 4, steps=10, restarts=1, **common)
    more = still_correct(inp, inp.x, inp.y, tag="pgd-100x3", alpha=inp.eps / 10, steps=100, restarts=3, **common)
    fewer, more = fewer.double().mean().item(), more.double().mean().item()
    rise = more - fewer
    tolerance = inp.tolerance
    ok = rise <= tolerance + 1e-12
    return _verdict(
        name, ok,
        f"more iterations: accuracy {_pct(more)} under PGD-100 with 3 restarts vs {_pct(fewer)} under PGD-10 "
        f"at eps={_eps_text(inp.eps)} (expected no more than {100 * tolerance:.1f} points higher)",
        rise,
    )


def black_box_drops(entries: list) -> list[tuple[str, float]]:
    """``(name, accuracy drop)`` of every score-based (Square) entry that follows white-box ones.

    Args:
        entries: the cascade's per-attack dicts in order (keys ``name``, ``attack``,
            ``accuracy``, ``n_attacked``, ``n``...); ``accuracy`` is the cascade's accuracy
            after that attack, as a fraction of all ``n`` points.

    Returns:
        For each Square entry preceded by at least one white-box attack, the fraction of
        all points it fooled after the earlier attacks had failed on them.
    """
    drops = []
    seen_white_box = False
    previous = None
    for entry in entries:
        if entry.get("status", "done") != "done":
            continue  # not applicable: it attacked nothing
        if entry.get("attack") == "square":
            if seen_white_box:
                before = previous["accuracy"]
                drops.append((entry.get("name", "square"), before - entry["accuracy"]))
        elif entry.get("attack") in GRADIENT_ATTACKS:
            seen_white_box = True  # a transfer attack is no white-box attack on this model
        previous = entry
    return drops


def check_black_box_vs_white_box(inp: CheckInput) -> dict:
    """The Square attack, run after the white-box attacks, must fool at most 1% more points.

    A gradient-free attack beating gradient-based ones on the same threat model means the
    gradients mislead the white-box attacks (Carlini et al. 2019, section 5.4 of their
    checklist; AutoAttack warns the same way). Reads only the cascade's entries.
    """
    name = "black_box_vs_white_box"
    drops = black_box_drops(inp.entries)
    if not drops:
        return _skipped(name, "no score-based attack ran after white-box attacks in this suite")
    attack, drop = max(drops, key=lambda item: item[1])
    ok = drop <= TOLERANCE + 1e-12
    return _verdict(
        name, ok,
        f"black box vs white box: {attack} fooled {_pct(drop)} of the points that the white-box attacks "
        f"missed (expected at most {_pct(TOLERANCE)})",
        drop,
    )


def check_zero_gradients(inp: CheckInput) -> dict:
    """The fraction of points whose input gradient is exactly zero must be at most 1%.

    Measured for cross-entropy and for the CW margin loss on the clean points; the larger
    fraction is reported. Exactly zero gradients come from hard quantisation, saturated
    softmax outputs, ``detach`` in the forward pass or dead activations.
    """
    name = "zero_gradients"
    if inp.n == 0:
        return _skipped(name, "no points to check")
    fractions = {}
    for loss in ("ce", "cw"):
        grads = input_gradients(inp.model, inp.x, inp.y, loss, device=inp.device, batch_size=inp.batch_size,
                                eot=inp.eot)
        fractions[loss] = useless_gradients(grads).double().mean().item()
    worst = max(fractions.values())
    tolerance = inp.tolerance
    ok = worst <= tolerance + 1e-12
    return _verdict(
        name, ok,
        f"zero gradients: {_pct(worst)} of {inp.n} points have an all-zero input gradient "
        f"(CE {_pct(fractions['ce'])}, CW {_pct(fractions['cw'])}; expected at most {_pct(tolerance)})",
        worst,
    )


def check_loss_rises(inp: CheckInput) -> dict:
    """PGD-20 (CW loss, no early stop) must end with a higher mean loss than it started with.

    The trace is the mean CW margin over the checked points at every iterate of the first
    run (``pgd(..., return_trace=True)``). A flat or falling trace means the steps do not
    follow the loss: zero, wrong or noisy gradients.
    """
    name = "loss_rises"
    if inp.n == 0:
        return _skipped(name, "no points to check")
    if inp.eps == 0:
        return _skipped(name, "eps = 0 leaves the attack nothing to do")
    total = None
    for start, xb, yb in inp.batches():
        _, trace = pgd(inp.model, xb, yb, eps=inp.eps, alpha=inp.eps / 4, steps=20, norm=inp.norm, loss="cw",
                       early_stop=False, return_trace=True, eot=inp.eot, seed=derive_seed(inp.seed, "sanity", name, start))
        # The trace is a mean over the batch: weigh it by the batch size for the overall mean.
        weighted = trace.double().cpu() * len(yb)
        total = weighted if total is None else total + weighted
    trace = total / inp.n
    first, last = trace[0].item(), trace[-1].item()
    # A relative margin, so that float rounding of an unchanged loss never counts as a rise.
    ok = math.isfinite(last) and last > first + 1e-6 * max(1.0, abs(first))
    return _verdict(
        name, ok,
        f"loss rises: the mean CW loss of PGD-20 at eps={_eps_text(inp.eps)} went from {first:.4g} to {last:.4g} "
        f"(expected a rise)",
        last - first,
    )


def check_autocast_agreement(inp: CheckInput) -> dict:
    """Input gradients under autocast must agree with fp32 ones and not vanish more often.

    Cross-entropy input gradients are computed in fp32 and under ``torch.autocast`` (bf16
    on the CPU, fp16 on CUDA). Warns when the median per-example cosine similarity is
    below 0.5, or when the fraction of all-zero gradients under autocast exceeds the fp32
    fraction by more than 1% of the points. A model trained or attacked under autocast
    whose gradients underflow looks robust to its own attacks.
    """
    name = "autocast_agreement"
    if inp.n == 0:
        return _skipped(name, "no points to check")
    dtype = autocast_dtype(inp.device)
    if dtype is None:
        return _skipped(name, f"no autocast dtype is known for device {inp.device.type}")
    common = dict(device=inp.device, batch_size=inp.batch_size, eot=inp.eot)
    reference = input_gradients(inp.model, inp.x, inp.y, "ce", **common)
    low = input_gradients(inp.model, inp.x, inp.y, "ce", autocast_dtype=dtype, **common)
    cosine, zero_ref, zero_low = gradient_agreement(reference, low)
    tolerance = inp.tolerance
    ok = cosine >= MIN_COSINE and zero_low - zero_ref <= tolerance + 1e-12
    label = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
    return _verdict(
        name, ok,
        f"autocast agreement: median cosine {cosine:.3f} between fp32 and {label} input gradients (expected at "
        f"least {MIN_COSINE}), all-zero gradients {_pct(zero_low)} vs {_pct(zero_ref)} in fp32 (expected at most "
        f"{100 * tolerance:.1f} points more)",
        cosine,
    )


def _eot_samples(entries: list) -> int:
    """The most gradient samples per step that a gradient attack of the cascade used."""
    return max((entry.get("eot", 1) for entry in entries if entry.get("status", "done") == "done"), default=1)


def check_deterministic(inp: CheckInput) -> dict:
    """Two forward passes on the same inputs must give the same scores (``score_spread``).

    A randomised model hides its gradients behind the noise of single samples: it must be
    attacked with Expectation over Transformation (the ``rand`` suite). Warns when the
    scores differ and no attack of the cascade averaged gradient samples; when one did, the
    verdict is ok and says so.
    """
    name = "deterministic"
    if inp.n == 0:
        return _skipped(name, "no points to check")
    largest_diff, threshold = score_spread(inp.model, inp.x, device=inp.device, batch_size=inp.batch_size)
    deterministic = largest_diff <= threshold
    samples = _eot_samples(inp.entries)
    if deterministic:
        advice = ""
    elif samples > 1:
        advice = (f"; the model is randomised, and the cascade's attacks averaged {samples} gradient samples per step"
                  " (EOT) and counted a point as robust only if every one of several evaluations was correct")
    else:
        advice = ("; the model is randomised: evaluate it with the rand suite (EOT attacks), e.g. repulsor evaluate"
                  " RUN --suite rand or evaluate(..., suite=\"rand\")")
    return _verdict(
        name, deterministic or samples > 1,
        f"deterministic: two forward passes differ by at most {largest_diff:.3g} in the scores "
        f"(expected at most {threshold:.3g}{advice})",
        largest_diff,
    )


def check_shattered_gradients(inp: CheckInput) -> dict:
    """The model must have an input gradient, and not one that is zero at every point.

    Shattered gradients (Athalye et al., 2018) come from a non-differentiable step inside the
    model: a threshold or a ``no_grad`` preprocessor cuts autograd off (the gradient
    attacks are then not applicable), a rounding step gives a zero derivative everywhere.
    Either way only a black-box or transfer attack, or BPDA, can measure the model. Warns
    when the scores do not reach the input through autograd, or when the CW margin's input
    gradient is exactly zero (or not finite) at every checked point.
    """
    name = "shattered_gradients"
    if inp.n == 0:
        return _skipped(name, "no points to check")
    advice = "wrap the non-differentiable step with repulsor.bpda(...) (or give a surrogate for a transfer attack)"
    if not has_input_gradient(inp.model, inp.x, inp.y, device=inp.device):
        return _verdict(name, False, "shattered gradients: the scores do not depend on the input through autograd, so"
                        f" the gradient attacks were not applicable; {advice}", 1.0)
    grads = input_gradients(inp.model, inp.x, inp.y, "cw", device=inp.device, batch_size=inp.batch_size)
    useless = useless_gradients(grads).double().mean().item()
    ok = useless < 1.0
    return _verdict(
        name, ok,
        f"shattered gradients: the CW loss has an all-zero input gradient at {_pct(useless)} of {inp.n} points"
        + (f" (expected below 100%); {advice}" if not ok else " (expected below 100%)"),
        useless,
    )


# In report order; a check's name is its function's name without "check_".
CHECKS = [
    check_unbounded,
    check_more_iterations,
    check_black_box_vs_white_box,
    check_zero_gradients,
    check_shattered_gradients,
    check_loss_rises,
    check_autocast_agreement,
    check_deterministic,
]


# Checks that run gradient attacks or take input gradients: skipped, with the reason, for a
# model without an input gradient (shattered_gradients reports that model).
NEEDS_INPUT_GRADIENT = frozenset({check_unbounded, check_more_iterations, check_zero_gradients, check_loss_rises,
                                  check_autocast_agreement})


def check_name(check) -> str:
    """The verdict name of a check function: ``check_loss_rises`` -> ``"loss_rises"``."""
    return check.__name__.removeprefix("check_")


def run_checks(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, entries: list, *, eps: float,
               norm: str, seed: int, device, batch_size: int, quiet: bool = True, votes: int = 1) -> list[dict]:
    """Run every gradient-masking sanity check of ``CHECKS``.

    Args:
        model: maps images [N, C, H, W] in [0, 1] to class scores [N, k]. Run in eval mode
            with frozen parameters; its mode, ``requires_grad`` flags and weights are as
            before on return.
        x: images [N, C, H, W] in [0, 1] (CPU); y: labels [N]. Only the first
            ``CHECK_POINTS`` are used.
        entries: the cascade's per-attack dicts, in cascade order (see ``evaluate``).
        eps: the threat model's radius (pixel units); norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        seed: the evaluation's seed; every check derives its own from it.
        device: where the model lives; batch_size: examples per attack call.
        quiet: accepted for the caller's convenience; the checks never print.
        votes: forward passes per correctness decision, as the cascade counted (1 for a
            deterministic model). The checks' attacks average as many gradient samples
            per step as the cascade's strongest EOT attack did.

    Returns:
        One dict per check, in ``CHECKS`` order: ``name`` (str), ``ok`` (bool), ``message``
        (one sentence with the measured number and the threshold) and ``value`` (the
        measured number as a float, or None when the check was skipped). A check that
        raises is reported as not ok with the error in its message, so that a finished
        cascade is never lost to a check.
    """
    del quiet  # the checks print nothing either way
    device = torch.device(device) if device is not None else next(model.parameters()).device
    inp = CheckInput(model=model, x=x[:CHECK_POINTS].detach().cpu(), y=y[:CHECK_POINTS].detach().cpu(),
                     entries=list(entries), eps=float(eps), norm=norm, seed=int(seed), device=device,
                     batch_size=max(1, int(batch_size)), eot=_eot_samples(entries), votes=int(votes))
    verdicts = []
    with evaluating(model):
        gradient = inp.n == 0 or has_input_gradient(model, inp.x, inp.y, device=device)
        for check in CHECKS:
            name = check_name(check)
            if not gradient and check in NEEDS_INPUT_GRADIENT:
                verdicts.append(_skipped(name, "the model has no input gradient (see shattered gradients)"))
                continue
            try:
                verdicts.append(check(inp))
            except Exception as error:  # noqa: BLE001 - reported, never hidden
                message = f"{name.replace('_', ' ')}: could not run ({type(error).__name__}: {error})"
                verdicts.append(_verdict(name, False, " ".join(message.split()), None))
    return verdicts


def format_verdicts(verdicts: list[dict]) -> list[str]:
    """One line per verdict: ``"WARN <message>"`` when not ok, ``"ok   <message>"`` otherwise."""
    return [f"{'ok  ' if v['ok'] else 'WARN'} {v['message']}" for v in verdicts]
