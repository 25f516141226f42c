"""The package's import graph: nothing imports a higher layer, and no top-level parts import each other in
a circle (the orchestration once did: ``pipeline`` ran ``cli.main``, ``cli`` imported ``pipeline``)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medssl_monai"
NAME = PACKAGE.name

#: top-level subpackage/module -> layer; a module may import its own layer and lower ones only
LAYERS = {
    **dict.fromkeys(("utils", "data", "transforms", "networks", "losses", "optim", "metrics", "similarity",
                    "selection"), 0),
    **dict.fromkeys(("engines", "handlers", "pacs"), 1),
    **dict.fromkeys(("bundle", "ingest"), 2),
    "experiments": 3,
    "reporting": 4,
    **dict.fromkeys(("cli", "demo", "sample_data", "__init__"), 5),
}


def _module(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (absolute or relative, at any depth in the file: a
    function-level import is a dependency as much as one at the top)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        mod = _module(path, package)
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")
                    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets.add(prefix)
                targets |= {f"{prefix}.{a.name}" for a in node.names}  # `from . import x`: x may be a module
        graph[mod] = {t for t in targets if t == NAME or t.startswith(NAME + ".")}
    modules = set(graph)

    def owner(target: str) -> str:  # `medssl_monai.cli.main` (a name) -> `medssl_monai.cli` (its module)
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        return target

    return {mod: {owner(t) for t in targets} - {mod} for mod, targets in graph.items()}


def part(module: str) -> str:
    """``medssl_monai.experiments.pipeline`` -> ``experiments``; the package itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def part_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        out.setdefault(part(mod), set()).update(part(t) for t in targets if part(t) != part(mod))
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {t} ({part(m)}: layer {LAYERS[part(m)]} < {part(t)}: layer {LAYERS[part(t)]})"
                  for m, ts in graph.items() for t in ts
                  if part(t) in LAYERS and part(m) in LAYERS and LAYERS[part(t)] > LAYERS[part(m)])


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_top_level_part_has_a_layer() -> None:
    parts = {part(m) for m in import_graph()}
    assert parts - set(LAYERS) == set(), "give the new part a layer in LAYERS"


def test_nothing_imports_a_higher_layer() -> None:
    assert upward_imports(import_graph()) == []


def test_no_import_circle_between_top_level_parts() -> None:
    assert circles(part_graph(import_graph())) == []


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """The graph reader on a small package with the old cli <-> pipeline circle, written the ways the package
    imports: relative at the top, relative inside a function, absolute."""
    pkg = tmp_path / NAME
    (pkg / "experiments").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("def main():\n    from .experiments.pipeline import run\n")
    (pkg / "experiments" / "__init__.py").write_text("from . import pipeline\n")
    (pkg / "experiments" / "pipeline.py").write_text(
        "from ..data import x\n\ndef run():\n    from medssl_monai.cli import main\n")
    (pkg / "data.py").write_text("")
    graph = import_graph(pkg)
    assert f"{NAME}.cli" in graph[f"{NAME}.experiments.pipeline"]
    assert f"{NAME}.experiments.pipeline" in graph[f"{NAME}.experiments"]
    assert upward_imports(graph) == [f"{NAME}.experiments.pipeline imports {NAME}.cli (experiments: layer 3 < cli: "
                                     "layer 5)"]
    assert circles(part_graph(graph)) == [["cli", "experiments"]]
