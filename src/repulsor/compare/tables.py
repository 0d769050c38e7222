"""A comparison's tables as data: the paper's Table 1 (prototype dimension), Tables 2-3 (methods)
and Table 4 (transfer), built from ``comparison.json`` alone.

``comparison_tables`` gives each table as plain data (title, header, rows of cells, protocol
line, notes); ``format_tables`` writes them as Markdown (``tables.md``) and the report draws the
same data as HTML, so both show the same cells and nothing parses Markdown back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..formats import accuracy_with_interval, format_eps
from ..paired import paired_sentence
from ..runtime import provenance_warning

DASH = "–"


@dataclass
class ComparisonTable:
    """One table: ``title``, ``header`` and ``rows`` of cell texts, the ``protocol`` sentence under
    it, and ``notes`` (one line each) about its runs."""

    title: str
    header: list[str]
    rows: list[list[str]]
    protocol: str
    notes: list[str] = field(default_factory=list)


def fmt_pct(value, n: int | None = None) -> str:
    """An accuracy in [0, 1] as a percentage with one decimal, with its 95% Wilson interval when the
    number of points ``n`` is known (``84.0 [75.6, 89.9]``), or a dash when missing."""
    if value is None:
        return DASH
    return accuracy_with_interval(value, n) if n else f"{100 * value:.1f}"


def fmt_seconds(seconds) -> str:
    """A duration as seconds, minutes or hours, or a dash when missing."""
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _fmt_passes(cost) -> str:
    if not cost or cost.get("forward_passes_per_example") is None:
        return DASH
    return f"{cost['forward_passes_per_example']:g} / {cost['backward_passes_per_example']:g}"


def _cascade_seconds(run: dict) -> float | None:
    """Seconds the ``standard`` cascade's attacks took on the run (its sanity checks not counted)."""
    suite = (run.get("suites") or {}).get("standard")
    return sum(a["seconds"] or 0.0 for a in suite["attacks"]) if suite else None


def _per_training_hour(run: dict) -> str:
    """Points of ``standard`` robust accuracy bought per hour of training on the machine that trained it."""
    wall = (run.get("cost") or {}).get("wall_seconds")
    if run.get("standard") is None or not wall:
        return DASH
    return f"{100 * run['standard'] / (wall / 3600):.1f}"


def _fmt_overrides(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or DASH


def _fmt_int(value) -> str:
    return DASH if value is None else str(value)


def _protocol_line(p: dict, suites: str) -> str:
    eps = format_eps(p["eps"], p["norm"], short=True)
    return (f"Protocol: {p['dataset']} {p['split']} split{' (' + p['test_dir'] + ')' if p['test_dir'] else ''},"
            f" first {p['n']} points unshuffled, {p['norm']} eps = {eps}, seed {p['seed']}, fp32; {suites};"
            f" accuracies in % with their 95% Wilson intervals where the points are known; repulsor {p['code_version']}"
            + (f" ({provenance_warning(p)})" if provenance_warning(p) else "") + ".")


def _points(p: dict):
    """``n(suite)``: the points a suite ran on in this comparison (None when unknown), for intervals."""
    suite_n = p.get("suite_n") or {}
    return lambda suite: suite_n.get(suite)


def dimension_table(report: dict) -> ComparisonTable | None:
    """Table 1: the prototype output dimension D (None when the comparison swept no D)."""
    p, dataset = report["protocol"], report["protocol"]["dataset"]
    if not report.get("table1"):
        return None
    n = _points(p)
    suite_ns = ", ".join(f"{s} on {n}" for s, n in p["suite_n"].items())
    return ComparisonTable(
        f"Table 1: prototype output dimension D ({dataset})",
        ["D", "run", "epochs", "clean", "PGD-20", "PGD-20 (CE)", "standard worst case"],
        [[str(r["dim"]), r["run"], _fmt_int(r["epochs"]), fmt_pct(r["clean_accuracy"], n("quick")),
          fmt_pct(r["pgd20"], n("paper")), fmt_pct(r.get("pgd20_ce"), n("quick")),
          fmt_pct(r.get("standard"), n("standard"))] for r in report["table1"]],
        _protocol_line(p, "PGD-20: the paper suite (authors' loss: L-inf distance to the true prototype), as in the"
                          " paper's Table 1; PGD-20 (CE): quick suite; standard: APGD-CE, APGD-T, FAB-T, Square"
                          f" cascade; points per suite: {suite_ns}"))


def methods_table(report: dict) -> ComparisonTable:
    """Tables 2-3: every method's clean and robust accuracy and its training cost."""
    p, runs, dataset = report["protocol"], report["runs"], report["protocol"]["dataset"]
    suite_ns = ", ".join(f"{s} on {n}" for s, n in p["suite_n"].items())
    n = _points(p)
    certify = (report.get("config", {}).get("compare") or {}).get("certify") or ""
    certify_n = (p.get("suite_n") or {}).get("standard") or p.get("n")  # ComparePlan.certify_n
    rows, notes = [], []
    for name in report["methods"]:
        r = runs[name]
        status = "" if r["status"] in ("trained", "resumed", "trained before") else f" ({r['status']})"
        if r.get("error"):
            notes.append(f"{name}: training failed: {r['error']}")
        if r.get("stopped"):
            notes.append(f"{name}: training stopped early: {r['stopped']}")
        notes += [f"{name}: sanity check failed in suite {warning}" for warning in r.get("sanity_warnings", [])]
        rows.append([name + status, _fmt_overrides(r["overrides"]), _fmt_int(r["epochs"]),
                     fmt_pct(r["clean_accuracy"], n("quick")), fmt_pct(r["pgd20"], n("paper")),
                     fmt_pct(r["pgd100"], n("paper")), fmt_pct(r["pgd20_ce"], n("quick")),
                     fmt_pct(r["standard"], n("standard")),
                     *([fmt_pct(r.get("certified"), certify_n)] if certify else []),
                     fmt_seconds((r["cost"] or {}).get("wall_seconds")), _fmt_passes(r["cost"]),
                     _per_training_hour(r), fmt_seconds(_cascade_seconds(r))])
        if certify and r.get("certified_note"):
            notes.append(f"{name}: not certified: {r['certified_note']}")
        if certify and r.get("certified") is not None and r.get("standard") is not None \
                and r["standard"] - r["certified"] > 0.1:
            notes.append(f"{name}: the robust accuracy lies between {fmt_pct(r['certified'])}% (certified) and"
                         f" {fmt_pct(r['standard'])}% (standard's worst case): the gap is wide, the truth is in between")
    notes += paired_notes(report)
    number = {"cifar10": "Table 2", "cifar100": "Table 3"}.get(dataset, "Tables 2-3")
    return ComparisonTable(
        f"{number}: methods on {dataset}",
        ["method", "overrides", "epochs", "clean", "PGD-20", "PGD-100", "PGD-20 (CE)", "standard worst case",
         *([f"certified ({certify}, a lower bound)"] if certify else []), "training time",
         "passes/example (fwd / bwd)", "standard points per training hour", "standard: cascade time"], rows,
        _protocol_line(p, "PGD-20 and PGD-100: paper suite cascade (authors' loss for prototype heads, CE otherwise;"
                          " step eps/4, one random start); PGD-20 (CE): quick suite; standard: APGD-CE, APGD-T,"
                          f" FAB-T, Square cascade; points per suite: {suite_ns}; standard points per training"
                          " hour: the standard worst case in points divided by the training's wall-clock hours on the"
                          " machine that trained it; cascade time: the standard suite's attacks, sanity checks not"
                          " counted"), notes)


def paired_notes(report: dict) -> list[str]:
    """Each method against the first one on the same points, point by point (exact McNemar), under the
    strongest suite both recorded per point: whether their robust accuracies differ beyond chance."""
    runs, methods = report["runs"], report["methods"]
    if len(methods) < 2:
        return []
    base = methods[0]
    notes = []
    for name in methods[1:]:
        for suite in ("standard", "quick"):
            a, b = (runs[base].get("suites") or {}).get(suite), (runs[name].get("suites") or {}).get(suite)
            if a and b and a["n"] == b["n"] and "robust_indices" in a and "robust_indices" in b:
                notes.append(f"{name} against {base}, suite {suite}: "
                             + paired_sentence(base, a["robust_indices"], name, b["robust_indices"], a["n"]))
                break
    return notes


def transfer_table(report: dict) -> ComparisonTable | None:
    """Table 4: PGD-20 examples crafted on the source model, checked on every method (None when
    the comparison ran no transfer; a table without rows and a note when it was skipped)."""
    transfer, p, runs = report.get("transfer"), report["protocol"], report["runs"]
    if transfer is None:
        return None
    title = f"Table 4: transfer of PGD-20 examples from {transfer['source']} ({p['dataset']})"
    header = ["source", "target", "clean", "white-box PGD-20 (CE)", "transferred"]
    if "targets" not in transfer:
        return ComparisonTable(title, header, [], "", [f"Not computed: {transfer['skipped']}."])
    rows = [[transfer["source"], name + (" (white box)" if name == transfer["source"] else ""),
             fmt_pct(t["clean_accuracy"]), fmt_pct(runs[name]["pgd20_ce"]), fmt_pct(t["accuracy"])]
            for name, t in transfer["targets"].items()]
    a = transfer["attack"]
    return ComparisonTable(title, header, rows, _protocol_line(
        p, f"examples crafted on {transfer['source']} with PGD-{a['steps']} ({a['loss']} loss, step eps/4, random"
           " start; a point keeps the first iterate that fools the source), evaluated on each target"))


def seeds_table(report: dict) -> ComparisonTable | None:
    """compare.seeds: each method's mean and standard deviation over its seeds, with every seed's figure."""
    seeds = report.get("seeds")
    if not seeds:
        return None
    p = report["protocol"]
    columns = [("clean_accuracy", "clean"), ("pgd20", "PGD-20"), ("pgd100", "PGD-100"), ("pgd20_ce", "PGD-20 (CE)"),
               ("standard", "standard worst case")]
    if any(entry.get("certified", {}).get("mean") is not None for entry in seeds.values()):
        columns.append(("certified", "certified"))
    rows, notes = [], []
    for method, entry in seeds.items():
        row = [method, ", ".join(str(s) for s in entry["seeds"])]
        for key, _ in columns:
            figure = entry[key]
            if figure["mean"] is None:
                row.append(DASH)
                continue
            spread = f" ± {100 * figure['std']:.1f}" if figure["std"] is not None else ""
            each = ", ".join(DASH if v is None else f"{100 * v:.1f}" for v in figure["values"])
            row.append(f"{100 * figure['mean']:.1f}{spread} ({each})")
        rows.append(row)
        missing = [name for name, value in zip(entry["runs"], entry["clean_accuracy"]["values"]) if value is None]
        if missing:
            notes.append(f"{method}: not yet measured: {', '.join(missing)} (the mean is over the seeds that are)")
    return ComparisonTable(
        f"Seeds: every method over {len(next(iter(seeds.values()))['seeds'])} training seeds",
        ["method", "seeds", *[title for _, title in columns]], rows,
        _protocol_line(p, "mean ± sample standard deviation over the seeds (train.seed: initialisation, data order,"
                          " augmentation; the prototypes are the method's and stay), then each seed's figure; the"
                          " evaluation points and attacks are the same for every seed"), notes)


def comparison_tables(report: dict) -> list[ComparisonTable]:
    """Every table of a comparison (``report``: the content of ``comparison.json``), in the paper's order."""
    return [t for t in (dimension_table(report), methods_table(report), seeds_table(report), transfer_table(report))
            if t is not None]


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_tables(report: dict) -> str:
    """The Markdown of a comparison's tables (``tables.md``), each with its protocol line; missing
    numbers are shown as a dash."""
    parts = [f"# Comparison on {report['protocol']['dataset']}", ""]
    for table in comparison_tables(report):
        parts += [f"## {table.title}", ""]
        if table.rows:
            parts += [_markdown_table(table.header, table.rows), "", table.protocol, ""]
        if table.notes and table.rows:
            parts += ["Notes:", "", *[f"- {note}" for note in table.notes], ""]
        elif table.notes:
            parts += [*table.notes, ""]
    return "\n".join(parts)
