"""Export a run as a standalone model and attack it from outside repulsor.

    python examples/export_and_attack.py                    # trains a tiny digits run first (seconds)
    python examples/export_and_attack.py runs/demo --out exports/demo

``repulsor export`` writes ``model.py`` (the architecture in plain PyTorch: no repulsor
import), ``model.safetensors`` and a README. Here the exported model is loaded the way a
user without repulsor would load it, then attacked: with ``repulsor.evaluate`` (which takes
any ``nn.Module``) and, when they are installed, with torchattacks and AutoAttack.
"""

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

import repulsor
from repulsor.export import export_run

TINY = {"data": {"name": "digits"}, "model": {"name": "mlp", "width": 0.5}, "prototypes": {"dim": 32, "epochs": 50},
        "train": {"method": "prototype", "epochs": 8, "batch_size": 64, "lr": 0.05, "precision": "fp32", "eps": 0.1,
                  "alpha": 0.025, "val_n": 100},
        "eval": {"n": 200, "eps": 0.1}}


def load_exported(folder: Path) -> torch.nn.Module:
    """Import ``folder/model.py`` as a plain module (as ``sys.path.insert(0, folder); from model import ...``)."""
    spec = importlib.util.spec_from_file_location("exported_model", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_model(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="run folder (default: train a tiny digits run)")
    parser.add_argument("--out", help="export folder, kept (default: a temporary folder, removed at the end)")
    parser.add_argument("--n", type=int, default=200, help="first N test points to attack (default: 200)")
    args = parser.parse_args()

    # Whatever the example makes for itself lives in a temporary folder removed at the end.
    with tempfile.TemporaryDirectory(prefix="repulsor-example-") as tmp:
        work = Path(tmp)
        run = Path(args.run) if args.run else None
        if run is None:
            print(f"training a tiny digits prototype run in {work / 'run'} ...")
            run = repulsor.train(repulsor.config.from_dict(TINY), work / "run", quiet=True)
        out = Path(args.out) if args.out else work / "export"
        export_run(run, out)
        print(f"exported {run} to {out}: model.py, model.safetensors, README.md")
        attack_exported(out, repulsor.load_config(run / "config.toml"), args.n)
    return 0


def attack_exported(out: Path, cfg, n: int) -> None:
    """Load the exported model without repulsor and attack it with repulsor and, if installed, others."""
    model = load_exported(out)  # its classes live in model.py, not in repulsor
    data_dir = cfg.data.test_dir or cfg.data.data_dir or None
    x, y = repulsor.load_dataset(cfg.data.name, "test", data_dir=data_dir)
    x, y = x[:n], y[:n]
    eps, norm = cfg.eval.eps, cfg.eval.norm
    print(f"{type(model).__module__}.{type(model).__name__}: [N, {', '.join(map(str, x.shape[1:]))}] in [0, 1] -> "
          f"{model(x[:1]).shape[1]} class scores")

    result = repulsor.evaluate(model, x, y, suite="quick", eps=eps, norm=norm, seed=cfg.eval.seed)
    print(f"repulsor.evaluate, quick suite (PGD-20), {norm} eps={eps:g}: clean {result['clean_accuracy']:.4f}, "
          f"robust {result['robust_accuracy']:.4f}")

    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed (pip install --no-deps torchattacks scipy: without --no-deps it pulls"
              " torchvision, which replaces or breaks this torch); skipping it")
    else:
        attack = (torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=20, random_start=True) if norm == "linf"
                  else torchattacks.PGDL2(model, eps=eps, alpha=eps / 4, steps=20, random_start=True))
        x_adv = attack(x, y)
        with torch.no_grad():
            print(f"torchattacks PGD-20: robust {(model(x_adv).argmax(1) == y).float().mean().item():.4f}")
    try:
        from autoattack import AutoAttack
    except ImportError:
        print("AutoAttack is not installed (pip install --no-deps git+https://github.com/fra31/auto-attack); skipping it")
    else:
        adversary = AutoAttack(model, norm="Linf" if norm == "linf" else "L2", eps=eps, version="standard")
        x_adv = adversary.run_standard_evaluation(x, y, bs=256)
        with torch.no_grad():
            print(f"AutoAttack standard: robust {(model(x_adv).argmax(1) == y).float().mean().item():.4f}")


if __name__ == "__main__":
    sys.exit(main())
