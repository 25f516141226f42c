"""Keep DICOM element values and the real paths of pseudonymised images out of logs.

pydicom reports invalid element values through ``warn_and_log``, which quotes the value (a PatientName
among them) to the ``pydicom`` logger; that logger propagates to the root logger and so to any log file or
console handler an application sets up. The data layer never needs those messages.

In a pseudonymised manifest an image's ``path`` is an opaque ``pm:`` key; :func:`~.manifest.read_manifest`
resolves it to the real file through the private path map and registers the pair with a
:class:`PathRedactor`, the current run's (:mod:`.run_context`). Export folders are named after patients
(``<root>/<PatientID>/...``), so once :func:`~.run_context.install_path_redaction` has run, every log record
(warnings and uncaught tracebacks included) names such an image by its key: pydicom's and MONAI's messages
quote the path they were given, which is the resolved one.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Mapping

__all__ = ["REDACTED_PATH", "PathRedactor", "redact_record", "silence_pydicom_logger"]

#: what a path under pseudonymised data that is not a registered image (a folder, say) becomes
REDACTED_PATH = "<pseudonymised-data-path>"


def silence_pydicom_logger() -> None:
    """Stop pydicom's log records (which may quote identifiers) from reaching application handlers."""
    lg = logging.getLogger("pydicom")
    lg.propagate = False
    lg.setLevel(logging.ERROR)


class PathRedactor:
    """Which resolved image paths stand for which ``pm:`` keys, and the rewrite of text that quotes them."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}  # resolved path -> pm: key
        self.roots: set[str] = set()  # folders holding registered paths: text without one needs no rewrite
        self.max_len = 0

    def __bool__(self) -> bool:
        return bool(self.roots)

    def register(self, mapping: Mapping[str, str]) -> None:
        """Remember ``resolved path -> key`` for the images of a pseudonymised manifest."""
        paths = [str(p) for p in mapping]
        if not paths:
            return
        self.keys.update({str(p): str(k) for p, k in mapping.items()})
        self.max_len = max(self.max_len, *map(len, paths))
        root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
        if root.count(os.sep) < 2:  # paths spread over the file system: their folders instead of "/" or "/home"
            self.roots.update(os.path.dirname(p) for p in paths)
        else:
            self.roots.add(root)

    def update(self, other: PathRedactor) -> None:
        """Take over ``other``'s paths and roots too."""
        self.keys.update(other.keys)
        self.roots |= other.roots
        self.max_len = max(self.max_len, other.max_len)

    def clear(self) -> None:
        self.keys.clear()
        self.roots.clear()
        self.max_len = 0

    def key(self, path: str | os.PathLike) -> str:
        """How logs and error files name an image: its ``pm:`` key when pseudonymised, else its path."""
        return self.keys.get(str(path), str(path))

    def redact(self, text: str) -> str:
        """``text`` with every registered path replaced by its key and any other path under the same data root
        by :data:`REDACTED_PATH` (the longest registered path that matches wins)."""
        if not self.roots or not isinstance(text, str):
            return text
        keys = self.keys
        for root in sorted(self.roots, key=len, reverse=True):
            start = text.find(root)
            while start >= 0:
                end = min(len(text), start + self.max_len)
                while end > start + len(root) and text[start:end] not in keys:
                    end -= 1
                found = text[start:end]
                if found in keys:
                    new = keys[found]
                else:  # a folder or unknown file under the root: drop the path up to the next blank or quote
                    while end < len(text) and text[end] not in " \t\n'\"":
                        end += 1
                    new = REDACTED_PATH
                text = text[:start] + new + text[end:]
                start = text.find(root, start + len(new))
        return text


def redact_record(record: logging.LogRecord, redactor: PathRedactor) -> logging.LogRecord:
    """``record`` with its message, traceback and stack rewritten by ``redactor`` (in place)."""
    if not redactor:
        return record
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: let logging report it as it would
        return record
    clean = redactor.redact(message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.exc_text = redactor.redact(text)  # formatters use exc_text when it is set
    if record.stack_info:
        record.stack_info = redactor.redact(record.stack_info)
    return record
