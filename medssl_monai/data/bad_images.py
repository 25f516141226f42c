"""Skip images that cannot be read, record them, and stop only when there are too many.

A real export has the odd truncated or vanished file; one of them must not kill a run that has read
thousands of good ones, and it must not pass unnoticed either. :class:`~.reader.LoadManifestImaged` raises
:class:`UnreadableImageError` naming the image by its manifest key (``pm:...`` when pseudonymised, never the
resolved path). Two wrappers turn that error into a skip:

* :class:`SkipUnreadableDataset` (training): the item is replaced by the next readable one, so batches keep
  their size (a MICLe pair with one bad image is dropped as a whole, another group's pair takes its place);
* :class:`SkipUnreadable` (evaluation, inference, the k-NN monitor): the item becomes ``None`` and
  :func:`collate_readable` drops it, so no image is counted twice.

Each bad image is logged once per run and appended to the run's errors file (``key,phase,reason,run``,
``<output_dir>/bad_images.csv``: the current run's :class:`~.run_context.BadImageSettings`, set by the
bundles' ``setup_run`` or :func:`configure_bad_images`); past ``max_bad_images`` the run
stops with :class:`TooManyBadImagesError`. The file is shared by DataLoader workers (separate processes):
appends and counts happen under an exclusive ``flock``.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.transforms import Transform
from torch.utils.data import Dataset, default_collate

from .run_context import DEFAULT_MAX_BAD_IMAGES, BadImageSettings, current_run, redact_paths

__all__ = [
    "BAD_IMAGE_COLUMNS",
    "DEFAULT_MAX_BAD_IMAGES",
    "BadImageLog",
    "SkipUnreadable",
    "SkipUnreadableDataset",
    "TooManyBadImagesError",
    "UnreadableImageError",
    "collate_readable",
    "configure_bad_images",
    "find_unreadable",
    "max_bad_count",
]

logger = logging.getLogger(__name__)

BAD_IMAGE_COLUMNS = ["key", "phase", "reason", "run"]


class UnreadableImageError(RuntimeError):
    """An image could not be loaded; ``key`` names it as the manifest does (safe to log)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class TooManyBadImagesError(RuntimeError):
    """More unreadable images than ``max_bad_images`` allows."""


def configure_bad_images(path: str | os.PathLike | None, max_bad: float | None = None) -> None:
    """Set the current run's errors file and threshold (``setup_run`` starts a run with its own); a new run id
    makes the count start afresh, so a run resumed after the files were fixed is not held back by old rows."""
    current_run().bad_images = BadImageSettings(None if path is None else str(path),
                                                DEFAULT_MAX_BAD_IMAGES if max_bad is None else max_bad)


def max_bad_count(max_bad: float, total: int) -> int:
    """``max_bad_images`` as a count: ``>= 1`` is a count, ``0 < x < 1`` a fraction of ``total`` (at least one
    image), ``0`` stops at the first unreadable image."""
    max_bad = float(max_bad)
    if max_bad < 0 or math.isnan(max_bad):
        raise ValueError(f"max_bad_images must be >= 0, got {max_bad}")
    if max_bad >= 1:
        return int(max_bad)
    if max_bad == 0:
        return 0
    return max(1, int(max_bad * total))


def find_unreadable(err: BaseException | None) -> UnreadableImageError | None:
    """The :class:`UnreadableImageError` behind ``err`` (MONAI wraps transform errors in ``RuntimeError``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UnreadableImageError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class BadImageLog:
    """Records the unreadable images of one dataset (``phase``: its role, e.g. ``train``, ``eval``, ``knn``).

    Args:
        phase: written to the errors file's ``phase`` column.
        total: the dataset's size (a fractional ``max_bad`` is relative to it).
        path: the errors CSV; default: the run's, ``None`` there keeps it in memory.
        max_bad: see :func:`max_bad_count`; default: the run's ``max_bad_images``.
        settings: the run's settings; default: those of the current run
            (:func:`~.run_context.current_run`) when the log is made.
    """

    def __init__(self, phase: str, total: int, path: str | os.PathLike | None = None,
                 max_bad: float | None = None, settings: BadImageSettings | None = None) -> None:
        run = settings if settings is not None else current_run().bad_images
        self.phase = str(phase)
        self.total = int(total)
        self.path = str(path) if path is not None else run.path
        self.max_bad = run.max_bad if max_bad is None else max_bad
        self.limit = max_bad_count(self.max_bad, self.total)
        self.run = run.run_id
        self._seen: dict[str, str] = {}  # without a file

    def record(self, key: str, reason: str) -> int:
        """Note ``key`` as unreadable (logged once); raise :class:`TooManyBadImagesError` past the limit.

        Returns how many images of this phase and run are bad so far.
        """
        reason = " ".join(redact_paths(reason).split())
        new, count = self._append(key, reason)
        if new:
            logger.warning("skipped unreadable image %s (%s): %s [%d of at most %d]", key, self.phase, reason,
                           count, self.limit)
        if count > self.limit:
            where = f"; they are listed in {self.path}" if self.path else ""
            raise TooManyBadImagesError(
                f"{count} unreadable images in '{self.phase}' ({count / max(self.total, 1):.1%} of {self.total}), "
                f"more than max_bad_images={self.max_bad} allows ({self.limit}){where}. The last: {key}: {reason}. "
                "Fix or remove those files (or raise max_bad_images) and run again: training resumes from its "
                "last checkpoint.")
        return count

    def _append(self, key: str, reason: str) -> tuple[bool, int]:
        if self.path is None:
            new = key not in self._seen
            self._seen.setdefault(key, reason)
            return new, len(self._seen)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+", newline="") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # workers and ranks write the same file
            try:
                fh.seek(0)
                rows = [r for r in csv.DictReader(fh) if r.get("phase") == self.phase and r.get("run") == self.run]
                keys = {r["key"] for r in rows}
                if key in keys:
                    return False, len(keys)
                buf = io.StringIO()
                writer = csv.writer(buf)
                if fh.tell() == 0:
                    writer.writerow(BAD_IMAGE_COLUMNS)
                writer.writerow([key, self.phase, reason, self.run])
                fh.write(buf.getvalue())
                fh.flush()
                return True, len(keys) + 1
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def handle(self, err: BaseException) -> None:
        """Record ``err`` if an unreadable image is behind it, else re-raise it (a bug is not a bad image)."""
        bad = find_unreadable(err)
        if bad is None:
            raise err
        self.record(bad.key, bad.reason)


class SkipUnreadable(Transform):
    """Apply ``transform``; an unreadable image makes the item ``None`` (dropped by :func:`collate_readable`).

    For passes where every image counts once: evaluation, inference, the k-NN monitor (whose
    ``CacheDataset`` then caches the ``None``, so the file is read, and reported, once).
    """

    def __init__(self, transform: Callable, log: BadImageLog) -> None:
        self.transform = transform
        self.log = log

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        try:
            return self.transform(data)
        except Exception as err:
            self.log.handle(err)
            return None


class SkipUnreadableDataset(Dataset):
    """``dataset`` whose unreadable items are replaced by the next readable one (training).

    Batches keep their size (MONAI/Ignite engines and DDP expect full batches); ``set_random_state`` and
    other attributes pass through to ``dataset``.
    """

    def __init__(self, dataset: Any, log: BadImageLog) -> None:
        self.dataset = dataset
        self.log = log

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        n = len(self.dataset)
        for step in range(n):
            try:
                return self.dataset[(int(index) + step) % n]
            except Exception as err:
                self.log.handle(err)
        raise TooManyBadImagesError(f"no readable item in '{self.log.phase}' ({n} items)")

    def set_random_state(self, seed: int | None = None, state: Any = None) -> SkipUnreadableDataset:
        self.dataset.set_random_state(seed=seed, state=state)
        return self

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "log") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate_readable(batch: Sequence[Any]) -> Any:
    """``default_collate`` of the items that are not ``None``; ``None`` when no item of the batch is."""
    items = [b for b in batch if b is not None]
    return default_collate(items) if items else None
