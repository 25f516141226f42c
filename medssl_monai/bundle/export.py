"""Copy the shipped bundles out of the installed package into a folder of one's own.

The target layout is MONAI Label's ``apps/monaibundle``-style model folder, ``DIR/<bundle>/configs/...``,
which is also what ``python -m monai.bundle run --bundle_root DIR/<bundle>`` expects. Only the bundle
itself is copied (configs, docs, licence, an empty ``models/``): never trained weights or outputs that a
checkout's bundle folder may hold.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .locate import BUNDLE_NAMES, bundle_path

__all__ = ["export_bundles"]

#: left behind: weights, run outputs and run-time files a checkout's bundle folder may hold
_IGNORE = shutil.ignore_patterns("*.pt", "*.ts", "output", "classes.json", "__pycache__", ".gitignore")


def export_bundles(dest: str | os.PathLike, names: Sequence[str] | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``dest/<name>/`` for each bundle (all shipped ones by default); returns the bundle folders.

    An existing ``dest/<name>`` is an error unless ``overwrite`` (then it is replaced whole), so a trained
    bundle is never mixed with fresh configs.
    """
    names = list(names or BUNDLE_NAMES)
    sources = {name: bundle_path(name) for name in names}  # every name checked before anything is written
    dest = Path(dest)
    existing = [dest / n for n in names if (dest / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, existing))}: already there; overwrite=True "
                              f"(medssl bundles export --overwrite) replaces it")
    out = []
    for name, src in sources.items():
        target = dest / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(src, target, ignore=_IGNORE)
        (target / "models").mkdir(exist_ok=True)
        out.append(target)
    return out
