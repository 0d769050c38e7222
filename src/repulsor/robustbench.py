"""A RobustBench entry for an exported run: ``model_info.json`` with RobustBench's fields.

The robust accuracy it names (``autoattack_acc``) comes from the run's ``standard`` suite only,
the AutoAttack-style cascade at AutoAttack's standard budgets, and only when that suite ran on at
least the number of test points asked for (by default the data set's whole official test split).
No other suite is ever called an AutoAttack number. The footnote says that the number comes from
repulsor's cascade, not from the official AutoAttack code. The fields only a person can fill
(``FOR_THE_USER``) are left empty and named in the export's README.
"""

from __future__ import annotations

from .errors import UserError
from .formats import format_eps
from .version import __version__

FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
          "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote")
FOR_THE_USER = ("link", "name", "authors", "venue", "reported")
# The whole official test split of the data sets it applies to; for others, give the number.
OFFICIAL_TEST_SIZES = {"cifar10": 10000, "cifar100": 10000, "mnist": 10000, "fashion_mnist": 10000}


def required_points(dataset: str, asked: int | None) -> int:
    """The test points a ``standard`` result needs for ``model_info.json``: ``asked``, else the whole
    official test split of ``dataset``."""
    if asked is not None:
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
            raise UserError(f"--model-info-n {asked!r} is not allowed: it must be a whole number >= 1")
        return asked
    if dataset not in OFFICIAL_TEST_SIZES:
        raise UserError(f"{dataset} has no official test split size known to repulsor: give the points the standard"
                        " result must cover with --model-info-n N")
    return OFFICIAL_TEST_SIZES[dataset]


def model_info(results: dict | None, *, run: str, dataset: str, architecture: str, eps: float, norm: str,
               min_n: int) -> dict:
    """RobustBench's ``model_info.json`` fields for a run, from its ``results.json``.

    Raises ``UserError`` (one line, naming the evaluation to run) when the run has no ``standard``
    result at its own threat model on at least ``min_n`` points, or when an attack of it could not
    run (then the cascade is not AutoAttack's).
    """
    fix = f"run: repulsor evaluate {run} --suite standard --n {min_n}"
    standard = ((results or {}).get("suites") or {}).get("standard")
    if standard is None:
        raise UserError(f"model_info.json needs the run's standard suite (AutoAttack's attacks and budgets) on at least"
                        f" {min_n} test points, and {run} has none; {fix}")
    if standard.get("n", 0) < min_n:
        raise UserError(f"model_info.json needs the standard suite on at least {min_n} test points; {run} has it on"
                        f" {standard.get('n', 0)}; {fix} (or ask for fewer with --model-info-n)")
    skipped = [a["name"] for a in standard.get("attacks", []) if a.get("status", "done") != "done"]
    if skipped:
        raise UserError(f"the run's standard suite could not run {', '.join(skipped)}: its number is not an AutoAttack"
                        " number, and model_info.json is not written")
    info = {
        "link": "", "name": "", "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": "",
        "architecture": architecture,
        "eps": format_eps(eps, norm, short=True),
        "clean_acc": f"{100 * standard['clean_accuracy']:.2f}",
        "reported": "",
        "autoattack_acc": f"{100 * standard['robust_accuracy']:.2f}",
        "footnote": (f"Robust accuracy from repulsor's standard suite (APGD-CE, APGD-T, FAB-T, Square at AutoAttack's"
                     f" standard budgets; {norm}, eps {format_eps(eps, norm, short=True)}) on the first"
                     f" {standard['n']} test points, code {standard.get('code_version', __version__)}; not the official"
                     " AutoAttack code."),
    }
    assert tuple(info) == FIELDS
    return info
