"""Keep DICOM element values and the real paths of pseudonymised images out of logs.

pydicom reports invalid element values through ``warn_and_log``, which quotes the value (a PatientName
among them) to the ``pydicom`` logger; that logger propagates to the root logger and so to any log file or
console handler an application sets up. The data layer never needs those messages.

In a pseudonymised manifest an image's ``path`` is an opaque ``pm:`` key; :func:`read_manifest` resolves it
to the real file through the private path map, and registers the pair here. Export folders are named after
patients (``<root>/<PatientID>/...``), so once :func:`install_path_redaction` has run, every log record
(warnings and uncaught tracebacks included) names such an image by its key: pydicom's and MONAI's messages
quote the path they were given, which is the resolved one.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Mapping

__all__ = [
    "REDACTED_PATH",
    "image_key",
    "install_path_redaction",
    "redact_paths",
    "register_path_keys",
    "silence_pydicom_logger",
]

#: what a path under pseudonymised data that is not a registered image (a folder, say) becomes
REDACTED_PATH = "<pseudonymised-data-path>"

_KEYS: dict[str, str] = {}  # resolved path -> pm: key
_ROOTS: set[str] = set()  # folders holding registered paths: a message without one of them needs no rewrite
_MAX_LEN = 0
_INSTALLED = False


def silence_pydicom_logger() -> None:
    """Stop pydicom's log records (which may quote identifiers) from reaching application handlers."""
    lg = logging.getLogger("pydicom")
    lg.propagate = False
    lg.setLevel(logging.ERROR)


def register_path_keys(mapping: Mapping[str, str]) -> None:
    """Remember ``resolved path -> key`` for the images of a pseudonymised manifest (process-wide, inherited
    by DataLoader workers)."""
    global _MAX_LEN
    paths = [str(p) for p in mapping]
    if not paths:
        return
    _KEYS.update({str(p): str(k) for p, k in mapping.items()})
    _MAX_LEN = max(_MAX_LEN, *map(len, paths))
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    if root.count(os.sep) < 2:  # paths spread over the file system: their folders instead of "/" or "/home"
        _ROOTS.update(os.path.dirname(p) for p in paths)
    else:
        _ROOTS.add(root)


def image_key(path: str | os.PathLike) -> str:
    """How logs and error files name an image: its ``pm:`` key when pseudonymised, else its path."""
    return _KEYS.get(str(path), str(path))


def redact_paths(text: str) -> str:
    """``text`` with every registered path replaced by its key and any other path under the same data root
    by :data:`REDACTED_PATH` (the longest registered path that matches wins)."""
    if not _ROOTS or not isinstance(text, str):
        return text
    for root in sorted(_ROOTS, key=len, reverse=True):
        start = text.find(root)
        while start >= 0:
            end = min(len(text), start + _MAX_LEN)
            while end > start + len(root) and text[start:end] not in _KEYS:
                end -= 1
            found = text[start:end]
            if found in _KEYS:
                new = _KEYS[found]
            else:  # a folder or unknown file under the root: drop the path up to the next blank or quote
                while end < len(text) and text[end] not in " \t\n'\"":
                    end += 1
                new = REDACTED_PATH
            text = text[:start] + new + text[end:]
            start = text.find(root, start + len(new))
    return text


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    if not _ROOTS:
        return record
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: let logging report it as it would
        return record
    clean = redact_paths(message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.exc_text = redact_paths(text)  # formatters use exc_text when it is set
    if record.stack_info:
        record.stack_info = redact_paths(record.stack_info)
    return record


def install_path_redaction() -> None:
    """Rewrite registered image paths to their keys in every log record, warning and uncaught traceback.

    A log-record factory (not a handler filter) so that records of every logger reach every handler
    rewritten, handlers added later included; ``logging.captureWarnings`` turns pydicom's and MONAI's
    warnings into such records; the exception hook redacts the traceback of a run that dies. Idempotent.
    """
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        return _redact_record(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    logging.captureWarnings(True)
    hook = sys.excepthook

    def excepthook(etype, value, tb) -> None:
        if not _ROOTS:
            return hook(etype, value, tb)
        sys.stderr.write(redact_paths("".join(traceback.format_exception(etype, value, tb))))
        sys.stderr.flush()

    sys.excepthook = excepthook
