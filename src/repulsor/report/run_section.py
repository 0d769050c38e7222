"""The section of one run: its config, training, every evaluated suite, and its model figures.

Everything here is read from files: the run folder (``config.toml``, ``training.json``,
``metrics.jsonl``, ``results.json``, ``analysis/``) and the figure data that
``report.figures`` keeps beside the report. Only when that data is missing or stale are the
model and the test points loaded, to compute it once.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .. import analyses
from ..config import load_run_config
from ..data import DATASETS
from ..errors import UserError
from ..evaluation.run import same_points
from ..evaluation.suites import shown_name
from ..formats import format_eps
from ..plots import curves, images, matrices
from ..runtime import provenance_warning
from ..store import files as ckpt
from ..store import layout
from ..store import run as store
from ..training.methods import METHODS
from . import figures
from .blocks import Details, Figure, Heading, Para, Table, fmt, fmt_seconds, format_accuracy
from .context import ReportContext

ANALYSIS = "analysis"  # the folder ``repulsor analyse`` writes into a run


def copy_analysis(run_dir: Path, name: str, figdir: Path) -> Path | None:
    """Copy ``RUN/analysis/<name>.png`` (and its CSV/JSON) into the report; None when absent."""
    source = run_dir / ANALYSIS / f"{name}.png"
    if not source.is_file():
        return None
    figdir.mkdir(parents=True, exist_ok=True)
    for suffix in (".png", ".json", ".csv"):
        if source.with_suffix(suffix).is_file():
            shutil.copyfile(source.with_suffix(suffix), figdir / f"{name}{suffix}")
    return figdir / f"{name}.png"


def analysis_summary(run_dir: Path) -> dict:
    """``RUN/analysis/summary.json`` as a dict; ``{}`` when absent or unreadable."""
    path = run_dir / ANALYSIS / "summary.json"
    try:
        return ckpt.read_json(path, "analysis summary") if path.is_file() else {}
    except UserError:
        return {}


def overview_accuracies(results: dict | None) -> tuple[str, str]:
    """The overview's clean and per-suite cells: every number with its own n.

    The clean accuracy shown is the one measured on the most points (a 200-point suite never
    headlines over a 10,000-point one); each suite's worst case carries the n it was measured on.
    """
    suites = (results or {}).get("suites") or {}
    if not suites:
        return "–", "–"
    largest = max(suites.values(), key=lambda res: res.get("n") or 0)
    clean = f"{format_accuracy(largest.get('clean_accuracy'))} (n={largest.get('n', '?')})"
    worst = ", ".join(f"{name}: {format_accuracy(res.get('robust_accuracy'))} (n={res.get('n', '?')})"
                      for name, res in sorted(suites.items(), key=lambda item: -(item[1].get("n") or 0)))
    return clean, worst


def suite_blocks(name: str, res: dict, results: dict, figdir: Path | None = None) -> list:
    """The blocks of one suite of ``results.json``: protocol, cascade table, the bracket (when a certified
    accuracy was recorded on the same points; drawn into ``figdir`` when given), sanity checks.

    ``res`` is ``results["suites"][name]``; nothing but these two dicts is read.
    """
    blocks = [Heading(4, f"Suite `{name}`")]
    norm = res.get("norm", "linf")
    blocks.append(Para(
        f"Protocol: data set **{results.get('dataset', '?')}**, {results.get('split', 'test')} split, first n = "
        f"{res.get('n', results.get('n'))} points (unshuffled), norm {norm}, eps = {format_eps(res.get('eps'), norm)}, "
        f"seed {res.get('seed', '?')}, {res.get('precision', 'fp32')}, model in eval mode. Cascade: each attack runs "
        "only on the points that every earlier attack failed on."))
    if res.get("votes", 1) > 1:
        blocks.append(Para(f"The model is randomised (two forward passes differ): a point counts as correct only if "
                           f"all {res['votes']} forward passes classify it correctly, for the clean accuracy and after "
                           "every attack, so that a lucky pass is not counted as robustness.", note=True))
    skipped = [e for e in res.get("attacks", []) if e.get("status", "done") != "done"]
    if skipped:
        blocks.append(Para("Not applicable to this model, so not run: " + "; ".join(
            f"{e.get('name', '?')} ({e.get('reason', '')})" for e in skipped) + ". They leave the accuracy unchanged; "
            "the worst case below rests on the attacks that ran.", warn=True))
    blocks.append(_cascade_table(res))
    bracket = bracket_text(res, results)
    if bracket:
        blocks.append(Para(bracket))
        if figdir is not None:
            low = max((c for c in results["certified"].values() if same_points(c, res)),
                      key=lambda c: c["certified_accuracy"])
            row = {"certified": low["certified_accuracy"], "attacked": res["robust_accuracy"],
                   "clean": res["clean_accuracy"], "n": res["n"]}
            written = curves.plot_bracket({name: row}, figdir / f"bracket-{name}.png",
                                          title=f"Suite {name}: certified ({low.get('method', '?')}) <= robust <= attacked")
            blocks.append(Figure(Path(written["png"]), "The bracket: the certified accuracy (no input in the threat model"
                                 " changes those points) and the suite's worst case, with the clean accuracy; the true"
                                 " robust accuracy lies in the shaded span."))
    return blocks + _sanity_blocks(name, res.get("sanity"))


def bracket_text(res: dict, results: dict) -> str:
    """The bracket of a suite: its worst case (an upper bound of the robust accuracy) beside the tightest
    certified accuracy (a lower bound) recorded on the same points and threat model; "" without one."""
    same = [c for c in ((results or {}).get("certified") or {}).values() if same_points(c, res)]
    if not same or res.get("robust_accuracy") is None:
        return ""
    best = max(same, key=lambda c: c["certified_accuracy"])
    low, high = best["certified_accuracy"], res["robust_accuracy"]
    text = (f"Bracket: the robust accuracy on these {res['n']} points lies between {format_accuracy(low)} (certified,"
            f" {best.get('method', '?')}: no input in the threat model changes those points) and {format_accuracy(high)}"
            " (this suite's worst case).")
    if high - low > 0.1:
        text += " The gap is wide: the truth lies in between, and neither number alone says where."
    return text


def _cascade_table(res: dict) -> Table:
    rows = [["", "clean (no attack)", "", "", "", "", format_accuracy(res.get("clean_accuracy")), ""]]
    classes = [""]
    for i, entry in enumerate(res.get("attacks", []), 1):
        if entry.get("status", "done") != "done":
            rows.append([str(i), f"{shown_name(entry)}: not applicable ({entry.get('reason', '')})", "–", "–", "–",
                         "0", "–", "–"])
            classes.append("warn")
            continue
        rows.append([str(i), shown_name(entry), entry.get("loss") or "–", fmt(entry.get("steps")),
                     fmt(entry.get("restarts")), fmt(entry.get("n_attacked")), format_accuracy(entry.get("accuracy")),
                     fmt_seconds(entry.get("seconds"))])
        classes.append("")
    rows.append(["", "**worst case** (robust accuracy)", "", "", "", "", format_accuracy(res.get("robust_accuracy")), ""])
    classes.append("total")
    return Table(["#", "attack", "loss", "steps / queries", "restarts", "points attacked", "accuracy after", "time"],
                 rows, classes)


def _sanity_blocks(name: str, sanity: list | None) -> list:
    if not sanity:
        return [Para("No sanity checks recorded for this suite.", note=True)] if name in (
            "standard", "adaptive", "rand") else []
    blocks = []
    warn = [v for v in sanity if not v.get("ok")]
    if warn:
        blocks.append(Para(f"{len(warn)} of {len(sanity)} sanity checks of suite `{name}` failed: the robust "
                           "accuracy above may be overstated (signs of gradient masking). "
                           + "; ".join(f"{v.get('name')}: {v.get('message')}" for v in warn), warn=True))
    blocks.append(Table(["verdict", "check", "value", "message"],
                        [["WARN" if not v.get("ok") else "ok", v.get("name", "?"), fmt(v.get("value")),
                          v.get("message", "")] for v in sanity],
                        ["warn" if not v.get("ok") else "" for v in sanity],
                        caption="Gradient-masking sanity checks (the reading guide linked in the overview explains each)."))
    return blocks


def training_blocks(run_dir: Path, figdir: Path, label: str, peak_lr: float | None = None) -> list:
    """The training record (``training.json``) and the curves of ``metrics.jsonl``."""
    blocks = [Heading(3, "Training")]
    t = store.read_training(run_dir)
    if t is not None:
        cost = t.get("cost", {}) or {}
        rows = [["weights selected", fmt(t.get("selected"))],
                ["best validation epoch", fmt(t.get("best_epoch"))],
                ["best validation metric", fmt(t.get("best_val_metric"))],
                ["epochs run", fmt(cost.get("epochs"))],
                ["training time", fmt_seconds(cost.get("wall_seconds"))],
                ["forward / backward passes per example",
                 f"{fmt(cost.get('forward_passes_per_example'))} / {fmt(cost.get('backward_passes_per_example'))}"]]
        if t.get("stopped"):
            rows.append(["stopped", str(t["stopped"])])
        blocks.append(Table(["training record (training.json)", "value"], rows))
    metrics = run_dir / layout.METRICS
    if not metrics.is_file():
        blocks.append(Para("No metrics.jsonl: the run has not finished an epoch.", note=True))
        return blocks
    records = analyses.read_metrics(metrics)
    for r in records:
        if r.get("stopped"):
            blocks.append(Para(f"Training stopped at epoch {r['epoch']}: {r['stopped']}",
                               warn=bool(r.get("catastrophic_overfitting"))))
    if records:
        written = curves.plot_training_curves(records, figdir / "training.png", title=f"Training of {label}",
                                              peak_lr=peak_lr)
        blocks.append(Figure(Path(written["png"]), "Training loss and accuracy on the training batches (left; for "
                             "adversarial methods, on the adversarial batches) and the learning rate (right), per epoch."))
        written = analyses.plot_metrics_over_epochs({label: metrics}, figdir / "validation.png",
                                                    title=f"Validation accuracy of {label}")
        summary = written["runs"].get(label, {})
        blocks.append(Figure(Path(written["png"]), "Validation accuracy per epoch: clean (dashed) and robust under "
                             "the training-time PGD with the CW loss (solid), on the validation split carved from the "
                             "training set. Best robust: "
                             f"{format_accuracy(summary.get('best_robust'))} at epoch {fmt(summary.get('best_robust_epoch'))}; "
                             f"last: {format_accuracy(summary.get('last_robust'))} robust, "
                             f"{format_accuracy(summary.get('last_clean'))} clean."))
    return blocks


def run_blocks(run_dir: Path, ctx: ReportContext, *, label: str, heading: str, brief: bool = False,
               n: int | None = None) -> list:
    """Every section of one run."""
    started = time.time()
    slug = ctx.slug(label)
    figdir = ctx.out / "figures" / slug
    figdir.mkdir(parents=True, exist_ok=True)
    cfg = load_run_config(run_dir, ctx.overrides)
    info = DATASETS[cfg.data.name]
    method = METHODS.get(cfg.train.method)
    results = store.read_results(run_dir) or None
    ctx.say(f"{label}: {run_dir}")

    blocks = [Heading(2, heading, anchor=slug)]
    code_version = (results or {}).get("code_version", "unknown (no results.json)")
    blocks.append(Para(f"Folder `{run_dir}`; method **{cfg.train.method}**"
                       + (f" ({method.summary})" if method is not None and getattr(method, "summary", "") else "")
                       + f"; model {cfg.model.name} (width {cfg.model.width:g}) on **{info.name}**; "
                       f"evaluated with repulsor {code_version}"
                       + (f" (**{provenance_warning(results)}**)" if results and provenance_warning(results) else "")
                       + "."))
    blocks.append(Details("Resolved config (config.toml)", (run_dir / layout.CONFIG).read_text(encoding="utf-8"),
                          "toml"))
    if not brief:
        blocks += training_blocks(run_dir, figdir, label, peak_lr=cfg.train.lr)

    blocks.append(Heading(3, "Evaluation"))
    warns = 0
    if results and results.get("suites"):
        for name, res in results["suites"].items():
            blocks += suite_blocks(name, res, results, figdir)
            warns += sum(1 for v in res.get("sanity", []) if not v.get("ok"))
    else:
        blocks.append(Para(f"Not evaluated yet (no results.json): run `repulsor evaluate {run_dir}`.", note=True))
    ctx.overview.append([label, info.name, cfg.train.method, cfg.model.name, *overview_accuracies(results),
                         f"{warns} WARN" if warns else "ok" if results else "–"])
    ctx.overview_classes.append("warn" if warns else "")

    blocks += model_blocks(run_dir, ctx, cfg, figdir, label, brief=brief, n=n or ctx.n or cfg.eval.n)
    ctx.timings[label] = round(time.time() - started, 2)
    return blocks


def model_blocks(run_dir: Path, ctx: ReportContext, cfg, figdir: Path, label: str, *, brief: bool, n: int) -> list:
    """The figures that need the model, drawn from the figure data kept beside the report (computed
    here, once, when it is missing or stale)."""
    blocks = [Heading(3, "Adversarial examples and representation")]
    e = cfg.eval
    # A brief section (a comparison's method run) has no curve and no neighbour grid.
    shown = {"robustness_curve": not brief, "confusion": True, "neighbours": not brief and ctx.neighbours}
    copied = {name: copy_analysis(run_dir, name, figdir) if show else None for name, show in shown.items()}
    protocol = figures.Protocol(n=n, eps=e.eps, norm=e.norm, seed=e.seed, batch_size=e.batch_size,
                                test_data=str(ctx.data_dir or cfg.data.test_dir or cfg.data.data_dir or ""),
                                curve=shown["robustness_curve"] and copied["robustness_curve"] is None,
                                confusion=copied["confusion"] is None,
                                neighbours=shown["neighbours"] and copied["neighbours"] is None)
    data_file = figdir / figures.FILE
    content = figures.load_saved(data_file, run_dir, protocol)
    if content is None:
        try:
            model = store.load_model(run_dir, device=ctx.device)
        except UserError as error:
            return blocks + [Para(f"Figures skipped: {error}", note=True)]
        try:
            x, y = ctx.test_split(cfg, n)
        except UserError as error:
            return blocks + [Para(f"Figures skipped: the test data is unavailable: {error}", note=True)]
        ctx.say(f"{label}: PGD-20 at eps={e.eps:.4g} ({e.norm}) on {len(y)} test points")
        content = figures.compute(model, cfg, x, y, protocol, data_dir=ctx.data_dir, device=ctx.device,
                                  say=lambda text: ctx.say(f"{label}: {text}"))
        figures.save(data_file, run_dir, protocol, content)
    return blocks + figure_blocks(content, copied, run_dir, cfg, figdir, label, protocol)


def figure_blocks(content: dict, copied: dict, run_dir: Path, cfg, figdir: Path, label: str,
                  protocol: figures.Protocol) -> list:
    """The figures of one run, drawn from its figure data alone (no model, no data set)."""
    info, eps, norm, t = DATASETS[cfg.data.name], protocol.eps, protocol.norm, content["tensors"]
    blocks = [Para(f"The figures below attack the first {content['n']} test points with the `quick` suite's PGD-20 "
                   f"(step eps/4, random start, cross-entropy) at {norm} eps = {format_eps(eps, norm)}, seed "
                   f"{protocol.seed}: clean {format_accuracy(content['clean_accuracy'])}, PGD-20 "
                   f"{format_accuracy(content['robust_accuracy'])} on these points (the tables above are the "
                   "reference numbers)." + (" Drawn from the figure data an earlier report computed "
                                            f"(`{figdir.name}/{figures.FILE}`); the model was not loaded."
                                            if content.get("reused") else ""))]
    summary = analysis_summary(run_dir)
    from_analysis = (f"Taken from `{run_dir / ANALYSIS}` (`repulsor` analysis on the first {summary.get('n', '?')} "
                     "test points).")
    if copied["robustness_curve"] is not None:
        blocks.append(_curve_figure(copied["robustness_curve"], from_analysis))
    elif "curve" in content:
        png = Path(curves.plot_robustness_curves({label: content["curve"]}, figdir / "robustness_curve.png",
                                                 norm=norm, title=f"PGD-20 robustness curve ({info.name})")["png"])
        blocks.append(_curve_figure(png, f"Computed on the first {content['curve'][0]['n']} test points "
                                         "(`repulsor analyse` draws it on more points and eps values; the report "
                                         "reuses its figure when present)."))
    blocks.append(_confusion_figure(content, copied["confusion"], info, figdir, label, from_analysis))
    blocks += _geometry_figures(content, info, figdir, label)
    blocks.append(_grid_figure(t, info, figdir, eps, norm))
    blocks += _neighbour_figures(content, copied["neighbours"], info, figdir, from_analysis)
    return blocks


def _curve_figure(png: Path, note: str) -> Figure:
    return Figure(png, "Robustness curve: PGD-20 accuracy as eps grows from the run's eps to twice it; a point counts "
                       "as robust at eps only if no attack of radius <= eps fooled it, so the curve never rises. "
                       + note)


def _confusion_figure(content: dict, copied: Path | None, info, figdir: Path, label: str, from_analysis: str) -> Figure:
    """Figure 5a-b, from ``RUN/analysis`` or from the figure data's matrix."""
    if copied is not None:
        return Figure(copied, f"Adversarial confusion matrix of the clean-correct points. {from_analysis}")
    matrix = content["tensors"]["confusion"]
    png = Path(matrices.plot_confusion(matrix, info.classes, figdir / "confusion.png",
                                       title=f"Adversarial confusion ({label})")["png"])
    n_correct = int(matrix.sum())
    n_fooled = n_correct - int(matrix.diagonal().sum())
    return Figure(png, f"Adversarial confusion matrix: rows are true classes, columns the PGD-20 prediction, of the "
                       f"{n_correct} clean-correct points ({n_fooled} fooled); rows sum to 100%, the diagonal is the "
                       "robust fraction per class.")


def _geometry_figures(content: dict, info, figdir: Path, label: str) -> list:
    """The prototypes' cosine similarities and the PCA of the test embeddings (prototype heads)."""
    t = content["tensors"]
    if "prototype_cosines" not in t:
        return [Para("Linear head: no prototypes, so no prototype geometry.", note=True)]
    cos = t["prototype_cosines"]
    written = matrices.plot_prototype_similarity(cos, info.classes, figdir / "prototype_similarity.png",
                                                 title=f"Prototype cosine similarity ({label})")
    k = cos.shape[0]
    blocks = [Figure(Path(written["png"]),
                     f"Pairwise cosine similarity of the {k} prototypes: max off-diagonal {written['max_cosine']:.3f}, "
                     f"mean {written['mean_cosine']:.3f}. Repulsive prototypes are spread apart: off-diagonal values "
                     "near or below zero.")]
    cosine = bool(content.get("cosine"))
    projected = {"points": t["pca.points"], "prototypes": t["pca.prototypes"],
                 "explained_variance": t["pca.explained_variance"]}
    written = images.plot_embedding_pca(projected, t["pca.y"], info.classes,
                                        figdir / "embedding_pca.png", normalise=cosine,
                                        title=f"Test embeddings, PCA ({label})")
    ev = written["explained_variance"]
    blocks.append(Figure(Path(written["png"]),
                         f"2-D PCA of the embeddings `model.embed(x)` of {len(projected['points'])} clean test points, "
                         "coloured by true class; stars are the prototypes projected with the same PCA"
                         + (" (embeddings and prototypes normalised to unit length: the cosine head decides by "
                            "direction)" if cosine else "")
                         + f". The two components explain {100 * (ev[0] + ev[1]):.1f}% of the variance."))
    return blocks


def _grid_figure(t: dict, info, figdir: Path, eps: float, norm: str) -> Figure:
    """Clean images, their adversarial examples and the perturbations."""
    ids = t["grid.ids"].tolist()
    written = images.plot_adversarial_grid(t["grid.x"], t["grid.x_adv"], t["grid.y"], t["grid.clean_pred"],
                                           t["grid.adv_pred"], info.classes, figdir / "adversarial_examples.png",
                                           eps=eps, norm=norm, ids=ids)
    return Figure(Path(written["png"]),
                  f"Test points {', '.join(map(str, ids))}: clean image titled 'true: predicted', its adversarial "
                  "example titled with the adversarial prediction (red = wrong), and the "
                  + ("perturbation (x_adv - x) × 0.5/eps + 0.5 (grey: unchanged, black/white: -eps/+eps). "
                     if norm == "linf" else "perturbation scaled to its largest pixel change (grey: unchanged). ")
                  + "Pixels already at 0 or 1 can move one way only and often stay grey. Points the attack fooled "
                    "come first; where PGD-20 failed, the perturbation is not kept and shows as flat grey.")


def _neighbour_figures(content: dict, copied: Path | None, info, figdir: Path, from_analysis: str) -> list:
    """Figure 5c, from ``RUN/analysis`` or from the figure data."""
    if copied is not None:
        return [Figure(copied, "Misclassified adversarial examples (left, 'true→predicted') and their nearest "
                               f"correctly classified training samples of the predicted class. {from_analysis}")]
    if "neighbours_skipped" in content:
        return [Para(f"Neighbour grid skipped: {content['neighbours_skipped']}", note=True)]
    if "neighbours" not in content:
        return []
    t, s = content["tensors"], content["neighbours"]
    found = {key: t[f"neighbours.{key}"] for key in ("queries", "y", "pred", "query_ids", "indices", "train_images",
                                                      "train_labels", "train_ids", "distances")}
    written = analyses.draw_neighbours(found, info.classes, figdir / "neighbours.png")
    return [Figure(Path(written["png"]),
                   f"{s['rows']} of the {s['n_misclassified']} misclassified adversarial examples (left, titled "
                   "'true→predicted') and their 5 nearest correctly classified training samples of the predicted "
                   f"class among the first {s['pool']} training images, by {s['distance']} distance in representation "
                   "space (embeddings for prototype models, class scores otherwise).")]

