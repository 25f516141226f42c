"""Finding a run's checkpoints: ``{file_prefix}_{iteration}.pt`` in a folder, by iteration.

Separate from the writer (:mod:`.checkpoint`) so that drivers and reports can find a run's checkpoints
without the Ignite machinery; temp files of interrupted writes (``.name.xxx.tmp``) never match.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["latest_checkpoint", "list_checkpoints"]


def _pattern(file_prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(file_prefix)}_(\d+)\.pt$")


def list_checkpoints(save_dir: str | Path, file_prefix: str = "checkpoint") -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the checkpoints ``{file_prefix}_{iteration}.pt`` in ``save_dir``, oldest first."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    pattern = _pattern(file_prefix)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_file() and (m := pattern.match(p.name))]
    return sorted(found)


def latest_checkpoint(save_dir: str | Path, file_prefix: str = "checkpoint") -> Path | None:
    """The checkpoint with the highest iteration in ``save_dir``, or ``None``.

    Temp files of interrupted writes are hidden (``.name.xxx.tmp``) and never match.
    """
    found = list_checkpoints(save_dir, file_prefix)
    return found[-1][1] if found else None
