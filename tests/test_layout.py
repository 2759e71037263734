"""The floor plan of model/ (its docstring states it), checked on the source itself: which wing
may import which, no import cycle of any kind, only the command lines parse arguments or
print, modules of a few hundred lines, and no function with more than five positional
parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "model"

# A wing and the wings its modules may import (each may import itself). model/__init__.py is
# the public API: it imports nothing statically (its names load lazily).
MAY_IMPORT = {
    "base": set(),
    "network": {"base"},
    "data": {"base"},
    "config": {"base", "network", "data"},
    "weights": {"base", "network", "data", "config"},
    "training": {"base", "network", "data", "config", "weights"},
    "inference": {"base", "network", "data", "config", "weights"},
    "serve": {"base", "network", "data", "config", "weights", "inference"},
    "cli": {"base", "network", "data", "config", "weights", "training", "inference", "serve"},
}
MAY_IMPORT["api"] = set(MAY_IMPORT)  # the public API: every wing's names (loaded lazily)
BASE = {"model.errors", "model.files", "model.progress", "model.runtime"}
# Modules directly in model/ that belong to a wing other than their name.
INFERENCE = {"model.patching"}  # TransformerLens's patching sweeps, as `model.patching`
# `python -m model.<command>` doors: they belong to the command lines, wherever they stand.
DOORS = {"model.explore", "model.export", "model.chat_eval", "model.data.__main__",
         "model.serve.__main__"}
MAX_LINES = 500
MAX_POSITIONAL = 5
MAX_TOP_LEVEL = 10


def modules_of(root: Path) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name."""
    found = {}
    for path in sorted((root / "model").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules_of(ROOT)


def wing(module: str) -> str:
    if module == "model":
        return "api"
    if module in DOORS or module.startswith("model.cli"):
        return "cli"
    if module in BASE:
        return "base"
    if module == "model.gpt" or module.startswith("model.network"):
        return "network"
    if module == "model.config":
        return "config"
    if module in INFERENCE:
        return "inference"
    second = module.split(".")[1]
    assert second in MAY_IMPORT, f"{module} stands in no wing; add it to the floor plan"
    return second


def imports(module: str, modules: dict[str, Path] = MODULES) -> set[str]:
    """Every module of model/ that `module` imports: at the top, inside functions and under
    TYPE_CHECKING alike."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from package import submodule` imports the submodule; anything else, the module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and name != "model":
                found.add(name)
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_every_import_follows_the_direction_the_package_docstring_states():
    wrong = [f"{m} ({wing(m)}) imports {i} ({wing(i)})" for m, targets in GRAPH.items()
             for i in sorted(targets) if m != "model"
             and wing(i) != wing(m) and wing(i) not in MAY_IMPORT[wing(m)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_of_any_kind():
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_package_docstring_states_the_directions():
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8")))
    for name in MAY_IMPORT:
        assert name == "api" or name in doc, f"model/__init__.py does not mention the {name} wing"


def calls(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            names.append(f.id if isinstance(f, ast.Name) else
                         f.attr if isinstance(f, ast.Attribute) else "")
    return names


@pytest.mark.parametrize("module", [m for m in MODULES if wing(m) not in ("cli", "api")])
def test_only_the_command_lines_parse_arguments_or_print(module):
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for a in (node.names if isinstance(node, ast.Import) else
                          [ast.alias(node.module or "")])}
    for name in ("argparse", "tqdm"):
        assert name not in imported, f"{module} imports {name}"
    assert "print" not in calls(tree), f"{module} prints"
    source = MODULES[module].read_text(encoding="utf-8")
    assert "sys.stdout" not in source and "sys.stderr" not in source, module


@pytest.mark.parametrize("module", list(MODULES))
def test_modules_stay_a_few_hundred_lines(module):
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{module} has {lines} lines"


def test_few_modules_stand_directly_in_the_package():
    top = [p for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= MAX_TOP_LEVEL, sorted(p.name for p in top)


def test_no_function_takes_more_than_five_positional_parameters():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = [a.arg for a in node.args.posonlyargs + node.args.args
                          if a.arg not in ("self", "cls")]
                if len(params) > MAX_POSITIONAL:
                    long.append(f"{module}.{node.name}: {len(params)}")
    assert not long, "\n".join(long)
