"""Build the README's finding table from the runs' results.json files (no number typed by hand).

    python results/finding/table.py results/finding/mnist-prototype results/finding/mnist-ce ...
"""

import json
import sys
from pathlib import Path

COLUMNS = [
    ("quick", "PGD-20 (CE)"),
    ("paper", "paper: PGD-20 / PGD-100 (authors' loss)"),
    ("standard", "standard (AutoAttack-style)"),
    ("adaptive", "adaptive"),
]


def cell(suites: dict, key: str) -> str:
    if key not in suites:
        return "–"
    res = suites[key]
    if key.startswith("paper"):
        pgd = {a["name"].split(" ")[0]: a["accuracy"] for a in res["attacks"]}
        return f"{100 * pgd.get('pgd-20', float('nan')):.1f} / {100 * pgd.get('pgd-100', float('nan')):.1f}"
    warn = any(not v["ok"] for v in res.get("sanity", []))
    return f"{100 * res['robust_accuracy']:.1f}" + (" ⚠" if warn else "") + f" (n={res['n']})"


def main(runs: list[str]) -> None:
    for tag in ("", "@"):
        header = ["run", "method", "eps", "clean"] + [title for _, title in COLUMNS]
        rows = []
        for run in runs:
            results = json.loads((Path(run) / "results.json").read_text())
            config = (Path(run) / "config.toml").read_text()
            method = next(line.split("=")[1].strip().strip('"') for line in config.splitlines()
                          if line.startswith("method"))
            suites = results["suites"]
            groups = {}
            for key, res in suites.items():
                base, _, threat = key.partition("@")
                groups.setdefault(threat, {})[base] = res
            for threat, group in groups.items():
                if bool(threat) != bool(tag):
                    continue
                any_res = next(iter(group.values()))
                eps = any_res["eps"]
                clean = max(group.values(), key=lambda r: r["n"])
                rows.append([Path(run).name, method, f"{eps:.4g}" + (f" ({eps * 255:.0f}/255)" if eps < 0.1 else ""),
                             f"{100 * clean['clean_accuracy']:.1f} (n={clean['n']})"]
                            + [cell(group, key) for key, _ in COLUMNS])
        if not rows:
            continue
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
