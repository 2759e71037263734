"""The shape of the code, in figures: files and lines per wing, the longest import chain, the
imports that cross wings, the longest function, the most positional parameters, the README and
the fronts, and the core reading path.

    python bench/layout.py                      # this checkout
    python bench/layout.py --root ../old --map moved.json   # another tree, its modules renamed
                                                            # to today's (old -> new) first

Wings are the floor plan's, as tests/test_layout.py assigns them (imports at module level,
inside functions and under TYPE_CHECKING all count).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
from collections import Counter
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
CORE = ("model/gpt.py", "model/training/loop.py", "model/inference/sampling.py")


def layout_rules():
    """tests/test_layout.py, which holds the floor plan's wing for every module."""
    spec = importlib.util.spec_from_file_location("layout_rules", HERE / "tests/test_layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def functions(path: Path) -> list[tuple[str, int, int]]:
    """(name, lines, positional parameters) of every function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = [a for a in node.args.posonlyargs + node.args.args
                      if a.arg not in ("self", "cls")]
            out.append((node.name, node.end_lineno - node.lineno + 1, len(params)))
    return out


def lines(path: Path) -> int:
    return path.read_text(encoding="utf-8").count("\n") if path.is_file() else 0


def measure(root: Path, renamed: dict[str, str]) -> dict:
    rules = layout_rules()
    known = rules.modules_of(root)
    graph = {m: rules.imports(m, known) for m in known}

    def wing(module: str) -> str:
        try:
            return rules.wing(renamed.get(module, module))
        except (AssertionError, IndexError):
            return "unplaced"

    files, line_count = Counter(), Counter()
    for m, p in known.items():
        files[wing(m)] += 1
        line_count[wing(m)] += lines(p)

    open_now: set[str] = set()

    @cache
    def chain(m: str) -> tuple[str, ...]:
        """The longest chain of imports from m (an edge back into the chain is not followed)."""
        open_now.add(m)
        best: tuple[str, ...] = (m,)
        for n in sorted(graph[m]):
            if n not in open_now:
                best = max(best, (m, *chain(n)), key=len)
        open_now.discard(m)
        return best

    longest = max((chain(m) for m in graph), key=len)
    edges = [(m, n) for m, targets in graph.items() for n in targets]
    crossing = [(m, n) for m, n in edges if wing(m) != wing(n)]
    defs = [(f"{m}.{name}", n_lines, n_pos) for m, p in known.items()
            for name, n_lines, n_pos in functions(p)]
    longest_fn = max(defs, key=lambda d: d[1])
    most_positional = max(defs, key=lambda d: d[2])
    return {
        "modules": len(known), "lines": sum(line_count.values()),
        "top_level_modules": sum(1 for p in (root / "model").glob("*.py")
                                 if p.name != "__init__.py"),
        "files_per_wing": dict(sorted(files.items())),
        "lines_per_wing": dict(sorted(line_count.items())),
        "imports": len(edges), "imports_across_wings": len(crossing),
        "longest_import_chain": {"modules": len(longest), "chain": " -> ".join(longest)},
        "longest_function": {"name": longest_fn[0], "lines": longest_fn[1]},
        "most_positional_parameters": {"name": most_positional[0],
                                       "count": most_positional[2]},
        "functions_over_five_positional": sum(1 for d in defs if d[2] > 5),
        "modules_over_500_lines": sum(1 for p in known.values() if lines(p) > 500),
        "readme_lines": lines(root / "README.md"),
        "train_py_lines": lines(root / "train.py"),
        "sample_py_lines": lines(root / "sample.py"),
        "core_reading_path": {f: lines(root / f) for f in CORE},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=HERE, help="the checkout to measure")
    parser.add_argument("--map", type=Path, help="JSON {old module: today's module}, for a "
                                                 "tree from before the wings")
    args = parser.parse_args()
    renamed = json.loads(args.map.read_text()) if args.map else {}
    print(json.dumps(measure(args.root.resolve(), renamed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
