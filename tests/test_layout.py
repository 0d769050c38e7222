"""The architecture as a test: every import inside src/repulsor goes down the layers, never up, and
no chain of imports comes back to where it started.

Every ``import`` and ``from ... import`` is walked, at module level and inside functions, and
``importlib.import_module("repulsor....")`` calls too; imports under ``if TYPE_CHECKING:`` are
annotations only and never run, so they are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "repulsor"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS = [
    ["repulsor.errors", "repulsor.version", "repulsor.formats", "repulsor.paired", "repulsor.store.layout"],
    ["repulsor.store.files", "repulsor.runtime", "repulsor.evaluation.suites", "repulsor.attacks"],
    ["repulsor.data", "repulsor.prototypes", "repulsor.evaluation.probes", "repulsor.evaluation.sanity", "repulsor.plots"],
    ["repulsor.models", "repulsor.training.methods", "repulsor.certify"],
    ["repulsor.config"],  # checks names against the registries below it
    ["repulsor.store"],  # the run folder: lock, fingerprint, results, loading a run's model
    ["repulsor.evaluation"],  # the cascade on any model; a run folder's evaluation
    ["repulsor.analyses"],  # the paper's analyses: numbers, then their figures
    ["repulsor.training"],  # the one training loop (evaluates at its end)
    ["repulsor.compare", "repulsor.demo", "repulsor.export", "repulsor.robustbench", "repulsor.report"],
    ["repulsor.cli", "repulsor.__main__", "repulsor"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, for every module of src/repulsor."""
    modules = _modules()
    edges = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args
                  and isinstance(node.args[0], ast.Constant)):
                targets.add(node.args[0].value)
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def _layer(module: str) -> int:
    best = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + ".") and prefix != "repulsor":
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_layout.py: add it where it belongs"
    return best[0]


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_no_import_goes_up_a_layer():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, targets in imports().items() for b in sorted(targets) if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = imports()
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_walker_sees_function_level_and_string_imports():
    edges = imports()
    assert "repulsor.evaluation.suites" in edges["repulsor.config"]  # imported inside a function
    assert "repulsor.config" not in edges["repulsor.training.methods"]  # under TYPE_CHECKING only
    assert "repulsor.store.run" in edges["repulsor.evaluation.run"]  # from ..store import run as store


def test_no_module_is_fetched_by_its_name_as_a_string():
    # importlib.import_module hides an edge from a reader; every import is spelled as an import.
    hidden = [str(path.relative_to(SRC)) for path in SRC.rglob("*.py") if "import_module(" in path.read_text()]
    assert not hidden, hidden


def test_no_module_shares_its_name_with_a_public_function_of_the_package():
    import repulsor

    clashes = [name for name in repulsor.__all__ if (SRC / f"{name}.py").exists() or (SRC / name).is_dir()]
    assert not clashes, f"repulsor.{clashes[0]} is both a module and a function"


def _module_names(tree: ast.AST, modules: dict) -> set[str]:
    """Local names a test file binds to modules of repulsor (``from repulsor import data``...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "repulsor":
            names |= {alias.asname or alias.name for alias in node.names if f"{node.module}.{alias.name}" in modules}
        elif isinstance(node, ast.Import):
            names |= {alias.asname for alias in node.names if alias.asname and alias.name in modules}
    return names


def test_tests_reach_public_names_only():
    # A test that reaches a private name (a leading underscore) of repulsor pins an implementation
    # detail; whatever a test needs is public in the module that owns it.
    modules, found = _modules(), []
    for path in sorted(SRC.parents[1].joinpath("tests").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound = _module_names(tree, modules)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "repulsor":
                found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                  and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
            elif (isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("setattr", "setitem")) and len(node.args) >= 2
                  and isinstance(node.args[0], ast.Name) and node.args[0].id in bound
                  and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")):
                found.append(f"{path.name}:{node.lineno}: monkeypatch of {node.args[0].id}.{node.args[1].value}")
    assert not found, "\n".join(found)
