"""Evaluating a run folder: its test points, the cascade on them, the suite recorded in ``results.json``.

Under torchrun every rank attacks its own shard of the points and the counts are summed.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

import torch

from ..config import Config, load_config, load_run_config
from ..data import DATASETS, load_dataset
from ..errors import UserError
from ..runtime import init_process_group, resolve_device
from ..store import run as store
from ..certify import certify, network_layers
from .cascade import evaluate
from .protocols import get_protocol, run_protocol
from .suites import shown_name, specs_for, suite_specs


def load_test_split(cfg: Config, n: int | None, data_dir: str | None = None, *, say=None):
    """The first ``n`` test points of the run's data set (``data.test_dir`` if the config names one).

    When ``n`` exceeds the split, all of it is used and ``say`` (default: a note on stderr)
    tells so, so that nobody reads "first 100000 points" over a 360-point test set.
    """
    folder = data_dir or cfg.data.test_dir or cfg.data.data_dir or None
    x, y = load_dataset(cfg.data.name, "test", data_dir=folder, split_seed=cfg.data.split_seed)
    if n is not None:
        x, y = first_points(x, y, n, cfg.data.name, say=say)
    return x, y, folder


def first_points(x: torch.Tensor, y: torch.Tensor, n: int, name: str, *, say=None):
    """The first ``n`` points of a test split; all of them, said through ``say`` (default: a note
    on stderr), when ``n`` exceeds the split."""
    if n > len(y):
        (say or _note)(f"asked for the first {n} test points, but the {name} test split has {len(y)}: using all"
                       f" {len(y)}")
    return x[:n], y[:n]


def suite_done(results: dict, suite: str, n: int, protocol: dict) -> bool:
    """Whether ``results`` (a run's results.json) holds ``suite`` on ``n`` points under ``protocol``
    (e.g. ``{"eps": 0.1, "norm": "linf"}``), so that resuming work need not evaluate it again."""
    entry = (results.get("suites") or {}).get(suite)
    return bool(entry) and entry.get("n") == n and all(entry.get(k) == v for k, v in protocol.items())


def check_count(flag: str, value) -> int:
    """``value`` as a whole number >= 1, or a one-line error naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag} {value!r} is not allowed: it must be a whole number >= 1")
    return value


def same_points(a: dict, b: dict) -> bool:
    """Whether two records (a suite, a certified bound) were measured on the same first n points under the
    same threat model, so that one may stand beside the other as a bracket."""
    return (a.get("n") == b.get("n") and a.get("norm") == b.get("norm")
            and a.get("eps") is not None and b.get("eps") is not None and abs(a["eps"] - b["eps"]) < 1e-9)


def _note(text: str) -> None:
    print(f"repulsor: note: {text}", file=sys.stderr, flush=True)


def evaluate_run(run_dir: str | Path, *, suite: str | None = None, n: int | None = None, eps: float | None = None,
                 norm: str | None = None, data_dir: str | None = None, seed: int | None = None,
                 batch_size: int | None = None, device: str = "auto", quiet: bool = False,
                 overrides: list[str] = (), surrogate: str | Path | None = None, certify_with: str | None = None) -> dict:
    """Evaluate a run on its test split and merge the result into ``RUN/results.json``.

    ``overrides`` (``"eval.batch_size=64"``, ``"data.test_dir=..."``) change the run's
    evaluation settings for this call only; explicit arguments take precedence over them.
    ``surrogate``: another run folder whose model crafts a transfer attack (``TRANSFER``).
    ``certify_with``: ``crown`` or ``ibp`` also records certified bounds on the same points and threat
    model (``certify_run``), so that the suite's upper bound has its lower bound beside it.
    """
    run_dir = Path(run_dir)
    model = store.load_model(run_dir)
    saved = load_config(run_dir / store.CONFIG).eval
    cfg = load_run_config(run_dir, overrides)
    e = cfg.eval
    # "is None", not "or": --n 0 must be refused, not silently replaced by the default.
    suite, n, eps = suite or e.suite, e.n if n is None else n, e.eps if eps is None else eps
    norm, seed = norm or e.norm, e.seed if seed is None else seed
    batch_size = e.batch_size if batch_size is None else batch_size
    for name, value in (("--n", n), ("--batch-size", batch_size)):
        check_count(name, value)
    suite_specs(suite)  # an unknown suite fails before any work
    if certify_with:
        network_layers(model)  # a model the bounds do not cover fails before the attacks, not after
    dev = resolve_device(device)
    model = model.to(dev)
    surrogate_model = None if surrogate is None else store.load_model(surrogate, device=dev)
    x, y, folder = load_test_split(cfg, n, data_dir)
    group = init_process_group(dev)
    if not quiet and group.is_main:
        names = ", ".join(s.name for s in specs_for(suite, model, norm))  # what runs on this model
        print(f"[evaluate] suite {suite} ({names}) on the first {len(y)} {cfg.data.name} test points, {norm}"
              f" eps = {eps:.4g}, seed {seed}", flush=True)
    with ExitStack() as held:
        if group.is_main:  # one writer per run folder; under torchrun the main process holds it
            held.enter_context(store.locked(run_dir, "evaluate"))
        # Under torchrun every rank attacks its own shard of the points; counts are summed.
        shard = slice(group.rank, None, group.world_size)
        state_path = run_dir / "eval" / f"{suite}-state{'-rank%d' % group.rank if group.distributed else ''}.safetensors"
        result = evaluate(model, x[shard], y[shard], suite=suite, eps=eps, norm=norm, batch_size=batch_size, seed=seed,
                          device=dev, quiet=quiet or not group.is_main, state_path=state_path, surrogate=surrogate_model)
        result.pop("x_adv")
        if group.distributed:
            result = _combine_shards(result, group, dev, len(y))
        state_path.unlink(missing_ok=True)
        if not group.is_main:
            return {}
        if surrogate is not None:
            result["surrogate"] = str(Path(surrogate).resolve())
        # A suite at the run's own threat model is stored under its name; at another one, the
        # threat model is part of the key, so evaluations at several eps sit side by side.
        key = suite if (eps, norm) == (saved.eps, saved.norm) else f"{suite}@{norm}:{eps:.4g}"
        merged = store.record_suite(run_dir, key, result, {
            "dataset": cfg.data.name, "split": "test", "data_dir": str(folder or ""), "n": len(y),
            "clean_accuracy": result["clean_accuracy"]})
        attacks = ", ".join(f"{shown_name(a)} {a['accuracy']:.4f}" for a in result["attacks"])
        store.append_log(run_dir, f"evaluate {key}: n={len(y)} clean {result['clean_accuracy']:.4f}; {attacks};"
                         f" worst case {result['robust_accuracy']:.4f}")
    if certify_with:
        certify_run(run_dir, method=certify_with, n=len(y), eps=eps, norm=norm, device=device, overrides=overrides)
        merged = store.read_results(run_dir)
    return merged


def diagnostic_key(protocol: str, loss: str, off=()) -> str:
    """Where ``diagnose_run`` records a protocol in ``results.json``'s ``diagnostics``."""
    return f"{protocol}|{loss}" + (f"|off={','.join(sorted(off))}" if off else "")


def diagnose_run(run_dir: str | Path, *, protocol: str, loss: str, off=(), n: int | None = None,
                 eps: float | None = None, seed: int | None = None, surrogate: str | Path | None = None,
                 device: str = "auto", overrides: list[str] = ()) -> dict:
    """Run one of the authors' evaluation paths (``evaluation.protocols``, a diagnostic, never a
    measure of robustness) on a run's first ``n`` test points and record it under
    ``results.json``'s ``diagnostics``. Returns the result."""
    run_dir = Path(run_dir)
    name = get_protocol(protocol).name  # an unknown name fails before any work
    cfg = load_run_config(run_dir, overrides)
    n = check_count("--n", cfg.eval.n if n is None else n)
    dev = resolve_device(device)
    model = store.load_model(run_dir, device=dev)
    source = None if surrogate is None else store.load_model(surrogate, device=dev)
    info = DATASETS[cfg.data.name]
    x, y, _ = load_test_split(cfg, n)
    with store.locked(run_dir, "diagnose"):
        result = run_protocol(model, x, y, protocol=name, loss=loss, off=tuple(off), mean=info.mean, std=info.std,
                              eps=cfg.eval.eps if eps is None else eps, seed=cfg.eval.seed if seed is None else seed,
                              surrogate=source, device=dev)
        if surrogate is not None:
            result["surrogate"] = str(Path(surrogate).resolve())
        key = diagnostic_key(name, loss, off)
        store.record_entry(run_dir, "diagnostics", key, result)
        store.append_log(run_dir, f"diagnose {key} (a reproduction of a flawed protocol): n={len(y)} accuracy"
                         f" {result['accuracy']:.4f} (at its start {result['accuracy_at_start']:.4f})")
    return dict(result, key=key)


def certify_run(run_dir: str | Path, *, method: str = "crown", n: int | None = None, eps: float | None = None,
                norm: str | None = None, batch_size: int = 32, device: str = "auto", overrides: list[str] = ()) -> dict:
    """Certified accuracy (``repulsor.certify``) of a run on its first ``n`` test points, recorded under
    ``results.json``'s ``certified``, with the attacked upper bound of any suite run on the same points
    and threat model beside it (``bracket``)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    n = check_count("--n", cfg.eval.n if n is None else n)
    eps = cfg.eval.eps if eps is None else eps
    norm = norm or cfg.eval.norm
    dev = resolve_device(device)
    model = store.load_model(run_dir, device=dev)
    x, y, _ = load_test_split(cfg, n)
    with store.locked(run_dir, "certify"):
        result = certify(model, x, y, eps=eps, norm=norm, method=method, batch_size=batch_size)
        key = f"{method}@{norm}:{eps:.4g}"
        merged = store.record_entry(run_dir, "certified", key, result)
        store.append_log(run_dir, f"certify {key}: n={len(y)} certified {result['certified_accuracy']:.4f}")
    attacked = [(name, s["robust_accuracy"]) for name, s in (merged.get("suites") or {}).items()
                if same_points(s, result)]
    bracket = min(attacked, key=lambda item: item[1]) if attacked else None
    return dict(result, key=key, bracket=bracket)


def _combine_shards(result: dict, group, device, n_total: int) -> dict:
    """Sum per-shard counts over all ranks; accuracies are then over all ``n_total`` points."""
    n_local = result["n"]
    counts = [result["clean_accuracy"] * n_local, result["robust_accuracy"] * n_local]
    for entry in result["attacks"]:
        counts += [entry["accuracy"] * n_local, entry["n_attacked"], entry["seconds"]]
    summed = group.all_reduce_sum(counts, device)
    combined = dict(result, n=n_total, clean_accuracy=round(summed[0]) / n_total,
                    robust_accuracy=round(summed[1]) / n_total, shards=group.world_size)
    for key in ("clean_indices", "robust_indices"):  # a shard's own indices: not the points of the whole set
        combined.pop(key, None)
    combined["attacks"] = []
    for i, entry in enumerate(result["attacks"]):
        acc, attacked, seconds = summed[2 + 3 * i : 5 + 3 * i]
        combined["attacks"].append(dict(entry, n=n_total, accuracy=round(acc) / n_total, n_attacked=round(attacked),
                                        seconds=round(seconds / group.world_size, 3)))
    return combined
