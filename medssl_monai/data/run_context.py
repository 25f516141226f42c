"""The state one run shares with its logging and its data wrappers, held in one explicit object.

A bundle run (``bundle.setup_run``) starts a :class:`RunContext`: its :class:`~.privacy.PathRedactor` (which
real image paths the run's log records, warnings and tracebacks name by their ``pm:`` key), its
:class:`BadImageSettings` (errors file, ``max_bad_images``, run id) and its log file handler. The logging
record factory (:func:`~.privacy.install_path_redaction`) and :class:`~.bad_images.BadImageLog` read the
*current* run; starting another run in the same process replaces it whole (the next run's logs redact its
own keys, not the last run's; its bad-image counts start afresh; the last run's log file stops receiving
records). DataLoader workers are forked and see the run their parent started.

Before any run (a library call, a test), a process-wide "no run" context collects the keys of manifests
read so far; the first run started adopts them, so reading a manifest before ``setup_run`` stays private.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .privacy import PathRedactor, redact_record

__all__ = [
    "DEFAULT_MAX_BAD_IMAGES",
    "BadImageSettings",
    "RunContext",
    "current_run",
    "image_key",
    "install_path_redaction",
    "redact_paths",
    "register_path_keys",
    "start_run",
]

#: default ``max_bad_images``: 1 % of a dataset's images (at least one)
DEFAULT_MAX_BAD_IMAGES = 0.01


def _new_run_id() -> str:
    return f"{os.getpid()}-{time.time_ns()}"


@dataclass
class BadImageSettings:
    """Where a run lists its unreadable images (``None``: in memory only), how many it tolerates, and the run
    id that scopes the counts in a shared errors file (a resumed run starts afresh)."""

    path: str | None = None
    max_bad: float = DEFAULT_MAX_BAD_IMAGES
    run_id: str = field(default_factory=_new_run_id)


@dataclass
class RunContext:
    """One run's redaction keys, bad-image settings, output folder and log file handler."""

    redactor: PathRedactor = field(default_factory=PathRedactor)
    bad_images: BadImageSettings = field(default_factory=BadImageSettings)
    output_dir: Path | None = None
    log_handler: logging.Handler | None = None


_NO_RUN = RunContext()
_current: list[RunContext] = [_NO_RUN]  # the one slot; set only by start_run


def current_run() -> RunContext:
    """The run started last in this process (or the "no run" context before any)."""
    return _current[0]


def start_run(context: RunContext) -> RunContext:
    """Make ``context`` the current run: the previous run's log file handler is detached and closed (unless
    ``context`` reuses it); keys read before any run are adopted, a previous run's are not."""
    previous = _current[0]
    if previous is _NO_RUN:
        context.redactor.update(_NO_RUN.redactor)
        _NO_RUN.redactor.clear()
    elif previous.log_handler is not None and previous.log_handler is not context.log_handler:
        logging.getLogger().removeHandler(previous.log_handler)
        previous.log_handler.close()
    _current[0] = context
    return context


def register_path_keys(mapping: Mapping[str, str]) -> None:
    """Add ``resolved path -> pm: key`` pairs to the current run's redactor."""
    current_run().redactor.register(mapping)


def image_key(path: str | os.PathLike) -> str:
    """How the current run's logs and error files name an image: its ``pm:`` key, else its path."""
    return current_run().redactor.key(path)


def redact_paths(text: str) -> str:
    """``text`` with the current run's image paths replaced by their keys (see :class:`~.privacy.PathRedactor`)."""
    return current_run().redactor.redact(text)


_INSTALLED: list[bool] = [False]


def install_path_redaction() -> None:
    """Rewrite the current run's image paths to their keys in every log record, warning and uncaught traceback.

    A log-record factory (not a handler filter) so that records of every logger reach every handler
    rewritten, handlers added later included; ``logging.captureWarnings`` turns pydicom's and MONAI's
    warnings into such records; the exception hook redacts the traceback of a run that dies. The factory
    asks :func:`current_run` for each record, so it is installed once per process (idempotent).
    """
    if _INSTALLED[0]:
        return
    _INSTALLED[0] = True
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        return redact_record(previous(*args, **kwargs), current_run().redactor)

    logging.setLogRecordFactory(factory)
    logging.captureWarnings(True)
    hook = sys.excepthook

    def excepthook(etype, value, tb) -> None:
        redactor = current_run().redactor
        if not redactor:
            return hook(etype, value, tb)
        sys.stderr.write(redactor.redact("".join(traceback.format_exception(etype, value, tb))))
        sys.stderr.flush()

    sys.excepthook = excepthook
