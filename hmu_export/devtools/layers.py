"""The package's floors, and a checker that keeps imports flowing downward.

Each top-level package of ``hmu_export`` sits on a floor; a module may import from its own
floor or below, never above. The checker reads source with ``ast`` (nothing is imported), so
it also sees imports inside functions. It reports:

- an upward import (lazy ones included; ``if TYPE_CHECKING:`` blocks are held to the same rule),
- an import cycle between modules (``TYPE_CHECKING`` imports aside: they never run),
- an import of another module's private (``_name``) name,
- in floor 0, any import of torch or onnxruntime (reading a build must not pay for them),
- in ``shipped/``, any import of the package outside ``shipped/`` (those files are copied into
  a Triton repository, where there is no hmu_export).

``python -m hmu_export.devtools.layers`` prints the violations (exit 1) or the floors' sizes.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

#: floor of each top-level package (docs/architecture.md draws them)
FLOORS: dict[str, int] = {
    "core": 0, "shipped": 0, "demo": 0,
    "model": 1, "runners": 1,
    "export": 2, "backends": 2, "generate": 2,
    "verify": 3, "bench": 3, "deploy": 3,
    "build": 4,
    "commands": 5, "train": 5, "devtools": 5,
}
#: modules allowed at the package root, and their floor
#: (triton_client: the README's import path before 0.3, a thin re-export of deploy.triton.client)
ROOT_MODULES = {"__init__": 0, "__main__": 6, "triton_client": 6}
HEAVY = ("torch", "onnxruntime")
ISOLATED = "shipped"


@dataclass(frozen=True)
class Violation:
    kind: str  # "upward" | "cycle" | "private" | "heavy" | "isolated" | "unplaced"
    module: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.module}: {self.detail}"


@dataclass(frozen=True)
class _Import:
    target: str  # the module imported (resolved, absolute)
    names: tuple[str, ...]  # names taken from it ("" entries for `import x`)
    lineno: int
    type_only: bool


def _modules(root: Path) -> dict[str, Path]:
    pkg = root.name
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    assert pkg in out, f"{root} is not a package"
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(n) for n in ast.walk(node))
    return ids


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[_Import]:
    tree = ast.parse(path.read_text(), str(path))
    type_only = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(_Import(alias.name, ("",), node.lineno, id(node) in type_only))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            plain = [a.name for a in node.names if f"{mod}.{a.name}" not in modules]
            for alias in node.names:  # `from pkg import module` imports that module
                if f"{mod}.{alias.name}" in modules:
                    out.append(_Import(f"{mod}.{alias.name}", ("",), node.lineno,
                                       id(node) in type_only))
            if plain or not node.names:
                out.append(_Import(mod, tuple(plain), node.lineno, id(node) in type_only))
    return out


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    if len(parts) == 2 and parts[1] in ROOT_MODULES:
        return ROOT_MODULES[parts[1]]
    return FLOORS.get(parts[1])


def _owner(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def check(root: Path) -> list[Violation]:
    """Every violation of the floors' rules in the package at ``root``."""
    modules = _modules(Path(root))
    pkg = Path(root).name
    found: list[Violation] = []
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        mine = floor_of(name)
        if mine is None:
            found.append(Violation("unplaced", name, "a package with no floor in FLOORS"))
            continue
        top = name.split(".")[1] if "." in name else ""
        for imp in _imports(name, path, modules):
            first = imp.target.split(".")[0]
            if mine == 0 and first in HEAVY and top != "shipped":
                found.append(Violation("heavy", name, f"line {imp.lineno} imports {imp.target}"))
            if first != pkg:
                continue
            owner = _owner(imp.target, modules)
            if owner is None:
                continue
            theirs = floor_of(owner)
            if top == ISOLATED and owner.split(".")[1:2] != [ISOLATED]:
                found.append(Violation("isolated", name, f"line {imp.lineno} imports {owner}: "
                                       f"{ISOLATED}/ files must import nothing else of {pkg}"))
            if theirs is not None and theirs > mine:
                found.append(Violation("upward", name, f"line {imp.lineno} imports {owner} "
                                       f"(floor {theirs} > {mine})"))
            for n in imp.names:
                if n.startswith("_") and not n.startswith("__") and owner != name:
                    found.append(Violation("private", name,
                                           f"line {imp.lineno} imports {owner}.{n}"))
            if not imp.type_only and owner != name:
                edges[name].add(owner)
    found += [Violation("cycle", c[0], " -> ".join(c + [c[0]])) for c in _cycles(edges)]
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in edges:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def floor_sizes(root: Path) -> dict[str, int]:
    """Lines of code per top-level package (the closing note's table)."""
    sizes: dict[str, int] = {}
    for name, path in _modules(Path(root)).items():
        parts = name.split(".")
        key = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOORS) else "(root)"
        sizes[key] = sizes.get(key, 0) + len(path.read_text().splitlines())
    return sizes


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    bad = check(root)
    for v in bad:
        print(v)
    if bad:
        return 1
    sizes = floor_sizes(root)
    for pkg, lines in sorted(sizes.items(), key=lambda kv: (FLOORS.get(kv[0], -1), kv[0])):
        print(f"floor {FLOORS.get(pkg, '-')}  {pkg:<10} {lines:>6} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
