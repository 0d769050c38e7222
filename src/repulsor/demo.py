"""``repulsor demo``: the README's main job, and the first thing a user sees of the tool.

It trains a prototype model (Eq. 6) on the embedded digits data, then evaluates it twice on
the same test points: with the `quick` suite (PGD-20, one restart), the number most papers
report, and with the `standard` cascade (APGD-CE, APGD-T, FAB-T, Square), the number worth
citing. The gap between the two is the point of the tool.

Running it again is safe: a finished demo shows its results (running only a suite that is
missing), an interrupted one continues from its checkpoint, and a folder holding any other
run is refused.
"""

from __future__ import annotations

import copy
from pathlib import Path

from .config import apply_overrides, from_dict, load_config, resolve_paths, to_dict
from .errors import Interrupted, UserError
from .evaluation.run import evaluate_run, suite_done
from .evaluation.suites import shown_name
from .store import run as store
from .training.folder import run_status
from .training.loop import train

DEMO_CONFIG = {
    "data": {"name": "digits"},
    "model": {"name": "mlp", "width": 1.0},
    "prototypes": {"dim": 64, "metric": "linf", "epochs": 100, "lr": 0.01, "distance": "cosine"},
    "train": {"method": "prototype", "epochs": 40, "batch_size": 64, "lr": 0.05, "lr_min": 0.0,
              "schedule": "cyclic", "weight_decay": 5e-4, "precision": "fp32", "eps": 0.1, "alpha": 0.025,
              "val_n": 200},
    # All 360 test points (the attacks' cost here is per iteration, not per point); the demo
    # evaluates them itself, weak suite and strong suite.
    "eval": {"suite": "quick", "n": 360, "eps": 0.1, "after_train": False},
}

#: The weak attack most papers report, then the cascade worth citing, on the same points.
DEMO_SUITES = ("quick", "standard")


def demo_config(overrides: list[str] = ()):
    """The demo's config with ``section.key=value`` overrides applied."""
    return resolve_paths(from_dict(apply_overrides(copy.deepcopy(DEMO_CONFIG), overrides)))


def run_demo(out: str | Path, *, overrides: list[str] = (), quiet: bool = False) -> dict:
    """Train (or resume, or reuse) the demo run in ``out`` and evaluate it with ``DEMO_SUITES``.

    Returns:
        ``{"out", "status", "results", "text"}``: what was done (``trained``, ``resumed`` or
        ``reused``), the run's ``results.json`` content, and the summary printed by the CLI.
    """
    cfg = demo_config(overrides)
    out = Path(out)
    status = run_status(out)
    if status != "empty" and to_dict(load_config(out / store.CONFIG)) != to_dict(cfg):
        raise UserError(f"{out} holds another run than this demo (its config.toml differs); choose another --out,"
                        f" or delete {out} to train the demo there")
    say = (lambda text: None) if quiet else (lambda text: print(f"[demo] {text}", flush=True))
    try:
        if status == "finished":
            say(f"{out} already holds this demo, finished: showing its results (delete {out} to train again)")
            done = "reused"
        elif status == "unfinished":
            say(f"{out} holds this demo, unfinished: continuing it from its last checkpoint")
            train(None, out, resume=True, quiet=quiet)
            done = "resumed"
        else:
            train(cfg, out, quiet=quiet)
            done = "trained"
    except Interrupted as error:
        raise Interrupted(f"{error}; or run repulsor demo --out {out} again") from None
    results = store.read_results(out)
    for suite in DEMO_SUITES:
        # n as evaluated: eval.n, or the whole test split where that is smaller (the first suite says).
        n = min(cfg.eval.n, (results.get("suites", {}).get(DEMO_SUITES[0]) or {}).get("n", cfg.eval.n))
        if not suite_done(results, suite, n, {"eps": cfg.eval.eps}):
            results = evaluate_run(out, suite=suite, quiet=quiet, device=cfg.train.device)
    return {"out": str(out), "status": done, "results": results, "text": summary_text(out, cfg, results)}


def summary_text(out: Path, cfg, results: dict) -> str:
    """The demo's headline: clean, the weak number, the strong number and their gap, on the same points."""
    suites = results["suites"]
    weak, strong = (suites[name] for name in DEMO_SUITES)
    lines = [f"repulsor demo: a {cfg.train.method} model (Eq. 6, D = {cfg.prototypes.dim}, {cfg.model.name}) trained"
             f" on the {cfg.data.name} training split",
             f"the same {strong['n']} test points ({cfg.data.name} test split), {strong['norm']} eps ="
             f" {strong['eps']:g}, seed {strong['seed']}:",
             f"  {'clean accuracy':<58} {100 * strong['clean_accuracy']:5.1f}%"]
    for name, res in ((DEMO_SUITES[0], weak), (DEMO_SUITES[1], strong)):
        attacks = ", ".join(shown_name(a) for a in res["attacks"])  # what ran, as recorded
        lines.append(f"  {(name + ' (' + attacks + ')'):<58} {100 * res['robust_accuracy']:5.1f}%")
    gap = 100 * (weak["robust_accuracy"] - strong["robust_accuracy"])
    if gap > 0:
        lines.append(f"PGD-20 overstates the robust accuracy by {gap:.1f} points: cite the standard cascade's"
                     f" {100 * strong['robust_accuracy']:.1f}%.")
    else:
        lines.append("the standard cascade finds no more adversarial examples than PGD-20 on these points.")
    for verdict in strong.get("sanity", []):
        lines.append(("WARN " if not verdict["ok"] else "ok   ") + verdict["message"])
    lines.append(f"run folder: {out} (results.json); a page of it: repulsor report {out} --out {out}-report")
    return "\n".join(lines)
