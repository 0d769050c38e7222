"""A comparison's plan: the compare config (TOML data, never executed) read and checked into one
``RunPlan`` per run, each with its full, validated ``Config``.

A compare config has a ``[compare]`` table, the ordinary sections ``[data] [model]
[prototypes] [train] [eval]`` shared by every method, and optional per-method overrides of
``model``, ``prototypes`` and ``train`` written as nested tables (``[method.pgd_at.train]``).
The data and the evaluation protocol cannot be overridden: every model is evaluated on the
same test points with the same attacks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from ..analyses.curve import curve_eps_values
from ..attacks.geometry import check_eps
from ..config import (SECTION_TYPES, Config, apply_overrides, coerce, from_dict, parse_fraction, parse_override,
                      read_toml, resolve_paths, to_dict)
from ..errors import UserError
from ..evaluation.suites import SUITES
from ..training.methods import METHODS

TRANSFER_SOURCE = "ce"  # Table 4's examples are crafted on this method's model


DEFAULT_SUITES = ("quick", "paper")


#: Sections a method may override; the data and the evaluation protocol are shared.
OVERRIDE_SECTIONS = ("model", "prototypes", "train")


_COMPARE_KEYS = ("methods", "suites", "eval_n", "suite_n", "sweep_dims", "curve_eps", "curve_n", "transfer", "certify",
                 "seeds")

#: compare.certify: the certified lower bound put beside each run's attacked accuracies ("" for none).
CERTIFY_METHODS = ("", "ibp", "crown-ibp", "crown")


@dataclass(frozen=True)
class RunPlan:
    """One training run of a comparison.

    ``name`` is its folder under the output directory: the method name (its first seed), the method name
    and ``-seed<s>`` for each further seed of compare.seeds, or ``prototype-D<dim>`` for a Table 1 sweep
    run that differs from the ``prototype`` run.
    ``overrides`` holds the per-method values (flat, ``{"train.lr": 0.1}``) that make its
    config differ from the shared sections.
    """

    name: str
    method: str
    cfg: Config
    overrides: dict
    dim: int | None = None  # the sweep's D for Table 1 runs
    seed: int = 0  # train.seed: initialisation, data order and augmentation (the prototypes are the method's)


@dataclass(frozen=True)
class ComparePlan:
    """A validated compare config: the runs, the evaluation protocol and the analyses."""

    runs: tuple[RunPlan, ...]  # every distinct run, methods first, then the sweep
    methods: tuple[str, ...]
    sweep: tuple[tuple[int, str], ...]  # (D, run name) for Table 1
    suites: tuple[str, ...]
    eval_n: int
    suite_n: dict
    curve_eps: tuple[float, ...]
    curve_n: int
    transfer: bool
    base: Config  # the shared sections
    method_overrides: dict = field(default_factory=dict)  # {method: {section: {key: value}}}
    certify: str = ""  # "ibp" | "crown": a certified accuracy per run on the standard suite's points
    seeds: tuple[int, ...] = (0,)  # train.seed of each method's runs; the first one's run bears the method's name

    def seed_runs(self, method: str) -> list[RunPlan]:
        """The runs of ``method``, one per seed, in the order of compare.seeds."""
        return [r for r in self.runs if r.method == method and r.dim is None]

    def n_for(self, suite: str) -> int:
        """The number of test points that ``suite`` is evaluated on."""
        return self.suite_n.get(suite, self.eval_n)

    def run(self, name: str) -> RunPlan:
        return next(r for r in self.runs if r.name == name)

    def describe(self) -> dict:
        """The ``[compare]`` table as resolved (defaults filled in), JSON-ready."""
        return {"methods": list(self.methods), "suites": list(self.suites), "eval_n": self.eval_n,
                "suite_n": dict(self.suite_n), "sweep_dims": [d for d, _ in self.sweep],
                "curve_eps": list(self.curve_eps), "curve_n": self.curve_n, "transfer": self.transfer,
                "certify": self.certify, "seeds": list(self.seeds)}

    def certify_n(self) -> int:
        """The points certified: those of the standard suite (the bracket's upper side), else eval_n."""
        return self.n_for("standard") if "standard" in self.suites else self.eval_n


def _names(values, key: str, valid, what: str) -> tuple[str, ...]:
    """A non-empty list of distinct names, each one of ``valid``."""
    names = coerce("compare", key, values, list[str])
    if not names:
        raise UserError(f"compare.{key} is empty: list at least one {what}")
    for name in names:
        if name not in valid:
            raise UserError(f"compare.{key}: unknown {what} {name!r}: valid {what}s are {', '.join(valid)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"compare.{key} lists {', '.join(duplicates)} more than once")
    return tuple(names)


def _positive_int(value, key: str, minimum: int = 1) -> int:
    value = coerce("compare", key, value, int)
    if value < minimum:
        raise UserError(f"compare.{key} = {value} is out of range: it must be >= {minimum}")
    return value


def _curve_grid(values, norm: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not values:
        raise UserError(f"compare.curve_eps must be a non-empty list of perturbation sizes, got {values!r}")
    grid = []
    for value in values:
        if isinstance(value, str):
            try:
                value = parse_fraction(value)
            except (ValueError, ZeroDivisionError):
                raise UserError(f"compare.curve_eps: cannot read {value!r} as a number (write 0.0314 or \"8/255\")") from None
        grid.append(check_eps(value, norm, what="compare.curve_eps"))
    return tuple(sorted(set(grid)))


def _merge(base: dict, override: dict) -> dict:
    """``base`` with each section of ``override`` merged key by key (copies, nothing shared)."""
    merged = copy.deepcopy(base)
    for section, values in override.items():
        merged[section] = {**merged.get(section, {}), **copy.deepcopy(values)}
    return merged


def _flat(override: dict) -> dict:
    return {f"{section}.{key}": value for section, values in override.items() for key, value in values.items()}


def _method_overrides(raw, methods: tuple[str, ...]) -> dict:
    """Validate the ``[method.<name>.<section>]`` tables; returns ``{method: {section: {key: value}}}``."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError("method must be a table of per-method overrides, e.g. [method.pgd_at.train] lr = 0.1")
    result = {}
    for name, sections in raw.items():
        if name not in METHODS:
            raise UserError(f"[method.{name}]: unknown method {name!r}: valid methods are {', '.join(METHODS)}")
        if name not in methods:
            raise UserError(f"[method.{name}] overrides a method that is not in compare.methods ({', '.join(methods)})")
        if not isinstance(sections, dict):
            raise UserError(f"method.{name} must be a table of sections, e.g. [method.{name}.train] lr = 0.1")
        for section, values in sections.items():
            where = f"method.{name}.{section}"
            if section in ("data", "eval"):
                raise UserError(f"{where}: the data and the evaluation protocol are shared by every method;"
                                f" set them in [{section}]")
            if not isinstance(values, dict):
                raise UserError(f"{where} must be a table: write [method.{name}.train] with {section} = ... below it"
                                if section not in SECTION_TYPES else f"{where} must be a table of key = value lines")
            if section not in OVERRIDE_SECTIONS:
                raise UserError(f"{where}: unknown section {section!r}: a method can override {', '.join(OVERRIDE_SECTIONS)}")
            if "method" in values and section == "train":
                raise UserError(f"{where}.method: the method is the table's name ({name}); remove this key")
        result[name] = copy.deepcopy(sections)
    return result


def _run_config(shared: dict, override: dict, method: str, where: str, eval_n: int, suite: str) -> Config:
    """Validate the config of one run: shared sections + override + the method."""
    merged = _merge(shared, override)
    merged = _merge(merged, {"train": {"method": method}, "eval": {"after_train": False, "n": eval_n, "suite": suite}})
    try:
        return resolve_paths(from_dict(merged))
    except UserError as error:
        raise UserError(f"{where}: {error}") from None


def load_compare_config(source, overrides: list[str] = ()) -> ComparePlan:
    """Read and validate a compare config.

    Args:
        source: a TOML file (path) or the same data as a dict (``{"compare": {...},
            "data": {...}, "method": {"pgd_at": {"train": {"lr": 0.1}}}}``).
        overrides: ``section.key=value`` strings applied on top of the file: shared
            sections (``"eval.eps=8/255"``) or the compare table (``"compare.eval_n=200"``).

    Returns:
        A ``ComparePlan`` with one validated ``Config`` per run.

    Raises:
        UserError: naming the key at fault (unknown keys or methods, wrong types,
            out-of-range values, overrides of the shared data or evaluation sections).
    """
    if isinstance(source, (str, Path)):
        raw = read_toml(source, "compare config")
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        raise UserError(f"a compare config is a TOML file or a dict, not {type(source).__name__}")
    if any(parse_override(text)[0] == "method" for text in overrides):
        raise UserError("--set method.*: per-method settings belong in the compare config's [method.NAME] tables")
    apply_overrides(raw, overrides)
    table = raw.pop("compare", None)
    if not isinstance(table, dict):
        raise UserError("the compare config needs a [compare] table with methods = [\"ce\", \"prototype\", ...]")
    unknown = sorted(set(table) - set(_COMPARE_KEYS))
    if unknown:
        raise UserError(f"unknown key compare.{unknown[0]}: valid keys are {', '.join(_COMPARE_KEYS)}")
    if "methods" not in table:
        raise UserError("compare.methods is missing: list the methods to compare, e.g. methods = [\"ce\", \"prototype\"]")
    methods = _names(table["methods"], "methods", tuple(METHODS), "method")
    suites = _names(table.get("suites", list(DEFAULT_SUITES)), "suites", tuple(SUITES), "suite")
    overrides = _method_overrides(raw.pop("method", None), methods)

    shared = raw
    for section, values in shared.items():
        if section in SECTION_TYPES and not isinstance(values, dict):
            raise UserError(f"config section [{section}] must be a table of key = value lines")
    if "method" in shared.get("train", {}):
        raise UserError("train.method: list the methods in compare.methods, not in [train]")
    base = from_dict(_merge(shared, {"train": {"method": methods[0]}}))  # errors name the shared key

    eval_n = _positive_int(table.get("eval_n", base.eval.n), "eval_n")
    suite_n = {}
    if "suite_n" in table:
        if not isinstance(table["suite_n"], dict):
            raise UserError(f"compare.suite_n must be a table such as {{ standard = 500 }}, got {table['suite_n']!r}")
        for suite, n in table["suite_n"].items():
            if suite not in suites:
                raise UserError(f"compare.suite_n.{suite}: {suite!r} is not in compare.suites ({', '.join(suites)})")
            suite_n[suite] = _positive_int(n, f"suite_n.{suite}")
    curve_eps = (_curve_grid(table["curve_eps"], base.eval.norm) if "curve_eps" in table
                 else tuple(curve_eps_values(base.eval.eps, base.eval.norm)))
    curve_n = _positive_int(table.get("curve_n", eval_n), "curve_n", minimum=0)
    has_source = TRANSFER_SOURCE in methods
    transfer = coerce("compare", "transfer", table.get("transfer", has_source), bool)
    if transfer and not has_source:
        raise UserError(f"compare.transfer = true needs {TRANSFER_SOURCE!r} in compare.methods: the transfer attack"
                        f" crafts its adversarial examples on the {TRANSFER_SOURCE} model")
    certify_method = coerce("compare", "certify", table.get("certify", ""), str)
    if certify_method not in CERTIFY_METHODS:
        raise UserError(f"compare.certify = {certify_method!r} is not one of \"ibp\", \"crown-ibp\", \"crown\" (or \"\""
                        " for none)")
    dims = coerce("compare", "sweep_dims", table.get("sweep_dims", []), list[int])
    if len(set(dims)) != len(dims):
        raise UserError("compare.sweep_dims lists a dimension more than once")

    seeds = tuple(coerce("compare", "seeds", table.get("seeds", [base.train.seed]), list[int]))
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise UserError(f"compare.seeds must list distinct seeds >= 0, e.g. [0, 1, 2]; got {list(seeds)}")
    runs = []
    for m in methods:
        for index, seed in enumerate(seeds):
            # the shared seed stays out of the run's overrides, so that a one-seed comparison is as before
            override = overrides.get(m, {}) if seed == base.train.seed else \
                _merge(overrides.get(m, {}), {"train": {"seed": seed}})
            name = m if index == 0 else f"{m}-seed{seed}"
            runs.append(RunPlan(name, m, _run_config(shared, override, m, f"method.{m}", eval_n, suites[0]),
                                _flat(overrides.get(m, {})), seed=seed))
    sweep = []
    for dim in dims:
        if isinstance(dim, int) and dim < 2:
            raise UserError(f"compare.sweep_dims: {dim} is out of range: a dimension must be >= 2")
        override = _merge(overrides.get("prototype", {}), {"prototypes": {"dim": dim}})
        if seeds[0] != base.train.seed:  # Table 1 sweeps at the first seed, beside the methods' first runs
            override = _merge(override, {"train": {"seed": seeds[0]}})
        cfg = _run_config(shared, override, "prototype", f"compare.sweep_dims ({dim})", eval_n, suites[0])
        same = next((r for r in runs if r.method == "prototype" and to_dict(r.cfg) == to_dict(cfg)), None)
        if same is None:
            same = RunPlan(f"prototype-D{dim}", "prototype", cfg, _flat(override), dim, seed=seeds[0])
            runs.append(same)
        sweep.append((dim, same.name))
    return ComparePlan(runs=tuple(runs), methods=methods, sweep=tuple(sweep), suites=suites, eval_n=eval_n,
                       suite_n=suite_n, curve_eps=curve_eps, curve_n=curve_n, transfer=transfer, base=base,
                       method_overrides=overrides, certify=certify_method, seeds=seeds)
