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

from .errors import UserError

DEMO_CONFIG = {
    "data": {"name": "digits"},
    "model": {"name": "mlp", "width": 1.0},
    "prototypes": {"dim": 64, "metric": "linf", "epochs": 100, "lr": 0.01, "distance": "cosine"},
    "train": {"method": "prototype", "epochs": 40, "batch_size": 64, "lr": 0.05, "lr_min": 0.0,
              "schedule": "cyclic", "weight_decay": 5e-4, "precision": "fp32", "eps": 0.1, "alpha": 0.025,
              "val_n": 200},
    "eval": {"suite": "quick", "n": 1000, "eps": 0.1},
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line and exits 2."""

    def error(self, message):
        self.exit(2, f"repulsor: error: {message} (see {self.prog} --help)\n")


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_common(parser):
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="repulsor", formatter_class=_formatter,
                     description="Deep repulsive prototypes for adversarial robustness, and an evaluation a defence cannot fool.",
                     epilog="example:\n  repulsor demo --out runs/demo\n  repulsor <command> --help")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", formatter_class=_formatter, help="train and evaluate a prototype model on the embedded digits data (about a minute)",
                          epilog="example:\n  repulsor demo --out runs/demo")
    demo.add_argument("--out", default="runs/demo", help="run folder to create (default: runs/demo)")
    _add_common(demo)

    train = sub.add_parser("train", formatter_class=_formatter, help="train a model from a TOML config",
                           epilog="examples:\n"
                                  "  repulsor train --config configs/mnist-prototype.toml --data-dir ../shared/data/mnist --out runs/mnist\n"
                                  "  repulsor train --config configs/mnist-prototype.toml --set train.epochs=2 --out runs/try\n"
                                  "  repulsor train --resume runs/mnist")
    train.add_argument("--config", help="TOML config file (default: built-in defaults)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=0.05 --set train.eps=8/255")
    train.add_argument("--data-dir", help="folder of the data set (official files or .npz)")
    train.add_argument("--out", help="run folder to create")
    train.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    train.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to RUN/tensorboard")
    _add_common(train)

    ev = sub.add_parser("evaluate", formatter_class=_formatter, help="clean and robust accuracy of a run",
                        epilog="examples:\n  repulsor evaluate runs/demo\n"
                               "  repulsor evaluate runs/mnist --suite standard --n 500 --eps 0.3")
    ev.add_argument("run", help="run folder written by repulsor train")
    ev.add_argument("--suite", help="quick | paper | standard | adaptive (default: the run's eval.suite)")
    ev.add_argument("--n", type=int, help="first N test points, unshuffled (default: the run's eval.n)")
    ev.add_argument("--eps", type=_fraction, help="perturbation size in [0, 1], e.g. 8/255 (default: the run's eval.eps)")
    ev.add_argument("--norm", choices=("linf", "l2"), help="threat model (default: the run's eval.norm)")
    ev.add_argument("--seed", type=int, help="seed of random starts and queries")
    ev.add_argument("--batch-size", type=int, help="examples per attack call")
    ev.add_argument("--data-dir", help="folder of the test data (default: the run's data.test_dir or data.data_dir)")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    _add_common(ev)

    an = sub.add_parser("analyse", formatter_class=_formatter,
                        help="the paper's analyses: robustness curve, adversarial confusion, neighbours, overlap",
                        epilog="examples:\n  repulsor analyse runs/mnist-prototype\n"
                               "  repulsor analyse runs/mnist-prototype --other runs/mnist-ce --n 500")
    an.add_argument("run", help="run folder written by repulsor train")
    an.add_argument("--other", help="a second run on the same data: overlap of misclassified adversarial examples")
    an.add_argument("--n", type=int, default=500, help="first N test points (default 500)")
    an.add_argument("--data-dir", help="folder of the data (default: the run's)")
    _add_common(an)

    proto = sub.add_parser("prototypes", formatter_class=_formatter, help="generate repulsive prototypes and print their separation",
                           epilog="example:\n  repulsor prototypes --classes 10 --dim 100 --metric linf --epochs 100 --lr 0.01 --seed 0 --out P.safetensors")
    proto.add_argument("--classes", type=int, required=True, help="number of classes k")
    proto.add_argument("--dim", type=int, required=True, help="output dimension D")
    proto.add_argument("--metric", default="linf", choices=("linf", "l2", "cosine"))
    proto.add_argument("--epochs", type=int, default=100)
    proto.add_argument("--lr", type=float, default=0.01)
    proto.add_argument("--seed", type=int, default=0)
    proto.add_argument("--out", help="safetensors file to write")

    cmp = sub.add_parser("compare", formatter_class=_formatter,
                         help="train and evaluate several methods under one protocol; write the paper's tables",
                         epilog="examples:\n"
                                "  repulsor compare configs/compare-digits-tiny.toml --out runs/compare-tiny\n"
                                "  repulsor compare configs/compare-mnist-cpu.toml --out runs/cmp-mnist --only ce pgd_at\n"
                                "run the same command again to resume: finished runs and suites are not redone.\n"
                                "writes OUT/comparison.json, OUT/tables.md, OUT/robustness_curves.png, OUT/epochs.png")
    cmp.add_argument("config", help="compare TOML file ([compare] methods = [...], shared sections, [method.NAME.train] overrides)")
    cmp.add_argument("--out", required=True, help="comparison folder; each method trains into OUT/METHOD")
    cmp.add_argument("--only", nargs="+", metavar="METHOD", help="train and evaluate only these runs now (methods or prototype-D<dim>)")
    _add_common(cmp)

    report = sub.add_parser("report", formatter_class=_formatter,
                            help="write report.html (self-contained) and report.md for runs and comparison folders",
                            epilog="examples:\n  repulsor report runs/demo --out reports/demo\n"
                                   "  repulsor report runs/compare-mnist runs/mnist --out reports/mnist --n 200")
    report.add_argument("paths", nargs="+", metavar="RUN_OR_COMPARE_DIR",
                        help="run folders (config.toml) and comparison folders (comparison.json)")
    report.add_argument("--out", required=True, help="report folder to write (report.html, report.md, figures/)")
    report.add_argument("--n", type=int,
                        help="first N test points attacked (PGD-20) for the figures (default: 200 per run; "
                             "300 / number of methods, at most 100, per method of a comparison)")
    report.add_argument("--data-dir", help="folder of the data set (default: the runs' configs)")
    report.add_argument("--no-neighbours", action="store_true",
                        help="skip the nearest-neighbour grid (it loads the training split)")
    report.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    _add_common(report)

    export = sub.add_parser("export", formatter_class=_formatter,
                            help="write a standalone model (model.py + model.safetensors) that does not need repulsor",
                            epilog="example:\n  repulsor export runs/demo --out exports/demo\n"
                                   "  python -c \"import sys; sys.path.insert(0, 'exports/demo'); "
                                   "from model import load_model; print(load_model())\"")
    export.add_argument("run", help="run folder written by repulsor train")
    export.add_argument("--out", required=True, help="folder to write model.py, model.safetensors and README.md into")
    return parser


def _fraction(text: str) -> float:
    from .config import parse_fraction

    try:
        return parse_fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a number; write 0.0314 or 8/255") from None


def _print_results(results: dict, suite: str | None = None) -> None:
    """Print every attack evaluated so far, and the sanity verdicts of ``suite``."""
    print(f"data: {results['dataset']} {results['split']}, first {results['n']} points")
    print(f"clean accuracy: {results['clean_accuracy']:.4f}")
    for entry in results["attacks"]:
        print(f"  [{entry['suite']}] {entry['name']:<34} {entry['norm']} eps={entry['eps']:.4f}"
              f"  accuracy after: {entry['accuracy']:.4f}  ({entry['seconds']:.1f}s)")
    for name, acc in results["worst_case"].items():
        print(f"worst case over suite {name}: {acc:.4f}")
    if suite in results.get("suites", {}):
        for verdict in results["suites"][suite].get("sanity", []):
            print(("WARN " if not verdict["ok"] else "ok   ") + verdict["message"])


def cmd_demo(args) -> int:
    from .config import from_dict
    from .train import train

    out = train(from_dict(DEMO_CONFIG), args.out, quiet=args.quiet)
    results = json.loads((Path(out) / "results.json").read_text())
    _print_results(results, results.get("last_suite"))
    print(f"run folder: {out}")
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    if args.resume:
        if args.config or args.set or args.out or args.data_dir:
            raise UserError("--resume takes the run's own config; do not combine it with --config, --set, --data-dir or --out")
        out = train(None, args.resume, resume=True, quiet=args.quiet, tensorboard=args.tensorboard)
    else:
        if not args.out:
            raise UserError("train needs --out RUN_FOLDER (or --resume RUN)")
        overrides = list(args.set)
        if args.data_dir:
            overrides.append(f"data.data_dir={json.dumps(args.data_dir)}")
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
    from .evaluate import evaluate_run

    results = evaluate_run(args.run, suite=args.suite, n=args.n, eps=args.eps, norm=args.norm,
                           data_dir=args.data_dir, seed=args.seed, batch_size=args.batch_size,
                           device=args.device, quiet=args.quiet)
    if results:  # empty on ranks other than 0 under torchrun
        _print_results(results, results.get("last_suite"))
    return 0


def cmd_analyse(args) -> int:
    from .analysis import analyse_run

    if args.n < 1:
        raise UserError(f"--n {args.n}: give at least one test point")
    summary = analyse_run(args.run, n=args.n, other_run=args.other, data_dir=args.data_dir, quiet=args.quiet)
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
        print(f"wrote {args.out}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare, format_tables

    report = compare(args.config, args.out, quiet=args.quiet, only=args.only)
    print(format_tables(report))
    print(f"comparison folder: {args.out} (comparison.json, tables.md, robustness_curves.png, epochs.png)")
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    result = build_report(args.paths, args.out, n=args.n, data_dir=args.data_dir, device=args.device,
                          quiet=args.quiet, neighbours=not args.no_neighbours)
    print(f"wrote {result['html']} and {result['md']} ({result['seconds']:.1f}s)")
    return 0


def cmd_export(args) -> int:
    from .export import export_run

    result = export_run(args.run, args.out)
    for key in ("model_py", "weights", "readme"):
        print(f"wrote {result[key]}")
    print(f"load it without repulsor: import sys; sys.path.insert(0, {args.out!r}); "
          "from model import load_model; model = load_model()")
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "evaluate": cmd_evaluate, "prototypes": cmd_prototypes,
            "compare": cmd_compare, "report": cmd_report, "export": cmd_export, "analyse": cmd_analyse}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        print(f"repulsor: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("repulsor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
