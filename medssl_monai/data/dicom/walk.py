"""Walk a folder tree in a stable order, reporting what cannot be listed instead of raising."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["iter_files", "printable_path"]

logger = logging.getLogger(__name__)


def printable_path(path: str) -> str:
    """A path as valid UTF-8 text: undecodable bytes of a file name (surrogate-escaped) become ``\\xNN``."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def iter_files(root: str | os.PathLike, exclude: set[str] = frozenset(), *, follow_links: bool = False,
               problems: list[dict[str, Any]] | None = None) -> Iterator[tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of every regular file under ``root``, in a stable order.

    Hidden entries and ``exclude`` are skipped. ``os.scandir`` gives the stat of each entry for one system
    call, which is most of what an incremental re-index of an unchanged tree costs. Whatever is found but
    not listed -- a folder that cannot be listed, a dangling symbolic link, a link to a folder, a link to a
    file outside ``root`` (unless ``follow_links``), a FIFO or device, a file name that is not UTF-8 -- is
    appended to ``problems`` as ``{"path", "code", "reason"}``, so no file disappears without a word.
    """
    problems = [] if problems is None else problems

    def report(path: str, code: str, reason: str) -> None:
        problems.append({"path": printable_path(path), "code": code, "reason": reason})

    def usable_name(path: str) -> bool:
        if printable_path(path) != path:
            report(path, "bad_filename", "file name is not valid UTF-8: rename it (e.g. with convmv) to index it")
            return False
        return True

    root = os.path.abspath(root)
    real_root = os.path.realpath(root)
    if os.path.isfile(root):
        if usable_name(root):
            st = os.stat(root)
            yield root, st.st_size, st.st_mtime_ns
        return
    stack = [root]
    seen_dirs = {real_root}
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as err:
            report(folder, "unlistable", f"cannot list this folder ({err.strerror or err}): its files are not indexed")
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    if not os.path.exists(target):
                        report(e.path, "dangling_link", "symbolic link to a missing file or folder")
                        continue
                    inside = _inside(target, real_root)
                    if os.path.isdir(target):
                        if inside:
                            report(e.path, "link_to_folder", "symbolic link to a folder inside the indexed "
                                                             "folder: its files are indexed there, not twice")
                        elif not follow_links:
                            report(e.path, "link_to_folder", "symbolic link to a folder outside the indexed "
                                                             "folder: not followed (--follow-links follows it)")
                        elif target in seen_dirs or _inside(real_root, target):
                            report(e.path, "link_loop", "symbolic link to a folder that is already indexed: "
                                                        "not followed twice")
                        else:
                            seen_dirs.add(target)
                            subdirs.append(e.path)
                        continue
                    if inside:
                        report(e.path, "link_inside_root", "symbolic link to a file inside the indexed folder: "
                                                           "indexed once, under its own path")
                        continue
                    if not follow_links:
                        report(e.path, "link_outside_root", "symbolic link to a file outside the indexed folder: "
                                                            "not followed (--follow-links follows it)")
                        continue
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.path)
                elif e.is_file():
                    if e.path in exclude or not usable_name(e.path):
                        continue
                    st = e.stat()
                    yield e.path, st.st_size, st.st_mtime_ns
                else:
                    report(e.path, "not_a_file", "not a regular file (FIFO, socket or device): not read")
            except OSError as err:
                report(e.path, "unreadable", f"cannot stat this entry ({err.strerror or err})")
        if follow_links:
            for d in subdirs:
                seen_dirs.add(os.path.realpath(d))
        stack.extend(reversed(subdirs))


