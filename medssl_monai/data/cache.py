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

**On disk** (``cache_dir``; private: store folders 0700, files 0600 whatever the umask, as the fetch
cache and the path map: these are every patient's pixels): one store per content option set (``source_size``,
channels, reader options, pipeline version) holding ``images-<generation>.npy`` (read memory-mapped) and
``index.json`` keyed by each row's identity (a digest of path, frame, slice and source: paths never reach
the index) with the **content digest** of its file (xxh3-128 of the bytes, :data:`HASH`). Size and mtime
are not trusted: a file replaced under the same size with its mtime restored is decoded again. Rows
already there are read, not decoded; failures are remembered with their reason until the file's content
changes.

**Checked store.** ``index.json`` carries its own checksum and one checksum per chunk of rows of the array
(about ``CHUNK_BYTES``); on open the index, the array's header, dtype and shape are checked, and each chunk
is hashed the first time one of its rows is served or carried into a new generation (the whole HAM10000
store: 0.18 s; a reopen with content keys is 2x one with the stat key, ``docs/benchmarks.md``). A bad index
or array is logged in one line and the store rebuilt; a bad chunk's rows only are decoded again; never a
traceback, never stale pixels. A new generation is streamed through
:func:`~medssl_monai.utils.atomic.atomic_writer` (hashed on the way), then the index is replaced, then
older generations are removed: a kill at any point leaves the previous store whole. A file lock makes
processes that share the folder (the ranks of one machine under ``torchrun``, parallel fine-tunes of a
study) build once: the first builds, the others wait on the lock and then read.

**Why not MONAI's caches.** ``CacheDataset`` keeps a Python list of per-item float tensors: no uint8, no
contiguous array a batch can be gathered from with one index op, nothing on disk. ``PersistentDataset``
writes one pickled file per item keyed by the item (the row dict, not the content of the file it
names), so a changed file keeps its stale entry, and an epoch reads thousands of small files again.
The build itself runs through MONAI's ``DataLoader`` (worker seeding, the project's transforms).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import torch
from monai.transforms import Resize

from ..utils.atomic import atomic_write_bytes, atomic_writer
from ..utils.deprecation import renamed_arg
from .reader import LoadManifestImage
from .run_context import redact_paths

__all__ = ["CACHE_MODES", "CacheBudgetError", "CacheStoreError", "ImageCache", "ImageCacheSpec", "build_image_cache",
           "cache_budget_bytes", "row_report_key", "source_shape"]

logger = logging.getLogger(__name__)

CACHE_MODES = ("none", "host", "device")
PIPELINE_VERSION = 1  # what the pixels are (decode, scaling, resize): part of the store's folder name
INDEX_VERSION = 2  # 2: content keys, a checksum per chunk of rows, the index's own checksum
CHUNK_BYTES = 8 << 20  # one checksum per this many bytes of images (whole rows)
_NPY_NAME = re.compile(r"^images-(\d+)\.npy$")

# declared in pyproject; xxh3 hashes the store 39x and the files 1-1.4x faster than blake2b (docs/benchmarks.md)
try:
    import xxhash

    HASH = "xxh3_128"

    def _hasher() -> Any:
        return xxhash.xxh3_128()
except ImportError:  # a machine without it (an offline device) still gets checked stores, only slower
    HASH = "blake2b_128"

    def _hasher() -> Any:
        return hashlib.blake2b(digest_size=16)


def _digest(data: Any) -> str:
    h = _hasher()
    h.update(data)
    return h.hexdigest()


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


def _positive_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and int(v) > 0


@dataclass(frozen=True)
class ImageCacheSpec:
    """What the decoded-image cache of a bundle holds and where: declared once per bundle config
    (``"image_cache": {"_target_": "medssl_monai.data.ImageCacheSpec", "mode": "@cache", ...}``) and passed
    whole (``@image_cache``) to every consumer (training pairs, fine-tune items, the k-NN monitor), so the six
    settings travel together and are checked once, with a one-line error naming the bad field.

    Attributes:
        mode: ``"none"`` (read the files per item), ``"host"`` (RAM) or ``"device"`` (the training device).
        source_size: the cached sources' ``(H, W)`` or one side; ``None``: twice ``image_size``, square
            (:meth:`source_shape`, the only place that default is written).
        image_size: the side of the network's input (views, evaluation images).
        in_channels: 3 (grey replicated) or 1 (luma), as the loader's ``in_channels``.
        cache_dir: where the store lives (``None``: in RAM only, nothing persisted).
        budget_gib: the most the in-memory array may take (``None``: half the RAM / free GPU memory).
    """

    mode: str = "none"
    source_size: int | tuple[int, int] | None = None
    image_size: int = 64
    in_channels: int = 3
    cache_dir: str | None = None
    budget_gib: float | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"ImageCacheSpec.{name}: {why}, got {getattr(self, name)!r}")

        if self.mode not in CACHE_MODES:
            raise bad("mode", f"must be one of {list(CACHE_MODES)}")
        size = self.source_size
        if size is not None:
            if _positive_int(size):
                size = int(size)
            elif isinstance(size, (list, tuple)) and len(size) == 2 and all(_positive_int(s) for s in size):
                size = (int(size[0]), int(size[1]))
            else:
                raise bad("source_size", "must be null, a positive side or [H, W] of positive ints")
            object.__setattr__(self, "source_size", size)  # frozen: a JSON list becomes a hashable tuple
        if not _positive_int(self.image_size):
            raise bad("image_size", "must be a positive int")
        if self.in_channels not in (1, 3) or isinstance(self.in_channels, bool):
            raise bad("in_channels", "must be 1 or 3")
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)) or not str(self.cache_dir):
                raise bad("cache_dir", "must be null or a folder path")
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        b = self.budget_gib
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not float(b) > 0):
            raise bad("budget_gib", "must be null or a number of GiB > 0")
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "in_channels", int(self.in_channels))

    @property
    def enabled(self) -> bool:
        """Whether images come from the cache (``host``/``device``) rather than from the files."""
        return self.mode != "none"

    def source_shape(self) -> tuple[int, int]:
        """The sources' ``(H, W)``: ``source_size``, or twice ``image_size`` (room for the crops, no aliasing)."""
        return source_shape(self.source_size, self.image_size)

    def build(self, rows: pd.DataFrame | Sequence[Mapping[Hashable, Any]], device: torch.device | str | None = None,
              num_workers: int = 0, progress: bool = True) -> ImageCache:
        """:func:`build_image_cache` of ``rows`` with this spec (``device``: where a ``device`` cache lives;
        ``None`` keeps it in host RAM)."""
        if not self.enabled:
            raise ValueError("ImageCacheSpec.mode: 'none' builds no cache; set host or device")
        return build_image_cache(rows, self.source_size, self.in_channels, mode=self.mode, cache_dir=self.cache_dir,
                                 device=device, budget_gib=self.budget_gib, num_workers=num_workers,
                                 progress=progress, image_size=self.image_size)


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


def _content(path: Any, memo: dict[str, str | None]) -> str | None:
    """The digest (:data:`HASH`) of a file's bytes (``None``: unreadable), what a row's pixels are keyed by: a file
    replaced under the same size and mtime is decoded again. ``memo``: one read per file (frames, slices)."""
    key = str(path)
    if key not in memo:
        try:
            h = _hasher()
            with open(key, "rb") as fh:
                while block := fh.read(1 << 20):  # 1 MiB at a time: a multi-frame DICOM can be large
                    h.update(block)
            memo[key] = h.hexdigest()
        except (OSError, TypeError, ValueError):
            memo[key] = None
    return memo[key]


class DecodeRow:
    """``row -> (uint8 (C, H, W) or None, reason)``: the loader's decode + [0, 1] scaling + area resize.

    Exceptions become a reason string with the file's path replaced by ``<file>`` (reports name rows by
    key, see :func:`row_report_key`). ``channels`` is the former name of ``in_channels``.
    """

    @renamed_arg("channels", "in_channels")
    def __init__(self, source_size: tuple[int, int], in_channels: int | None = 3, frame: int | None = None,
                 sitk_fallback: bool = True, channels: int | None = None) -> None:
        from ..transforms import EnsureFloatImage

        self.load = LoadManifestImage(in_channels=in_channels, frame=frame, sitk_fallback=sitk_fallback)
        self.to_unit = EnsureFloatImage(in_channels=in_channels)
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


class _BadStore(ValueError):
    """A store that cannot be trusted as a whole (index or array unreadable or inconsistent): rebuilt."""


class CacheStoreError(OSError):
    """The store could not be written (disk full, no permission): one line naming the store."""


_SEAL = b', "checksum": "'


def _seal(body: Mapping[str, Any]) -> bytes:
    """``body`` as JSON with a last key ``checksum``: the digest of the exact bytes of ``json.dumps(body)``,
    so that :func:`_seal_ok` checks the raw file without serialising the index again."""
    raw = json.dumps(body).encode()
    return raw[:-1] + _SEAL + _digest(raw).encode() + b'"}'


def _seal_ok(data: bytes) -> bool:
    i = data.rfind(_SEAL)
    return i > 0 and data.endswith(b'"}') and _digest(data[:i] + b"}").encode() == data[i + len(_SEAL):-2]


def _chunk_rows(shape: tuple[int, int, int]) -> int:
    """Rows per checksummed chunk: about ``CHUNK_BYTES`` of images, whole rows."""
    return max(1, CHUNK_BYTES // int(np.prod(shape)))


class _ChunkWriter:
    """Writes an ``(n, *shape)`` uint8 ``.npy`` row by row into an open file and hashes each chunk of
    ``chunk_rows`` rows on the way: no second read, and the store never has to fit in RAM."""

    def __init__(self, fh: BinaryIO, n: int, shape: tuple[int, int, int], chunk_rows: int) -> None:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                  "fortran_order": False, "shape": (n, *shape)})
        self.fh, self.n, self.shape, self.chunk_rows = fh, n, shape, chunk_rows
        self.written = 0
        self.digests: list[str] = []
        self._hash = _hasher()

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1, *self.shape)
        if self.written + len(rows) > self.n:
            raise RuntimeError("image cache: more rows written than the store holds")
        i = 0
        while i < len(rows):
            part = rows[i:i + self.chunk_rows - self.written % self.chunk_rows]
            self._hash.update(part)
            self.fh.write(memoryview(part).cast("B"))
            self.written += len(part)
            i += len(part)
            if self.written % self.chunk_rows == 0:
                self.digests.append(self._hash.hexdigest())
                self._hash = _hasher()

    def close(self) -> list[str]:
        if self.written != self.n:
            raise RuntimeError(f"image cache: {self.written} rows written, the store holds {self.n}")
        if self.written % self.chunk_rows:
            self.digests.append(self._hash.hexdigest())
        return self.digests


class _Store:
    """One option set's folder: ``index.json`` + ``images-<generation>.npy``; callers hold the lock.

    ``index.json`` carries its own checksum and one checksum (:data:`HASH`) per chunk of rows of the array;
    :meth:`open` checks the index and the array's header and shape, :meth:`chunk_ok` a chunk's checksum the
    first time a row of it is read (every row served or carried into a new generation is in a checked chunk).
    """

    def __init__(self, folder: Path, options: dict, shape: tuple[int, int, int]) -> None:
        self.folder, self.options, self.shape = folder, options, shape
        self.index_file = folder / "index.json"
        self._clear()
        self.generation = self.bad_chunks = 0

    def _clear(self) -> None:
        self.entries: dict[str, dict] = {}
        self.images: np.ndarray | None = None
        self.chunk_rows, self.chunks = 1, []
        self._ok: dict[int, bool] = {}

    def next_generation(self) -> int:
        """One above every generation on disk (the index's, or the files' when the index is lost)."""
        found = [int(m.group(1)) for p in self.folder.glob("images-*.npy") if (m := _NPY_NAME.match(p.name))]
        return max([self.generation, *found]) + 1

    def open(self) -> None:
        """Read the index and map the array. A store that fails a check is named in one warning and read as
        empty (every row decoded again, the store rewritten), never a traceback."""
        self.generation = 0
        if not self.index_file.exists():
            return
        try:
            self._load()
        except _BadStore as err:
            logger.warning("image cache: store %s: %s; rebuilding it", self.folder.name, err)
            self._clear()

    def _load(self) -> None:
        try:
            data = self.index_file.read_bytes()
            idx = json.loads(data)
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise _BadStore(f"index.json unreadable ({type(err).__name__})") from None
        if not isinstance(idx, dict):
            raise _BadStore("index.json is not an index")
        if idx.get("version") != INDEX_VERSION:
            raise _BadStore(f"index.json of format {str(idx.get('version'))[:20]!r}, this version reads {INDEX_VERSION}")
        if idx.get("hash") != HASH:
            raise _BadStore(f"index.json hashed with {str(idx.get('hash'))[:20]!r}, this machine with {HASH!r}")
        if not _seal_ok(data):
            raise _BadStore("index.json fails its checksum")
        name, rows, chunk_rows, chunks, entries = (idx.get(k) for k in ("images", "rows", "chunk_rows", "chunks",
                                                                         "entries"))
        if idx.get("options") != self.options or not (isinstance(name, str) and _NPY_NAME.match(name)):
            raise _BadStore("index.json is not this store's")
        if not (_is_int(rows) and rows >= 0 and _is_int(chunk_rows) and chunk_rows >= 1 and isinstance(chunks, list)
                and len(chunks) == -(-rows // chunk_rows) and all(isinstance(c, str) for c in chunks)
                and isinstance(entries, dict) and _is_int(idx.get("generation"))):
            raise _BadStore("index.json is malformed")
        slots = [e.get("slot") if isinstance(e, dict) else None for e in entries.values()]
        if not all(isinstance(e, dict) and isinstance(e.get("content"), str) and isinstance(e.get("reason"), str)
                   and _is_int(s) and -1 <= s < rows for e, s in zip(entries.values(), slots)):
            raise _BadStore("index.json has a malformed entry")
        used = [s for s in slots if s >= 0]
        if len(set(used)) != len(used):
            raise _BadStore("index.json gives two entries one slot")
        try:
            images = np.load(self.folder / name, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise _BadStore(f"{name} is missing") from None
        except (OSError, ValueError, EOFError) as err:  # truncated, zeroed header, not an array
            raise _BadStore(f"{name} is unreadable ({type(err).__name__})") from None
        if images.dtype != np.uint8 or images.shape != (rows, *self.shape):
            raise _BadStore(f"{name} holds {images.shape} {images.dtype}, the index says {rows} rows of {self.shape}")
        self.entries, self.images, self.chunk_rows, self.chunks = entries, images, chunk_rows, chunks
        self.generation = int(idx["generation"])

    def chunk_ok(self, slot: int) -> bool:
        """Whether the chunk holding ``slot`` matches its checksum (hashed once per open)."""
        c = slot // self.chunk_rows
        if c not in self._ok:
            assert self.images is not None
            block = self.images[c * self.chunk_rows:(c + 1) * self.chunk_rows]  # rows: contiguous, hashed in place
            self._ok[c] = _digest(block if block.flags.c_contiguous else np.ascontiguousarray(block)) == self.chunks[c]
            self.bad_chunks += not self._ok[c]
        return self._ok[c]

    def verify_all(self) -> int:
        """Check every chunk now (the benchmark's full verification); returns how many fail."""
        return sum(not self.chunk_ok(c * self.chunk_rows) for c in range(len(self.chunks)))

    def write(self, entries: dict[str, dict], name: str, generation: int, rows: int, chunk_rows: int,
              chunks: list[str]) -> None:
        """Replace the index (after the array it names is complete), then remove older generations and the
        temp files of writes that were killed."""
        body = {"version": INDEX_VERSION, "options": self.options, "generation": generation, "images": name,
                "rows": rows, "chunk_rows": chunk_rows, "chunks": chunks, "hash": HASH, "entries": entries}
        atomic_write_bytes(self.index_file, _seal(body), mode=0o600)
        for old in self.folder.glob("images-*.npy"):
            if old.name != name:
                old.unlink(missing_ok=True)
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _is_int(v: Any) -> bool:
    return type(v) is int


def _decode(rows: list[dict], decode: DecodeRow, num_workers: int, progress: bool,
            on_row: Callable[[int, np.ndarray | None, str], None]) -> None:
    """Decode ``rows`` in order, calling ``on_row(i, image or None, reason)`` for each (in order: the store
    is written as the rows arrive)."""
    from monai.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(_RowsDataset(rows, decode), batch_size=16, num_workers=num_workers, collate_fn=_as_list,
                        shuffle=False)
    with tqdm(total=len(rows), desc="image cache", unit="img", disable=not progress, mininterval=2.0) as bar:
        for batch in loader:
            for i, arr, reason in batch:
                on_row(i, arr, reason)
            bar.update(len(batch))


@renamed_arg("channels", "in_channels")
def build_image_cache(
    rows: pd.DataFrame | Sequence[Mapping[Hashable, Any]],
    source_size: int | Sequence[int] | None = None,
    in_channels: int | None = 3,
    mode: str = "host",
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    budget_gib: float | None = None,
    num_workers: int = 0,
    frame: int | None = None,
    sitk_fallback: bool = True,
    progress: bool = True,
    image_size: int = 64,
    channels: int | None = None,
) -> ImageCache:
    """Decode (or read from ``cache_dir``) every row once; return the images of the rows that decoded.

    Args:
        rows: manifest rows (a DataFrame or row dicts with ``path`` and optional ``frame_index``,
            ``slice_index``, ``source``, ``sop_uid``).
        source_size: ``(H, W)`` or a side; ``None``: twice ``image_size``, square.
        in_channels: 3 (gray replicated) or 1 (luma), as the loader's ``in_channels``.
        mode: ``"host"`` (RAM; pinned when CUDA is available) or ``"device"`` (on ``device``).
        cache_dir: where the store lives (``None``: decode into RAM only, nothing persisted).
        budget_gib: the most the in-memory array may take (``None``: half the RAM / free GPU memory);
            checked before anything is allocated.
        num_workers: decoding processes (MONAI ``DataLoader`` workers).
        channels: former name of ``in_channels`` (accepted with a ``FutureWarning``).
    """
    if mode not in ("host", "device"):
        raise ValueError(f"cache mode must be 'host' or 'device' here, got {mode!r}")
    records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else [dict(r) for r in rows]
    hw = source_shape(source_size, image_size)
    shape = (int(in_channels or 3), *hw)
    _check_budget(len(records), shape, mode, cache_budget_bytes(mode, budget_gib, device))
    decode = DecodeRow(hw, in_channels, frame, sitk_fallback)
    # "channels": the stores' recorded key (renaming it would rebuild every existing store), not an argument
    options = {"version": PIPELINE_VERSION, "source_size": list(hw), "channels": in_channels, "frame": frame,
               "sitk_fallback": bool(sitk_fallback), "pipeline": "LoadManifestImage+EnsureFloatImage+Resize(area)+uint8"}
    slots = np.full(len(records), -1, dtype=np.int64)
    failures: list[dict[str, str]] = []
    if cache_dir is None:
        out = np.zeros((len(records), *shape), dtype=np.uint8)
        reasons = [""] * len(records)

        def on_row(i: int, arr: np.ndarray | None, reason: str) -> None:
            if arr is None:
                reasons[i] = reason or "no image"
            else:
                out[i] = arr

        _decode(records, decode, num_workers, progress, on_row)
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


def _private_dir(path: Path, tighten: bool) -> None:
    """Every patient's pixels: 0700 whatever the umask, as the fetch cache and the path map. ``tighten``: an
    existing folder too (a store folder, ours); a ``cache_dir`` that exists is left as it is (it may be a
    shared folder: the store folders in it are private)."""
    existed = path.is_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if tighten or not existed:
        os.chmod(path, 0o700)


def _private_files(folder: Path) -> None:
    """0600 for what a store holds (files an older version wrote 0644 included)."""
    for p in folder.iterdir():
        if p.is_file() and p.stat().st_mode & 0o077:
            with contextlib.suppress(OSError):
                os.chmod(p, 0o600)


def _through_store(records: list[dict], cache_dir: Path, options: dict, shape: tuple[int, int, int],
                   decode: DecodeRow, num_workers: int, progress: bool
                   ) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]], int]:
    from filelock import FileLock

    tag = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir / f"s{shape[1]}x{shape[2]}_c{shape[0]}_{tag}"
    _private_dir(cache_dir, tighten=False)
    _private_dir(folder, tighten=True)
    ids = [_identity(r) for r in records]
    memo: dict[str, str | None] = {}
    contents = [_content(r.get("path"), memo) for r in records]
    with FileLock(str(folder / ".lock"), mode=0o600):
        _private_files(folder)
        store = _Store(folder, options, shape)
        store.open()

        def usable(k: str, c: str) -> bool:
            e = store.entries.get(k)
            return e is not None and e["content"] == c and (e["slot"] < 0 or store.chunk_ok(e["slot"]))

        todo = [i for i, (k, c) in enumerate(zip(ids, contents)) if c is not None and not usable(k, c)]
        n_decoded = 0
        if todo:
            n_decoded = _rebuild(store, records, ids, contents, todo, decode, num_workers, progress)
        if store.bad_chunks:
            logger.warning("image cache: store %s: %d chunk(s) failed their checksum; their rows are decoded again",
                           folder.name, store.bad_chunks)
        slots = np.full(len(records), -1, dtype=np.int64)
        failures: list[dict[str, str]] = []
        disk_slots = []
        for i, (k, c) in enumerate(zip(ids, contents)):
            e = store.entries.get(k) if c is not None else None
            if c is None:
                failures.append({"key": row_report_key(records[i], i), "reason": "file not found or unreadable"})
            elif e is None or e["content"] != c:
                failures.append({"key": row_report_key(records[i], i),
                                 "reason": "file changed while the cache was built (decoded again next run)"})
            elif e["slot"] < 0:
                failures.append({"key": row_report_key(records[i], i), "reason": e["reason"]})
            else:
                slots[i] = len(disk_slots)
                disk_slots.append(e["slot"])
        array = (np.asarray(store.images[np.asarray(disk_slots, dtype=np.int64)]) if disk_slots and store.images is not None
                 else np.zeros((0, *shape), np.uint8))
    return array, slots, failures, n_decoded


def _rebuild(store: _Store, records: list[dict], ids: list[str], contents: list[str | None], todo: list[int],
             decode: DecodeRow, num_workers: int, progress: bool) -> int:
    """Write a new generation: the checked rows of the old one that are still wanted, then the rows of
    ``todo`` decoded (once per file identity); replaces the index. Returns how many rows were decoded."""
    shape = store.shape
    todo_ids = {ids[i] for i in todo}
    kept = {k: dict(e) for k, e in store.entries.items()
            if k not in todo_ids and (e["slot"] < 0 or store.chunk_ok(e["slot"]))}
    old_slots = sorted(e["slot"] for e in kept.values() if e["slot"] >= 0)
    first: dict[str, int] = {}
    for i in todo:  # the same file named by two rows is decoded once
        first.setdefault(ids[i], i)
    uniq = list(first.values())
    n_total, chunk_rows = len(old_slots) + len(uniq), _chunk_rows(shape)
    generation = store.next_generation()
    name = f"images-{generation}.npy"
    reasons = [""] * len(uniq)
    zeros = np.zeros(shape, np.uint8)
    try:
        with atomic_writer(store.folder / name, mode=0o600) as fh:
            writer = _ChunkWriter(fh, n_total, shape, chunk_rows)
            for j0 in range(0, len(old_slots), 256):  # carry the kept (checked) images over, in chunks
                assert store.images is not None
                writer.write(store.images[old_slots[j0:j0 + 256]])

            def on_row(j: int, arr: np.ndarray | None, reason: str) -> None:
                if writer.written != len(old_slots) + j:
                    raise RuntimeError("image cache: decoded rows arrived out of order")
                writer.write(zeros if arr is None else arr)  # a failed row keeps its zero slot, unused
                reasons[j] = "" if arr is not None else (reason or "no image")

            _decode([records[i] for i in uniq], decode, num_workers, progress, on_row)
            chunks = writer.close()
        remap = {s: j for j, s in enumerate(old_slots)}
        for e in kept.values():
            if e["slot"] >= 0:
                e["slot"] = remap[e["slot"]]
        after: dict[str, str | None] = {}
        for j, i in enumerate(uniq):
            # keyed by the content hashed before decoding, and only if the file still has it afterwards
            same = _content(records[i].get("path"), after) == contents[i]
            kept[ids[i]] = {"content": contents[i] if same else "", "slot": -1 if reasons[j] else len(old_slots) + j,
                            "reason": reasons[j]}
        store.write(kept, name, generation, n_total, chunk_rows, chunks)
    except OSError as err:
        raise CacheStoreError(f"image cache: cannot write store {store.folder.name}: "
                              f"{err.strerror or type(err).__name__}; free space under cache_dir or set cache: none"
                              ) from None
    store.images = np.load(store.folder / name, mmap_mode="r", allow_pickle=False)
    store.entries, store.chunk_rows, store.chunks, store.generation = kept, chunk_rows, chunks, generation
    store._ok = dict.fromkeys(range(len(chunks)), True)  # hashed as they were written
    return len(uniq)
