"""The library layers import only downward: foundations -> engines/handlers -> bundle (-> the drivers above)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medssl_monai"
RANK = {"data": 0, "transforms": 0, "networks": 0, "losses": 0, "optim": 0, "metrics": 0,
        "engines": 1, "handlers": 1, "bundle": 2}
DRIVERS = 3  # every other top-level module (pipeline, study, transfusion, report, cli, ...)


def _layer(parts: list[str]) -> str:
    return parts[0] if parts else ""


def _imported_layers(path: Path) -> set[str]:
    """Top-level ``medssl_monai`` subpackages/modules that ``path`` imports (absolute or relative)."""
    own = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if own[-1] == "__init__":
        own = own[:-1]
    package = own if path.name == "__init__.py" else own[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = base + (node.module.split(".") if node.module else [])
                names = [mod] if node.module else [[*mod, a.name] for a in node.names]
            else:
                names = [(node.module or "").split(".")]
        else:
            continue
        for parts in names:
            if parts and parts[0] == "medssl_monai":
                parts = parts[1:]
            elif not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            if parts:
                found.add(_layer(parts))
    return found


def test_resolver_sees_relative_and_absolute_imports() -> None:
    """The checker itself: a module of each kind of import is attributed to the right layer."""
    handlers = PACKAGE / "handlers" / "knn_monitor.py"
    assert {"metrics", "handlers"} <= _imported_layers(handlers)
    assert "networks" in _imported_layers(PACKAGE / "bundle" / "network.py")


def test_no_library_module_imports_upward() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if layer not in RANK:
            continue
        for target in _imported_layers(path):
            if RANK.get(target, DRIVERS) > RANK[layer]:
                upward.append(f"{path.relative_to(PACKAGE)} -> {target}")
    assert not upward, upward
