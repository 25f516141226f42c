"""Dependencies: every third-party package the library imports is declared in pyproject.toml, and the PACS
extra (``medssl-monai[pacs]``) is optional: without it everything imports, and a PACS command fails with
one line naming the extra (checked by blocking its packages in a subprocess, as if not installed)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "medssl_monai"
PACS_PACKAGES = ("dicomweb_client", "pynetdicom", "highdicom", "requests", "urllib3")
EXTRA_MSG = "needs the PACS extra: pip install 'medssl-monai[pacs]'"


def _requires_at_module_level(tree: ast.Module) -> bool:
    """The module itself calls ``require(...)`` at import (a PACS-only module such as ``pacs/http.py``)."""
    return any(isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", "") ==
               "require" for n in tree.body)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level package, imported at module level without a module-level ``require`` first) for each
    absolute import in ``path``."""
    tree = ast.parse(path.read_text())
    guarded = _requires_at_module_level(tree)
    top_level = {id(n) for n in ast.walk(ast.Module(body=[n for n in tree.body if not isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))], type_ignores=[]))}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):  # a class body runs at import too
        top_level |= {id(n) for stmt in cls.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(n.split(".")[0], id(node) in top_level and not guarded) for n in names]
    return out


def _requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~\[;]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_every_imported_package_is_declared_and_pacs_ones_only_lazily() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {k: {_requirement_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    dists = md.packages_distributions()
    undeclared, eager = {}, []
    for path in sorted(PKG.rglob("*.py")):
        for top, at_module_level in _imports(path):
            if top in sys.stdlib_module_names or top == "medssl_monai":
                continue
            names = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
            if not names & (core | set().union(*extras.values())):
                undeclared.setdefault(top, []).append(str(path.relative_to(REPO)))
            if names & extras["pacs"] and not names & core and at_module_level:
                eager.append(f"{path.relative_to(REPO)}: {top}")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert not eager, f"PACS-extra packages imported at module level (import them after pacs._deps.require): {eager}"
    assert {"dicomweb-client", "pynetdicom", "highdicom", "requests", "urllib3"} == extras["pacs"]
    assert not extras["pacs"] & core  # the extra is optional: nothing of it is a core dependency


_BLOCKED_RUN = f"""
import contextlib, io, json, pkgutil, sys, importlib
for name in {PACS_PACKAGES!r}:
    sys.modules[name] = None  # `import name` now raises ImportError, as when it is not installed
import medssl_monai
failed = []
for mod in pkgutil.walk_packages(medssl_monai.__path__, "medssl_monai."):
    if mod.name == "medssl_monai.bundle.monai_label_app":
        continue  # runs inside MONAI Label's venv (the monailabel extra), not the project's
    try:
        importlib.import_module(mod.name)
    except Exception as err:  # a PACS-only module (pacs/http.py) may refuse, with the one-line message
        if not (type(err).__name__ == "MissingExtraError" and {EXTRA_MSG!r} in str(err)):
            failed.append(f"{{mod.name}}: {{type(err).__name__}}: {{err}}")
from medssl_monai.cli import main
out = {{"import_failed": failed}}
for key, argv in (("dimse", ["index", "--dimse", "127.0.0.1:9", "--out", "m1.csv"]),
                  ("dicomweb", ["index", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--out", "m2.csv"])):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    out[key] = [rc, err.getvalue()]
from medssl_monai.reporting.dicom_sr import _build_sr
try:
    _build_sr(None, {{}}, "", None, "", "", 1)
except ImportError as err:
    out["sr"] = str(err)
print(json.dumps(out))
"""


def test_without_the_pacs_extra_everything_imports_and_pacs_commands_say_what_to_install(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-c", _BLOCKED_RUN], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["import_failed"] == []
    for key, feature, missing in (("dimse", "DIMSE (C-FIND/C-GET)", "pynetdicom"),
                                  ("dicomweb", "DICOMweb (QIDO-RS/WADO-RS/STOW-RS)", "requests")):
        rc, stderr = out[key]
        assert rc == 1
        assert stderr == f"medssl index: error: {feature} {EXTRA_MSG} ({missing} is not installed)\n"
    assert out["sr"] == f"DICOM SR export {EXTRA_MSG} (highdicom is not installed)"
    # checked before anything is written: no local copy folder, no audit line, no manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == []
