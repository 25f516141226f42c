"""Where the shipped bundles are: package data inside ``medssl_monai``, found through ``importlib.resources``.

The bundles live at the top of the repository (``bundles/``, the layout MONAI users know); the package holds
them as ``medssl_monai/bundles``, a link to ``../bundles`` in a checkout and a real folder in a built wheel.
So one lookup serves a wheel, an editable install and a plain checkout on ``PYTHONPATH`` alike, and a
checkout (a git worktree included) always finds its own bundles, never another checkout's.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["BUNDLE_NAMES", "bundle_path", "bundles_root"]

#: the shipped bundles, in phase order
BUNDLE_NAMES: tuple[str, ...] = ("simclr_natural", "micle_medical", "finetune_classification")


def bundles_root() -> Path:
    """The folder holding the shipped bundles (one sub-folder per bundle)."""
    root = resources.files("medssl_monai").joinpath("bundles")
    if not isinstance(root, Path):  # e.g. imported from a zip: the bundles run from real files only
        raise RuntimeError(f"medssl_monai is imported from an archive ({root}); install it as files to run its "
                           f"bundles")
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: the bundles are missing from this installation (in a checkout, medssl_monai/bundles must "
            f"be the link to ../bundles; a file system without symbolic links breaks it: install the wheel)")
    return root.resolve()


def bundle_path(name: str) -> Path:
    """The folder of one shipped bundle; a clear error for a name that is not one."""
    path = bundles_root() / name
    if name not in BUNDLE_NAMES or not (path / "configs").is_dir():
        raise ValueError(f"unknown bundle {name!r}; the shipped bundles are {', '.join(BUNDLE_NAMES)}")
    return path
