"""The ``repulsor`` command line.

User mistakes (a wrong path, a malformed config, a bad value) print one line to stderr
and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .version import __version__
from .errors import Interrupted, UserError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line and exits 2."""

    def error(self, message):
        self.exit(2, f"repulsor: error: {message} (see {self.prog} --help)\n")


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_common(parser, *, sets: str = "the config") -> None:
    """The flags every command that loads data or models takes, with one meaning everywhere."""
    parser.add_argument("--data-dir", help="folder of the data set (official files or .npz); default: the config's "
                                           "data folder, or $REPULSOR_DATA/NAME")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's train.device, auto)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override a value of {sets}, e.g. --set eval.batch_size=128 (repeatable)")
    parser.add_argument("--n", type=int, help="evaluate on the first N test points, unshuffled (default: the "
                                              "config's eval.n)")
    parser.add_argument("--eps", type=_fraction, help="perturbation size of the evaluation in [0, 1], e.g. 8/255 "
                                                      "(default: the config's eval.eps)")
    parser.add_argument("--seed", type=int, help="seed of the evaluation's random starts and queries (default: "
                                                 "the config's eval.seed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress lines (nor the plan said"
                                                             " before a run starts)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="repulsor", formatter_class=_formatter,
                     description="Deep repulsive prototypes for adversarial robustness, and an evaluation a defence cannot fool.",
                     epilog="example:\n  repulsor demo --out runs/demo\n  repulsor <command> --help\n\n"
                            "every command that loads data or models takes --data-dir, --device, --set and --quiet;\n"
                            "every command that evaluates takes --n, --eps and --seed, with the same meaning.\n"
                            "Ctrl-C saves what is done and exits with status 130, saying how to continue;\n"
                            "a user mistake prints one line and exits with status 2.")
    parser.add_argument("--version", action="version", version=f"repulsor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_demo_parser, _train_parser, _evaluate_parser, _certify_parser, _diagnose_parser, _analyse_parser,
                _prototypes_parser, _compare_parser, _report_parser, _export_parser):
        add(sub)  # one function per command, in the order of --help
    return parser


def _demo_parser(sub) -> None:
    demo = sub.add_parser("demo", formatter_class=_formatter,
                          help="train a prototype model on the embedded digits data and evaluate it, weak and strong "
                               "attack side by side (under a minute)",
                          epilog="example:\n  repulsor demo --out runs/demo\n"
                                 "run it again: a finished demo shows its results, an interrupted one continues.")
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    _add_common(demo, sets="the demo's config")


def _train_parser(sub) -> None:
    train = sub.add_parser("train", formatter_class=_formatter, help="train a model from a TOML config",
                           epilog="examples:\n"
                                  "  repulsor train --config configs/mnist-prototype.toml --data-dir ../shared/data/mnist --out runs/mnist\n"
                                  "  repulsor train --config configs/mnist-prototype.toml --data-dir ../shared/data/mnist \\\n"
                                  "      --set train.epochs=2 --no-eval --out runs/try\n"
                                  "  repulsor train --set prototypes.file=P.safetensors --set prototypes.dim=100 --out runs/own-prototypes\n"
                                  "  repulsor train --resume runs/mnist\n"
                                  "after training the run is evaluated (eval.suite on the first eval.n test points);\n"
                                  "--no-eval skips that, and --n, --eps and --seed change it.")
    train.add_argument("--config", help="TOML config file (default: built-in defaults)")
    train.add_argument("--out", help="run folder to create")
    train.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    train.add_argument("--no-eval", action="store_true", help="do not evaluate on the test split after training")
    train.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to RUN/tensorboard")
    _add_common(train)


def _evaluate_parser(sub) -> None:
    ev = sub.add_parser("evaluate", formatter_class=_formatter, help="clean and robust accuracy of a run",
                        epilog="examples:\n  repulsor evaluate runs/demo\n"
                               "  repulsor evaluate runs/mnist --suite standard --n 500 --eps 0.3\n"
                               "  repulsor evaluate runs/mnist --suite rand --n 100\n"
                               "  repulsor evaluate runs/mnist-prototype --surrogate runs/mnist-ce\n"
                               "Ctrl-C keeps the attacks already finished: run the same command again to continue.")
    ev.add_argument("run", help="run folder written by repulsor train")
    ev.add_argument("--suite", help="quick | margin | paper | standard | adaptive | rand (default: the run's eval.suite;"
                    " rand: EOT attacks for a randomised model)")
    ev.add_argument("--surrogate", metavar="RUN", help="another run whose model crafts a transfer attack, added at"
                    " the end of the cascade (for a model without useful gradients)")
    ev.add_argument("--norm", choices=("linf", "l2", "l1"), help="threat model (default: the run's eval.norm)")
    ev.add_argument("--batch-size", type=int, help="examples per attack call (default: the run's eval.batch_size)")
    ev.add_argument("--certify", choices=("crown", "crown-ibp", "ibp"), help="also certify the same points (a lower bound beside"
                    " the attacked upper bound; repulsor certify)")
    _add_common(ev, sets="the run's config for this command (eval.* and data folders)")


def _certify_parser(sub) -> None:
    cert = sub.add_parser("certify", formatter_class=_formatter,
                          help="certified accuracy: a lower bound that no attack in the threat model can lower",
                          epilog="examples:\n  repulsor certify runs/mnist --n 500 --eps 0.1\n"
                                 "  repulsor certify runs/mnist --method ibp --n 1000\n"
                                 "beside a suite run on the same points it prints the bracket: robust accuracy lies\n"
                                 "between the certified (lower) and the attacked (upper) number.")
    cert.add_argument("run", help="run folder written by repulsor train")
    cert.add_argument("--method", choices=("crown", "crown-ibp", "ibp"), default="crown",
                      help="crown (tightest, default; its cost grows with the square of the neurons), crown-ibp (CROWN on"
                           " the margins over interval bounds: about IBP's cost) or ibp")
    cert.add_argument("--norm", choices=("linf", "l2", "l1"), help="threat model (default: the run's eval.norm)")
    cert.add_argument("--batch-size", type=int, default=32, help="points per bound computation (default 32)")
    _add_common(cert, sets="the run's config for this command (eval.* and data folders)")


def _diagnose_parser(sub) -> None:
    from .evaluation.protocols import LOSS_SETTINGS, PROTOCOLS, QUIRKS

    dg = sub.add_parser("diagnose", formatter_class=_formatter,
                        help="reproduce one of the authors' flawed evaluation paths (diagnosis, not robustness)",
                        epilog="examples:\n  repulsor diagnose runs/code-linf --protocol authors-path-b --loss inf\n"
                               "  repulsor diagnose runs/code-linf --protocol authors-path-b --loss inf --off fp16,mismatch\n"
                               "  repulsor diagnose runs/code-linf --protocol authors-transfer --loss inf --surrogate runs/ce\n"
                               "these paths reproduce the protocol of Serban et al.'s public code, quirks included, to\n"
                               "find where its numbers come from; measure robustness with repulsor evaluate --suite standard.")
    dg.add_argument("run", help="run folder written by repulsor train")
    dg.add_argument("--protocol", required=True, help=f"one of {', '.join(p.split(':', 1)[1] for p in PROTOCOLS)}")
    dg.add_argument("--loss", required=True, help=f"the code's loss setting the attack maximises: {', '.join(LOSS_SETTINGS)}"
                    " (ce for a model with a linear head)")
    dg.add_argument("--off", default="", help=f"comma-separated quirks to switch off: {', '.join(QUIRKS)}")
    dg.add_argument("--surrogate", metavar="RUN", help="the cross-entropy run the transfer path crafts its examples on")
    _add_common(dg, sets="the run's config for this command (eval.* and data folders)")


def _analyse_parser(sub) -> None:
    an = sub.add_parser("analyse", formatter_class=_formatter,
                        help="the paper's analyses: robustness curve, adversarial confusion, neighbours, overlap",
                        epilog="examples:\n  repulsor analyse runs/demo\n"
                               "  repulsor analyse runs/mnist-prototype --other runs/mnist-ce --n 500")
    an.add_argument("run", help="run folder written by repulsor train")
    an.add_argument("--other", help="a second run on the same data: overlap of misclassified adversarial examples")
    _add_common(an, sets="the run's config for this command (eval.* and data folders)")


def _prototypes_parser(sub) -> None:
    from .prototypes import METRICS

    proto = sub.add_parser("prototypes", formatter_class=_formatter, help="generate repulsive prototypes and print their separation",
                           epilog="example:\n  repulsor prototypes --classes 10 --dim 100 --metric linf --epochs 100 --lr 0.01 --seed 0 --out P.safetensors\n"
                                  "train with them:\n  repulsor train --set prototypes.file=P.safetensors --set prototypes.dim=100 --out runs/own-prototypes")
    proto.add_argument("--classes", type=int, required=True, help="number of classes k")
    proto.add_argument("--dim", type=int, required=True, help="output dimension D")
    proto.add_argument("--metric", default="linf", choices=METRICS, help="linf_sum: the authors' code's unbounded"
                       " generation, for diagnosis")
    proto.add_argument("--epochs", type=int, default=100)
    proto.add_argument("--lr", type=float, default=0.01)
    proto.add_argument("--seed", type=int, default=0)
    proto.add_argument("--out", help="safetensors file to write")


def _compare_parser(sub) -> None:
    cmp = sub.add_parser("compare", formatter_class=_formatter,
                         help="train and evaluate several methods under one protocol; write the paper's tables",
                         epilog="examples:\n"
                                "  repulsor compare configs/compare-digits-tiny.toml --out runs/compare-tiny\n"
                                "  repulsor compare configs/compare-mnist-cpu.toml --data-dir ../shared/data/mnist --out runs/cmp-mnist --only ce pgd_at\n"
                                "run the same command again to resume: finished runs and suites are not redone.\n"
                                "--set, --n, --eps and --seed change the shared sections for every method\n"
                                "(--n is compare.eval_n).\n"
                                "writes OUT/comparison.json, OUT/tables.md, OUT/robustness_curves.png, OUT/epochs.png")
    cmp.add_argument("config", help="compare TOML file ([compare] methods = [...], shared sections, [method.NAME.train] overrides)")
    cmp.add_argument("--out", required=True, help="comparison folder; each method trains into OUT/METHOD")
    cmp.add_argument("--only", nargs="+", metavar="METHOD", help="train and evaluate only these runs now (methods or prototype-D<dim>)")
    _add_common(cmp, sets="the compare config's shared sections")


def _report_parser(sub) -> None:
    report = sub.add_parser("report", formatter_class=_formatter,
                            help="write report.html (self-contained) and report.md for runs and comparison folders",
                            epilog="examples:\n  repulsor report runs/demo --out reports/demo\n"
                                   "  repulsor report runs/compare-mnist runs/mnist --out reports/mnist --n 200\n"
                                   "the figures attack the first --n test points of each run with PGD-20 (default:\n"
                                   "each run's eval.n), once: their data is kept in OUT/figures, so running the same\n"
                                   "command again re-renders the report without loading the models.")
    report.add_argument("paths", nargs="+", metavar="RUN_OR_COMPARE_DIR",
                        help="run folders (config.toml) and comparison folders (comparison.json)")
    report.add_argument("--out", required=True, help="report folder to write (report.html, report.md, figures/)")
    report.add_argument("--no-neighbours", action="store_true",
                        help="skip the nearest-neighbour grid (it loads the training split)")
    _add_common(report, sets="each run's config for this command (eval.* and data folders)")


def _export_parser(sub) -> None:
    export = sub.add_parser("export", formatter_class=_formatter,
                            help="write a standalone model (model.py + model.safetensors) that does not need repulsor",
                            epilog="example:\n  repulsor export runs/demo --out exports/demo\n"
                                   "  python -c \"import sys; sys.path.insert(0, 'exports/demo'); "
                                   "from model import load_model; print(load_model())\"\n"
                                   "an existing export is never overwritten: choose a new --out.")
    export.add_argument("run", help="run folder written by repulsor train")
    export.add_argument("--out", required=True, help="folder to write model.py, model.safetensors and README.md into")
    export.add_argument("--model-info", action="store_true", help="also write RobustBench's model_info.json, from the"
                        " run's standard suite (refused unless it covers enough test points)")
    export.add_argument("--model-info-n", type=int, metavar="N", help="the test points the standard result must cover"
                        " (default: the whole official test split, e.g. 10000 for CIFAR-10)")


def _fraction(text: str) -> float:
    from .config import parse_fraction

    try:
        return parse_fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a number; write 0.0314 or 8/255") from None


def _config_overrides(args, *, n_key: str = "eval.n") -> list[str]:
    """--set plus the common flags, as ``section.key=value`` overrides of a config to be trained."""
    overrides = list(args.set)
    if args.data_dir:
        overrides.append(f"data.data_dir={json.dumps(str(Path(args.data_dir).resolve()))}")
    if args.device:
        overrides.append(f"train.device={json.dumps(args.device)}")
    overrides += _eval_overrides(args, n_key=n_key)
    return overrides


def _eval_overrides(args, *, n_key: str | None = "eval.n") -> list[str]:
    overrides = []
    if n_key and args.n is not None:
        overrides.append(f"{n_key}={args.n}")
    if args.eps is not None:
        overrides.append(f"eval.eps={args.eps!r}")
    if args.seed is not None:
        overrides.append(f"eval.seed={args.seed}")
    return overrides


def _interval(accuracy: float, n: int) -> str:
    """`` (95% CI 75.6-89.9%)``: the Wilson interval of an accuracy on ``n`` points, for summary lines."""
    from .formats import wilson_interval

    if not n:
        return ""
    low, high = wilson_interval(round(accuracy * n), n)
    return f" (95% CI {100 * low:.1f}-{100 * high:.1f}%)"


def _print_bracket(results: dict, key: str | None) -> None:
    """The bracket of the suite just evaluated, from its certified bound on the same points."""
    from .report.run_section import bracket_text

    res = results.get("suites", {}).get(key)
    text = bracket_text(res, results) if res else ""
    if text:
        print(f"  {text}")


def _print_results(results: dict, key: str | None) -> None:
    """Print the suite ``key`` just evaluated, with its own points and clean accuracy, and its verdicts."""
    from .evaluation.suites import shown_name

    res = results.get("suites", {}).get(key)
    if res is None:
        return
    print(f"suite {key}: {results['dataset']} {results['split']}, first {res['n']} points, {res['norm']} eps = "
          f"{res['eps']:.4g}, seed {res['seed']}")
    print(f"  clean accuracy: {res['clean_accuracy']:.4f}{_interval(res['clean_accuracy'], res['n'])}")
    if res.get("votes", 1) > 1:
        print(f"  the model is randomised: a point counts as correct only if all {res['votes']} forward passes"
              " classify it correctly")
    for entry in res["attacks"]:
        if entry.get("status", "done") != "done":
            print(f"  {shown_name(entry):<34} not applicable: {entry.get('reason', '')}")
            continue
        print(f"  {shown_name(entry):<34} accuracy after: {entry['accuracy']:.4f}{_interval(entry['accuracy'], res['n'])}"
              f"  ({entry['n_attacked']} attacked,"
              f" {entry['seconds']:.1f}s)")
    print(f"  worst case (robust accuracy): {res['robust_accuracy']:.4f}{_interval(res['robust_accuracy'], res['n'])}")
    for verdict in res.get("sanity", []):
        print(("  WARN " if not verdict["ok"] else "  ok   ") + verdict["message"])
    others = [f"{name} {r['robust_accuracy']:.4f} (n={r['n']})" for name, r in results["suites"].items() if name != key]
    if others:
        print(f"earlier evaluations in results.json, each on its own points: {'; '.join(others)}")


def cmd_demo(args) -> int:
    from .demo import run_demo

    summary = run_demo(args.out, overrides=_config_overrides(args), quiet=args.quiet)
    print(summary["text"])
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .training.loop import train

    if args.resume:
        given = [flag for flag, value in (("--config", args.config), ("--set", args.set), ("--out", args.out),
                                          ("--data-dir", args.data_dir), ("--device", args.device), ("--n", args.n),
                                          ("--eps", args.eps), ("--seed", args.seed), ("--no-eval", args.no_eval))
                 if value]
        if given:
            raise UserError(f"--resume takes the run's own config; do not combine it with {', '.join(given)}")
        out = train(None, args.resume, resume=True, quiet=args.quiet, tensorboard=args.tensorboard)
    else:
        if not args.out:
            raise UserError("train needs --out RUN_FOLDER (or --resume RUN)")
        overrides = _config_overrides(args)
        if args.no_eval:
            overrides.append("eval.after_train=false")
        out = train(load_config(args.config, overrides), args.out, quiet=args.quiet, tensorboard=args.tensorboard)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun only rank 0 reports
    results_path = Path(out) / "results.json"
    if results_path.exists():
        results = json.loads(results_path.read_text())
        _print_results(results, results.get("last_suite"))
    print(f"run folder: {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation.run import evaluate_run

    results = evaluate_run(args.run, suite=args.suite, n=args.n, eps=args.eps, norm=args.norm,
                           data_dir=args.data_dir, seed=args.seed, batch_size=args.batch_size,
                           device=args.device or "auto", quiet=args.quiet, overrides=args.set,
                           surrogate=args.surrogate, certify_with=args.certify)
    if results:  # empty on ranks other than 0 under torchrun
        _print_results(results, results.get("last_suite"))
        if args.certify:
            _print_bracket(results, results.get("last_suite"))
    return 0


def cmd_certify(args) -> int:
    from .evaluation.run import certify_run

    r = certify_run(args.run, method=args.method, n=args.n, eps=args.eps, norm=args.norm, batch_size=args.batch_size,
                    device=args.device or "auto", overrides=args.set)
    print(f"certify {r['key']}: first {r['n']} test points")
    print(f"  clean accuracy:     {r['clean_accuracy']:.4f}{_interval(r['clean_accuracy'], r['n'])}")
    print(f"  certified accuracy: {r['certified_accuracy']:.4f}{_interval(r['certified_accuracy'], r['n'])}"
          f" (no input in the threat model changes these points' class; {r['seconds']:.1f}s)")
    if r["bracket"]:
        name, attacked = r["bracket"]
        print(f"  robust accuracy on these {r['n']} points lies between {100 * r['certified_accuracy']:.1f}% (certified)"
              f" and {100 * attacked:.1f}% (after suite {name})")
    return 0


def cmd_diagnose(args) -> int:
    from .evaluation.run import diagnose_run

    off = tuple(q.strip() for q in args.off.split(",") if q.strip())
    r = diagnose_run(args.run, protocol=args.protocol, loss=args.loss, off=off, n=args.n, eps=args.eps, seed=args.seed,
                     surrogate=args.surrogate, device=args.device or "auto", overrides=args.set)
    print(f"{r['protocol']} (a reproduction of a flawed protocol, not a robustness measure), loss setting {r['loss']},"
          f" quirks off: {', '.join(r['off']) or 'none'}; first {r['n']} test points, eps = {r['eps']:.4g}")
    print(f"  clean accuracy (the model's own rule): {r['clean_accuracy']:.4f}")
    print(f"  as the path feeds and scores it:       {r['accuracy_as_fed']:.4f}; after its clamp {r['accuracy_at_start']:.4f}")
    print(f"  after the path's PGD-{r['switches']['steps']}:                 {r['accuracy']:.4f}"
          f" (pooled over all points {r['accuracy_pooled']:.4f}; {r['seconds']:.1f}s)")
    return 0


def cmd_analyse(args) -> int:
    from .analyses import analyse_run, summary_lines

    summary = analyse_run(args.run, n=args.n, other_run=args.other, data_dir=args.data_dir, quiet=args.quiet,
                          device=args.device or "auto", overrides=args.set + _eval_overrides(args, n_key=None))
    for line in summary_lines(summary):
        print(line)
    for name, path in summary["paths"].items():
        print(f"{name:>18}: {path}")
    return 0


def cmd_prototypes(args) -> int:
    from .prototypes import generate_prototypes, prototype_stats, save_prototypes

    prototypes = generate_prototypes(args.classes, args.dim, metric=args.metric, epochs=args.epochs,
                                     lr=args.lr, seed=args.seed)
    for key, value in prototype_stats(prototypes).items():
        print(f"{key:>12}: {value:.4f}")
    if args.out:
        save_prototypes(args.out, prototypes, {"k": args.classes, "D": args.dim, "metric": args.metric,
                                               "epochs": args.epochs, "lr": args.lr, "seed": args.seed})
        print(f"wrote {args.out}; train with them: repulsor train --set prototypes.file={args.out}"
              f" --set prototypes.dim={args.dim} ...")
    return 0


def cmd_compare(args) -> int:
    from .compare.run import compare
    from .compare.tables import format_tables

    report = compare(args.config, args.out, quiet=args.quiet, only=args.only,
                     overrides=_config_overrides(args, n_key="compare.eval_n"))
    print(format_tables(report))
    print(f"comparison folder: {args.out} (comparison.json, tables.md, robustness_curves.png, epochs.png)")
    return 0


def cmd_report(args) -> int:
    from .report.build import build_report

    result = build_report(args.paths, args.out, n=args.n, data_dir=args.data_dir, device=args.device or "auto",
                          quiet=args.quiet, neighbours=not args.no_neighbours,
                          overrides=args.set + _eval_overrides(args, n_key=None))
    print(f"wrote {result['html']} and {result['md']} ({result['seconds']:.1f}s)")
    return 0


def cmd_export(args) -> int:
    from .export import export_run

    result = export_run(args.run, args.out, model_info=args.model_info, model_info_n=args.model_info_n)
    for key in ("model_py", "weights", "readme", "model_info"):
        if key in result:
            print(f"wrote {result[key]}")
    print(f"load it without repulsor: import sys; sys.path.insert(0, {args.out!r}); "
          "from model import load_model; model = load_model()")
    return 0


# What a Ctrl-C outside training leaves, and how to go on (training says it itself).
CONTINUE = {
    "demo": "run the same command again to continue",
    "train": "run the same command again",
    "evaluate": "the attacks already finished are saved; run the same command again to continue",
    "diagnose": "nothing was written; run the same command again",
    "certify": "nothing was written; run the same command again",
    "analyse": "nothing was written; run the same command again",
    "prototypes": "nothing was written; run the same command again",
    "compare": "finished runs and suites are saved; run the same command again to continue",
    "report": "the report was not written; run the same command again",
    "export": "nothing was written; run the same command again",
}

COMMANDS = {"demo": cmd_demo, "train": cmd_train, "evaluate": cmd_evaluate, "certify": cmd_certify, "diagnose": cmd_diagnose,
            "prototypes": cmd_prototypes,
            "compare": cmd_compare, "report": cmd_report, "export": cmd_export, "analyse": cmd_analyse}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except Interrupted as error:
        print(f"repulsor: interrupted: {' '.join(str(error).split())}", file=sys.stderr)
        return 130
    except UserError as error:
        print(f"repulsor: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"repulsor: interrupted: {CONTINUE[args.command]}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
