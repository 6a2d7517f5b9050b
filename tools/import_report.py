"""Measures the package's import structure: imports of imgclf modules inside
functions (with the reason comment, if any) and import cycles at every depth
(strongly connected components of the module graph, counting function-level
imports too, since they run). Imports that point up the layer order are
lint-imports' job (the contract in pyproject.toml is the one layer list).
Also the house's size: modules over MODULE_LINES lines and the longest
functions (def to last line, docstring included).

    python tools/import_report.py [--list] [--check]

--check fails (exit 1) on a cycle, an imgclf import inside a function without
a reason comment, or more than MAX_DEFERRED of them.

"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

MAX_DEFERRED = 30
MODULE_LINES = 500  # a module longer than this is reported (a function: LONGEST of them)
LONGEST = 5
ROOT = Path(__file__).resolve().parents[1] / "imgclf"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path):
    """(target module, line, inside a function?, comment on that line) for each imgclf import."""
    src = path.read_text()
    lines = src.splitlines()
    tree = ast.parse(src)
    me = module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "imgclf":
                        out.append((a.name, child.lineno, f, lines[child.lineno - 1]))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                if base.split(".")[0] == "imgclf":
                    for a in child.names:
                        cand = f"{base}.{a.name}"
                        tgt = cand if (ROOT.parent / (cand.replace(".", "/") + ".py")).exists() or \
                            (ROOT.parent / cand.replace(".", "/")).is_dir() else base
                        out.append((tgt, child.lineno, f, lines[child.lineno - 1]))
            visit(child, f)

    visit(tree, False)
    return me, out


def function_lengths(path: Path) -> list[tuple[int, str]]:
    """(lines, "file:line name") of every function and method in the file."""
    tree = ast.parse(path.read_text())
    where = path.relative_to(ROOT.parent)
    return [(node.end_lineno - node.lineno + 1, f"{where}:{node.lineno} {node.name}") for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, res, n = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                res.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            strong(v)
    return res


def main() -> None:
    show = "--list" in sys.argv
    graph: dict[str, set[str]] = defaultdict(set)
    func_level, top = [], 0
    files = sorted(ROOT.rglob("*.py"))
    mods = {module_name(p) for p in files}
    seen = set()
    for p in files:
        me, imps = imports(p)
        graph[me]
        for tgt, line, in_func, text in imps:
            # A package import runs its __init__, and `from pkg import mod` the module too.
            while tgt not in mods and "." in tgt:
                tgt = tgt.rpartition(".")[0]
            if tgt != me:
                graph[me].add(tgt)
            where = f"{p.relative_to(ROOT.parent)}:{line}"
            if where in seen:  # one statement importing several names counts once
                continue
            seen.add(where)
            if in_func:
                func_level.append((where, tgt, text.split("#", 1)[1].strip() if "#" in text else ""))
            else:
                top += 1
    cycles = sccs(graph)
    big = [(len(p.read_text().splitlines()), str(p.relative_to(ROOT.parent))) for p in files]
    big = sorted([b for b in big if b[0] > MODULE_LINES], reverse=True)
    longest = sorted((f for p in files for f in function_lengths(p)), reverse=True)[:LONGEST]
    print(f"imgclf imports at module top: {top}")
    print(f"imgclf imports inside functions: {len(func_level)} "
          f"({sum(1 for f in func_level if not f[2])} without a reason comment)")
    print(f"modules in import cycles: {sum(len(c) for c in cycles)} in {len(cycles)} cycle(s)")
    print(f"modules over {MODULE_LINES} lines: {len(big)} {big}")
    print(f"longest functions (lines): {longest}")
    if "--check" in sys.argv:
        unexplained = [f for f in func_level if not f[2]]
        if cycles or unexplained or len(func_level) > MAX_DEFERRED:
            for f in unexplained:
                print(f"  {f[0]}: import of {f[1]} inside a function without a reason comment (# deferred: why)")
            sys.exit(1)
    if show:
        for f in func_level:
            print("  func", *f)
        for c in cycles:
            print("  cycle", " ".join(c))


if __name__ == "__main__":
    main()
