"""Decoded-image cache: every manifest image decoded once, resized, kept as uint8 in one contiguous array.

Per-item decoding in DataLoader workers cannot feed a GPU (the H100 study sat at 10% utilisation behind 14
workers, ``docs/results.md``). The cache decodes each row once with the project's reader
(:class:`~medssl_monai.data.LoadManifestImage`: DICOM Modality LUT, MONOCHROME1, YBR, frames; JPEG/PNG;
NIfTI slices), scales it to [0, 1] as the per-item path does (``EnsureFloatImage``), resizes it to a fixed
``source_size`` with area interpolation and stores it as uint8 ``(C, H, W)``; a batch is then one gather.

**Aspect ratio.** Every image is resized to ``source_size`` as a whole (no crop, no padding): a square
``source_size`` changes the aspect of non-square images; ``(H, W)`` with the data's own aspect (HAM10000:
``[96, 128]`` for its 150 x 200 images) keeps it. The random resized crop that follows draws boxes in
source pixels with aspect ratios of 3/4 to 4/3, so with the data's aspect it sees what it would see on the
original file, and a squashed 4:3 image is one of the shapes it produces itself anyway. Nothing is cut off,
unlike a centre crop, and no padding border can end up inside a crop.

**On disk** (``cache_dir``): one store per content option set (``source_size``, channels, reader options,
format version) holding ``images-<generation>.npy`` (read memory-mapped) and ``index.json`` keyed by each
row's file identity (a digest of path, frame, slice and source, plus size and ``mtime_ns``). Paths never
reach the index: only their digests do. Rows already there are read, not decoded; a row whose file changed
is decoded again; failures are remembered with their reason until the file changes. A file lock makes
processes that share the folder (the ranks of one machine under ``torchrun``, parallel fine-tunes of a
study) build once: the first builds, the others wait on the lock and then read.

**Why not MONAI's caches.** ``CacheDataset`` keeps a Python list of per-item float tensors: no uint8, no
contiguous array a batch can be gathered from with one index op, nothing on disk. ``PersistentDataset``
writes one pickled file per item keyed by the item's content (the row dict, not the file's size and
mtime), so a changed file keeps its stale entry, and an epoch reads thousands of small files again.
The build itself runs through MONAI's ``DataLoader`` (worker seeding, the project's transforms).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import Resize

from .privacy import redact_paths
from .reader import LoadManifestImage

__all__ = ["CACHE_MODES", "CacheBudgetError", "ImageCache", "build_image_cache", "cache_budget_bytes",
           "row_report_key", "source_shape"]

logger = logging.getLogger(__name__)

CACHE_MODES = ("none", "host", "device")
FORMAT_VERSION = 1


class CacheBudgetError(MemoryError):
    """The cache would need more memory than its budget allows."""


def source_shape(source_size: int | Sequence[int] | None, image_size: int = 64) -> tuple[int, int]:
    """``(H, W)`` from a side, a pair, or ``None`` (twice ``image_size``: room for the crops, no aliasing)."""
    if source_size is None:
        return (2 * int(image_size),) * 2
    if isinstance(source_size, (int, float, np.integer)):
        return (int(source_size),) * 2
    h, w = (int(s) for s in source_size)
    return h, w


def cache_budget_bytes(mode: str, budget_gib: float | None = None, device: torch.device | str | None = None) -> int:
    """The budget: ``budget_gib`` when given, else half the machine's RAM (host) or of the free GPU memory."""
    if budget_gib is not None:
        return int(float(budget_gib) * 2**30)
    if mode == "device" and device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free // 2)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _check_budget(n: int, shape: tuple[int, int, int], mode: str, budget: int) -> None:
    need = n * int(np.prod(shape))
    if need > budget:
        raise CacheBudgetError(
            f"image cache ({mode}) needs {need / 2**30:.2f} GiB ({n} images x {shape[0]}x{shape[1]}x{shape[2]} uint8), "
            f"allowed {budget / 2**30:.2f} GiB: raise cache_budget_gib, lower source_size, or set cache: none")


def row_report_key(row: Mapping[Hashable, Any], position: int) -> str:
    """How a row is named in reports: its ``sop_uid`` (a pseudonym in a pseudonymised manifest, never the
    path), with the frame/slice when it has one, else its position."""
    uid = row.get("sop_uid")
    key = str(uid) if isinstance(uid, str) and uid else f"row {position}"
    for col in ("frame_index", "slice_index"):
        v = row.get(col)
        if v is not None and not pd.isna(v):
            key += f"#{col.split('_')[0]}{int(v)}"
    return key


def _identity(row: Mapping[Hashable, Any]) -> str:
    """A digest of what names the pixels of a row (path, frame, slice, source): no path reaches the index."""
    parts = [str(row.get("path"))]
    for col in ("frame_index", "slice_index", "source"):
        v = row.get(col)
        parts.append("" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v))
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def _stat(path: Any) -> tuple[int, int] | None:
    try:
        st = os.stat(str(path))
    except (OSError, TypeError, ValueError):
        return None
    return int(st.st_size), int(st.st_mtime_ns)


class DecodeRow:
    """``row -> (uint8 (C, H, W) or None, reason)``: the loader's decode + [0, 1] scaling + area resize.

    Exceptions become a reason string with the file's path replaced by ``<file>`` (reports name rows by
    key, see :func:`row_report_key`).
    """

    def __init__(self, source_size: tuple[int, int], channels: int | None = 3, frame: int | None = None,
                 sitk_fallback: bool = True) -> None:
        from ..transforms import EnsureFloatImage

        self.load = LoadManifestImage(channels=channels, frame=frame, sitk_fallback=sitk_fallback)
        self.to_unit = EnsureFloatImage(num_channels=channels)
        self.resize = Resize(spatial_size=source_size, mode="area")  # area: alias-free downscale

    def __call__(self, row: Mapping[Hashable, Any]) -> tuple[np.ndarray | None, str]:
        try:
            img = self.resize(self.to_unit(self.load(row)))
            arr = torch.as_tensor(img).as_subclass(torch.Tensor).float().mul(255.0).round_().clamp_(0, 255)
            return arr.to(torch.uint8).numpy(), ""
        except Exception as err:  # reported and left out, never a crash
            reason = f"{type(err).__name__}: {err}"
            path = str(row.get("path", ""))
            reason = reason.replace(path, "<file>") if path else reason
            return None, redact_paths(reason)  # stored in the cache's index: no other form of a path either


class _RowsDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict], decode: DecodeRow) -> None:
        self.rows, self.decode = rows, decode

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        arr, reason = self.decode(self.rows[i])
        return i, arr, reason


def _as_list(batch: list) -> list:
    return batch


@dataclass
class ImageCache:
    """The decoded images of a set of manifest rows.

    Attributes:
        images: ``(n_ok, C, H, W)`` uint8 tensor (host, pinned when CUDA is present, or on the device).
        slots: per input row, its position in ``images`` (``-1``: the row could not be decoded).
        failures: ``[{"key", "reason"}]`` for the rows left out.
        source_size: ``(H, W)``.
        decoded: how many rows were decoded by this call (0 when the disk cache held them all).
    """

    images: torch.Tensor
    slots: np.ndarray
    failures: list[dict[str, str]] = field(default_factory=list)
    source_size: tuple[int, int] = (0, 0)
    decoded: int = 0

    @property
    def kept(self) -> np.ndarray:
        """Boolean mask of the input rows that are in the cache."""
        return self.slots >= 0

    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def take(self, rows: np.ndarray | Sequence[int], device: torch.device | str | None = None) -> ImageCache:
        """A cache of some input rows only (e.g. one rank's shard), optionally moved to ``device``."""
        rows = np.asarray(rows, dtype=np.int64)
        slots = self.slots[rows]
        ok = slots >= 0
        images = self.images[torch.as_tensor(slots[ok])]
        if device is not None:
            images = images.to(device)
        new = np.full(len(rows), -1, dtype=np.int64)
        new[ok] = np.arange(int(ok.sum()))
        return ImageCache(images, new, [], self.source_size, 0)


class _Store:
    """One option set's folder: ``index.json`` + ``images-<generation>.npy``; callers hold the lock."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.index_file = folder / "index.json"

    def read(self) -> tuple[dict[str, dict], np.ndarray | None, int]:
        if not self.index_file.is_file():
            return {}, None, 0
        idx = json.loads(self.index_file.read_text())
        images = None
        if idx.get("images"):
            images = np.load(self.folder / idx["images"], mmap_mode="r")
        return idx["entries"], images, int(idx.get("generation", 0))

    def write(self, entries: dict[str, dict], images_name: str | None, generation: int, options: dict) -> None:
        tmp = self.index_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"version": FORMAT_VERSION, "options": options, "generation": generation,
                                   "images": images_name, "entries": entries}))
        os.replace(tmp, self.index_file)
        for old in self.folder.glob("images-*.npy"):  # previous generations
            if old.name != images_name:
                old.unlink(missing_ok=True)


def _decode(rows: list[dict], decode: DecodeRow, num_workers: int, progress: bool, out: np.ndarray,
            out_slots: Sequence[int]) -> list[str]:
    """Decode ``rows`` into ``out[out_slots[i]]``; returns one reason per row (``""``: decoded)."""
    from monai.data import DataLoader
    from tqdm.auto import tqdm

    reasons = [""] * len(rows)
    loader = DataLoader(_RowsDataset(rows, decode), batch_size=16, num_workers=num_workers, collate_fn=_as_list,
                        shuffle=False)
    with tqdm(total=len(rows), desc="image cache", unit="img", disable=not progress, mininterval=2.0) as bar:
        for batch in loader:
            for i, arr, reason in batch:
                if arr is None:
                    reasons[i] = reason or "no image"
                else:
                    out[out_slots[i]] = arr
            bar.update(len(batch))
    return reasons


def build_image_cache(
    rows: pd.DataFrame | Sequence[Mapping[Hashable, Any]],
    source_size: int | Sequence[int] | None = None,
    channels: int | None = 3,
    mode: str = "host",
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    budget_gib: float | None = None,
    num_workers: int = 0,
    frame: int | None = None,
    sitk_fallback: bool = True,
    progress: bool = True,
    image_size: int = 64,
) -> ImageCache:
    """Decode (or read from ``cache_dir``) every row once; return the images of the rows that decoded.

    Args:
        rows: manifest rows (a DataFrame or row dicts with ``path`` and optional ``frame_index``,
            ``slice_index``, ``source``, ``sop_uid``).
        source_size: ``(H, W)`` or a side; ``None``: twice ``image_size``, square.
        channels: 3 (gray replicated) or 1 (luma), as the loader's ``channels``.
        mode: ``"host"`` (RAM; pinned when CUDA is available) or ``"device"`` (on ``device``).
        cache_dir: where the store lives (``None``: decode into RAM only, nothing persisted).
        budget_gib: the most the in-memory array may take (``None``: half the RAM / free GPU memory);
            checked before anything is allocated.
        num_workers: decoding processes (MONAI ``DataLoader`` workers).
    """
    if mode not in ("host", "device"):
        raise ValueError(f"cache mode must be 'host' or 'device' here, got {mode!r}")
    records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else [dict(r) for r in rows]
    hw = source_shape(source_size, image_size)
    shape = (int(channels or 3), *hw)
    _check_budget(len(records), shape, mode, cache_budget_bytes(mode, budget_gib, device))
    decode = DecodeRow(hw, channels, frame, sitk_fallback)
    options = {"version": FORMAT_VERSION, "source_size": list(hw), "channels": channels, "frame": frame,
               "sitk_fallback": bool(sitk_fallback), "pipeline": "LoadManifestImage+EnsureFloatImage+Resize(area)+uint8"}
    slots = np.full(len(records), -1, dtype=np.int64)
    failures: list[dict[str, str]] = []
    if cache_dir is None:
        out = np.zeros((len(records), *shape), dtype=np.uint8)
        reasons = _decode(records, decode, num_workers, progress, out, list(range(len(records))))
        ok = np.array([r == "" for r in reasons], dtype=bool)
        slots[ok] = np.arange(int(ok.sum()))
        failures = [{"key": row_report_key(records[i], i), "reason": reasons[i]} for i in np.flatnonzero(~ok)]
        array, n_decoded = out[ok], len(records)
    else:
        array, slots, failures, n_decoded = _through_store(records, Path(cache_dir), options, shape, decode,
                                                           num_workers, progress)
    for f in failures:
        logger.warning("image cache: left out %s: %s", f["key"], f["reason"])
    images = torch.from_numpy(np.ascontiguousarray(array))
    if mode == "device" and device is not None:
        images = images.to(device)
    elif torch.cuda.is_available():
        images = images.pin_memory()  # asynchronous host-to-device copies of gathered batches
    return ImageCache(images, slots, failures, hw, n_decoded)


def _through_store(records: list[dict], cache_dir: Path, options: dict, shape: tuple[int, int, int],
                   decode: DecodeRow, num_workers: int, progress: bool
                   ) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]], int]:
    from filelock import FileLock

    tag = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir / f"s{shape[1]}x{shape[2]}_c{shape[0]}_{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    store = _Store(folder)
    ids = [_identity(r) for r in records]
    stats = [_stat(r.get("path")) for r in records]
    with FileLock(str(folder / ".lock")):
        entries, images, generation = store.read()
        todo = [i for i, (k, st) in enumerate(zip(ids, stats)) if st is not None
                and not (k in entries and (entries[k]["size"], entries[k]["mtime_ns"]) == st)]
        n_decoded = 0
        if todo:
            todo_ids = {ids[i] for i in todo}
            kept = {k: e for k, e in entries.items() if k not in todo_ids}
            old_slots = sorted(e["slot"] for e in kept.values() if e["slot"] >= 0)
            n_total = len(old_slots) + len(todo_ids)
            generation += 1
            name = f"images-{generation}.npy"
            out = np.lib.format.open_memmap(folder / name, mode="w+", dtype=np.uint8, shape=(n_total, *shape))
            remap = {s: j for j, s in enumerate(old_slots)}
            for j0 in range(0, len(old_slots), 256):  # carry the kept images over, in chunks
                chunk = old_slots[j0:j0 + 256]
                out[j0:j0 + len(chunk)] = images[chunk]
            for e in kept.values():
                if e["slot"] >= 0:
                    e["slot"] = remap[e["slot"]]
            first = {}
            for i in todo:  # the same file named by two rows is decoded once
                first.setdefault(ids[i], i)
            uniq = list(first.values())
            new_slots = list(range(len(old_slots), len(old_slots) + len(uniq)))
            reasons = _decode([records[i] for i in uniq], decode, num_workers, progress, out, new_slots)
            n_decoded = len(uniq)
            for i, slot, reason in zip(uniq, new_slots, reasons):
                size, mtime = stats[i]
                kept[ids[i]] = {"size": size, "mtime_ns": mtime, "slot": -1 if reason else slot, "reason": reason}
            out.flush()
            del out, images
            store.write(kept, name, generation, options)
            entries, images, generation = store.read()
    slots = np.full(len(records), -1, dtype=np.int64)
    failures: list[dict[str, str]] = []
    disk_slots = []
    for i, (k, st) in enumerate(zip(ids, stats)):
        e = entries.get(k) if st is not None else None
        if e is None:
            failures.append({"key": row_report_key(records[i], i), "reason": "file not found or unreadable"})
        elif e["slot"] < 0:
            failures.append({"key": row_report_key(records[i], i), "reason": e["reason"]})
        else:
            slots[i] = len(disk_slots)
            disk_slots.append(e["slot"])
    array = images[np.asarray(disk_slots, dtype=np.int64)] if disk_slots else np.zeros((0, *shape), np.uint8)
    return np.asarray(array), slots, failures, n_decoded
