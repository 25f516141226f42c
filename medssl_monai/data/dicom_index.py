"""Index a folder tree of DICOM (and NIfTI) files into a manifest, reading headers only.

PACS exports come with opaque file names, several studies per folder, one patient spread over folders and
plenty of files that are not images at all; the index therefore groups by DICOM tags only, never by folder
names, and turns every file it cannot use into one line of ``manifest.errors.csv`` instead of an exception.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID

from .cohort import CohortFilter
from .manifest import (
    DEFAULT_MAX_PIXELS,
    ERROR_COLUMNS,
    MANIFEST_COLUMNS,
    PATHMAP_PREFIX,
    check_output_file,
    errors_path,
    meta_path,
    normalize_dtypes,
    pathmap_path,
    read_manifest,
    read_meta,
    read_path_map,
    read_table_csv,
    write_manifest,
)
from .privacy import silence_pydicom_logger
from .pseudonymize import Pseudonymizer

__all__ = ["IndexResult", "SkipFile", "check_index_outputs", "index_tree", "printable_path", "read_dicom_header",
           "read_labels", "summarize"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: encapsulated/geometry/identifier checks, link and size options
NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UN", b"UC", b"UR", b"UT", b"SV", b"UV"}
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
_CHUNK = 64


class SkipFile(Exception):
    """A file the index cannot use: ``code`` is a stable category, ``reason`` one human line."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _sop_class_name(uid: str) -> str | None:
    name = UID(uid).name
    return None if name == uid else name


@dataclass(frozen=True)
class _Geometry:
    """What the header says the pixel data holds: checked against the data without decoding it."""

    rows: int
    columns: int
    samples: int
    bits: int | None
    frames: int
    photometric: str

    def native_bytes(self) -> int | None:
        """Bytes the native (uncompressed) pixel data needs, or ``None`` when BitsAllocated is unusable."""
        if not self.bits or (self.bits != 1 and self.bits % 8):
            return None
        values = self.rows * self.columns * self.frames * self.samples
        if self.photometric == "YBR_FULL_422" and self.samples == 3:
            values = values // 3 * 2  # two chroma values shared by each pair of pixels
        return (values + 7) // 8 if self.bits == 1 else values * (self.bits // 8)

    def describe(self) -> str:
        return (f"Rows x Columns x SamplesPerPixel x BitsAllocated x NumberOfFrames = {self.rows} x {self.columns}"
                f" x {self.samples} x {self.bits} x {self.frames}")


def _count_fragments(fp: Any, start: int, size: int) -> int:
    """Walk the items of encapsulated pixel data to the sequence delimiter (seeks only) -> fragment count.

    The first item is the Basic Offset Table; every later item is one fragment of compressed data. A file
    cut anywhere in there ends inside an item or before the delimiter, which a decoder would only find
    mid-epoch; item headers are always little endian (every encapsulated transfer syntax is).
    """
    offset, items = start, 0
    while True:
        fp.seek(offset)
        head = fp.read(8)
        if len(head) < 8:
            raise SkipFile("truncated", f"truncated DICOM: encapsulated pixel data ends after {max(items - 1, 0)} "
                           "fragment(s), before its sequence delimiter")
        group, elem, length = struct.unpack("<HHI", head)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return max(items - 1, 0)
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            raise SkipFile("corrupt", f"encapsulated pixel data: item {items} has tag ({group:04X},{elem:04X}) "
                           "instead of an item (FFFE,E000) of defined length")
        if offset + 8 + length > size:
            what = "basic offset table" if items == 0 else f"fragment {items}"
            raise SkipFile("truncated", f"truncated DICOM: encapsulated pixel data {what} declares {length} bytes "
                           f"but only {size - offset - 8} remain")
        offset += 8 + length
        items += 1


def _pixel_data_check(fp: Any, pos: int, size: int, implicit: bool, little: bool,
                      geometry: _Geometry | None = None) -> None:
    """Raise ``SkipFile`` if the file has no pixel data, or pixel data that is cut short or disagrees with the header.

    ``dcmread(stop_before_pixels=True)`` leaves the file positioned at the pixel data element when there is
    one, so the element's own header tells the declared length without decoding anything; encapsulated
    data is walked item by item (:func:`_count_fragments`).
    """
    if pos >= size:
        # pydicom consumes a pixel data header cut short without a word: look for its tag in the last bytes
        fp.seek(max(size - 11, 0))
        tail = fp.read(11)
        if any(struct.pack("<HH" if little else ">HH", *tag) in tail for tag in _PIXEL_TAGS):
            raise SkipFile("truncated", "truncated DICOM: the file ends inside the pixel data header")
        raise SkipFile("no_pixel_data", "DICOM without pixel data (7FE0,0010)")
    fp.seek(pos)
    head = fp.read(12)
    if len(head) < 8:
        raise SkipFile("truncated", f"truncated DICOM: file ends {size - pos} bytes into the pixel data header")
    e = "<" if little else ">"
    group, elem = struct.unpack(e + "HH", head[:4])
    if (group, elem) not in _PIXEL_TAGS:
        raise SkipFile("no_pixel_data", "DICOM without pixel data (7FE0,0010)")
    if implicit:
        (length,), header_len = struct.unpack(e + "I", head[4:8]), 8
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            raise SkipFile("truncated", "truncated DICOM: file ends inside the pixel data header")
        (length,), header_len = struct.unpack(e + "I", head[8:12]), 12
    else:
        (length,), header_len = struct.unpack(e + "H", head[6:8]), 8
    remaining = size - pos - header_len
    if length == 0xFFFFFFFF:  # encapsulated (compressed): offset table, fragments, sequence delimiter
        fragments = _count_fragments(fp, pos + header_len, size)
        if fragments == 0:
            raise SkipFile("no_pixel_data", "DICOM with encapsulated pixel data without any fragment")
        if geometry is not None and geometry.frames > fragments:
            raise SkipFile("frames_exceed_fragments", f"NumberOfFrames is {geometry.frames} but the encapsulated "
                           f"pixel data has only {fragments} fragment(s) (each frame needs at least one)")
    elif remaining < length:
        raise SkipFile(
            "truncated", f"truncated DICOM: pixel data declares {length} bytes but only {remaining} remain")
    elif length == 0:
        raise SkipFile("no_pixel_data", "DICOM with empty pixel data (7FE0,0010)")
    elif geometry is not None:
        need = geometry.native_bytes()
        if need is not None and length < need:
            raise SkipFile("pixel_length_mismatch",
                           f"pixel data holds {length} bytes but {geometry.describe()} need {need}")


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "Modality", "PatientID", "BodyPartExamined",
    "ViewPosition", "StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber", "PhotometricInterpretation",
    "NumberOfFrames", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "StudyDate", "SeriesDescription",
)
_TAGS = {kw: Tag(kw) for kw in _KEYWORDS}
#: Only these elements are parsed; the rest of the header is skipped over, which is what makes the index
#: as fast as a bare ``dcmread(stop_before_pixels=True)`` that parses everything and converts nothing.
_SPECIFIC_TAGS = list(_TAGS.values())
_ASCII_CHARSETS = {"", "ISO_IR 6", "ISO_IR 100", "ISO 2022 IR 6"}
_UID_KEYWORDS = (("study_uid", "StudyInstanceUID"), ("series_uid", "SeriesInstanceUID"), ("sop_uid", "SOPInstanceUID"))
#: VRs an identifier may be stored with (UN: a private/unknown VR some writers use for any element).
_PATIENT_ID_VRS = {"LO", "SH", "UN"}
_UID_VRS = {"UI", "UN"}
_UID_RE = re.compile(r"[0-9.]{1,64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_SOP_NAMES: dict[str, str | None] = {}


def _text(ds: pydicom.Dataset, kw: str) -> str:
    """An element's value as text, decoded from its raw bytes (pydicom's converters are 3x slower here)."""
    elem = ds.get_item(_TAGS[kw])
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    return "" if value is None else str(value).strip()


def _ushort(ds: pydicom.Dataset, kw: str, little: bool) -> int | None:
    elem = ds.get_item(_TAGS[kw])
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        return struct.unpack("<H" if little else ">H", value[:2])[0] if len(value) >= 2 else None
    return _int_or_none(value)


def _check_vr(ds: pydicom.Dataset, kw: str, allowed: set[str], code: str) -> None:
    """Refuse an identifier written with a wrong VR (PatientID as OB/US/SQ, a UID as OB): its bytes are no text."""
    elem = ds.get_item(_TAGS[kw])
    vr = getattr(elem, "VR", None) if elem is not None else None
    if vr is not None and str(vr) not in allowed:
        raise SkipFile(code, f"{kw} is stored with VR {vr}, not {'/'.join(sorted(allowed - {'UN'}))}: "
                             "not a usable identifier")


def _number_of_frames(ds: pydicom.Dataset) -> int:
    text = _text(ds, "NumberOfFrames")
    if not text:
        return 1
    try:
        frames = int(text)
    except ValueError:
        raise SkipFile("bad_number_of_frames", f"NumberOfFrames {text[:20]!r} is not a whole number") from None
    if frames < 1:
        raise SkipFile("bad_number_of_frames", f"NumberOfFrames is {frames}: must be at least 1")
    return frames


def _check_size(rows: int, columns: int, max_pixels: int | None) -> None:
    if max_pixels and max_pixels > 0 and rows * columns > max_pixels:
        raise SkipFile("too_large", f"image of {rows} x {columns} = {rows * columns / 1e6:.1f} megapixels per "
                                    f"frame exceeds the limit of {max_pixels / 1e6:g} (--max-pixels)")


def _sop_name(uid: str) -> str | None:
    if uid not in _SOP_NAMES:
        _SOP_NAMES[uid] = _sop_class_name(uid) if uid else None
    return _SOP_NAMES[uid]


def read_dicom_header(path: str, size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
                      ) -> dict[str, Any]:
    """Read one file's header (no pixel decoding) and return its manifest fields, or raise ``SkipFile``.

    ``max_pixels``: Rows x Columns above which the image is skipped as ``too_large`` (``None`` or 0: no limit).
    """
    size = os.path.getsize(path) if size is None else size
    if size == 0:
        raise SkipFile("empty", "empty file (0 bytes)")
    with open(path, "rb") as fp, warnings.catch_warnings(record=True) as caught:
        # pydicom warnings quote element values (a patient name among them): recorded here, never logged.
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_SPECIFIC_TAGS)
        except InvalidDicomError:
            # No preamble/'DICM': old exports write bare datasets; accept them only if they look like DICOM.
            fp.seek(0)
            try:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True, specific_tags=_SPECIFIC_TAGS)
                if not any(_text(ds, k) for k in ("SOPClassUID", "StudyInstanceUID", "PatientID", "Modality")):
                    raise ValueError
            except Exception:
                raise SkipFile("not_dicom", "not a DICOM file (no 'DICM' prefix and no DICOM elements)") from None
        except (EOFError, OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as err:
            raise SkipFile("truncated", f"truncated or corrupt DICOM header ({type(err).__name__})") from None
        pos = fp.tell()
        if any("End of file reached" in str(w.message) for w in caught):
            raise SkipFile("truncated", "truncated DICOM: the file ends inside a data element")
        try:
            implicit, little = ds.original_encoding
            if implicit is None:
                implicit, little = False, True
            sop_class = _text(ds, "SOPClassUID") or str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
            name = _sop_name(sop_class)
            rows, cols = _ushort(ds, "Rows", little), _ushort(ds, "Columns", little)
            if sop_class == _DICOMDIR_SOP:
                raise SkipFile("dicomdir", "DICOMDIR (the export's directory, not an image)")
            if pos >= size and rows is None and sop_class and (name is None or "Image Storage" in name):
                # Rows (0028,0010) is mandatory in every image and elements are stored in tag order: an image
                # file that ends before it and has no pixel data was cut off, not written without pixels.
                raise SkipFile("truncated", "image header ends before Rows/Columns and pixel data (file truncated or stripped)")
            if name is not None and "Image Storage" not in name:
                raise SkipFile("unsupported_sop", f"unsupported SOP class '{name}' (not an image)")
            _check_vr(ds, "PatientID", _PATIENT_ID_VRS, "bad_patient_id")
            charset = _text(ds, "SpecificCharacterSet")
            patient_id = _text(ds, "PatientID") if charset in _ASCII_CHARSETS else str(ds.get("PatientID", "")).strip()
            if not patient_id:
                raise SkipFile("no_patient_id", "DICOM without PatientID (0010,0020): cannot group it by patient")
            if _CONTROL_RE.search(patient_id):
                raise SkipFile("bad_patient_id", "PatientID (0010,0020) holds control characters: not a usable id")
            uids = {}
            for col, kw in _UID_KEYWORDS:
                _check_vr(ds, kw, _UID_VRS, "bad_uid")
                uids[col] = _text(ds, kw)
                if not uids[col]:
                    raise SkipFile("missing_uid", f"DICOM without {kw}: cannot group it")
                if not _UID_RE.fullmatch(uids[col]):
                    raise SkipFile("bad_uid", f"{kw} is not a valid UID (digits and '.', at most 64 characters)")
            frames = _number_of_frames(ds)
            geometry = None
            if rows and cols:
                _check_size(rows, cols, max_pixels)
                geometry = _Geometry(rows, cols, _ushort(ds, "SamplesPerPixel", little) or 1,
                                     _ushort(ds, "BitsAllocated", little), frames,
                                     _text(ds, "PhotometricInterpretation"))
            _pixel_data_check(fp, pos, size, bool(implicit), bool(little), geometry)
            if "TransferSyntaxUID" in ds.file_meta:
                tsyntax = str(ds.file_meta.TransferSyntaxUID)
            else:
                tsyntax = pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
            if not rows or not cols:
                raise SkipFile("no_pixel_data", "DICOM image without Rows/Columns")
            return {
                "patient_id": patient_id,
                **uids,
                "instance_number": _int_or_none(_text(ds, "InstanceNumber")),
                "modality": _text(ds, "Modality"),
                "view_position": _text(ds, "ViewPosition"),
                "body_part": _text(ds, "BodyPartExamined"),
                "rows": rows,
                "columns": cols,
                "frames": frames,
                "photometric": _text(ds, "PhotometricInterpretation"),
                "transfer_syntax": str(tsyntax),
                "source": "dicom",
                # for cohort filters only (not manifest columns)
                "study_date": _text(ds, "StudyDate"),
                "series_description": _text(ds, "SeriesDescription") if charset in _ASCII_CHARSETS
                else str(ds.get("SeriesDescription", "")).strip(),
            }
        except SkipFile:
            raise
        except Exception as err:  # a malformed element deep in the header: report, never stop the index
            raise SkipFile("corrupt", f"unreadable DICOM element ({type(err).__name__})") from None


def read_nifti_header(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
    """One row per 2-D slice (along the third axis) of a NIfTI volume, from its header only."""
    import nibabel as nib

    try:
        img = nib.load(path)
        shape = img.shape
    except Exception as err:
        raise SkipFile("corrupt", f"unreadable NIfTI file ({type(err).__name__})") from None
    if len(shape) < 2:
        raise SkipFile("no_pixel_data", f"NIfTI with {len(shape)}-D data: need at least 2-D")
    _check_size(int(shape[0]), int(shape[1]), max_pixels)
    stem = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    n_slices = shape[2] if len(shape) >= 3 else 1
    return [
        {
            "patient_id": stem, "study_uid": stem, "series_uid": stem, "sop_uid": f"{stem}#{k}",
            "instance_number": k + 1, "modality": "", "view_position": "", "body_part": "",
            "rows": int(shape[0]), "columns": int(shape[1]), "frames": 1, "slice_index": k if len(shape) >= 3 else None,
            "photometric": "", "transfer_syntax": "", "source": "nifti",
        }
        for k in range(n_slices)
    ]


def _read_file(entry: tuple[str, int, int], expand_frames: bool, max_pixels: int | None = DEFAULT_MAX_PIXELS
               ) -> tuple[str, int, int, list[dict] | None, str | None, str | None]:
    """Read one listed file ``(path, size, mtime_ns)``; never raises for a bad file."""
    path, size, mtime = entry
    try:
        if path.lower().endswith(NIFTI_SUFFIXES):
            rows = read_nifti_header(path, max_pixels)
        else:
            row = read_dicom_header(path, size, max_pixels)
            if expand_frames and row["frames"] > 1:
                rows = [{**row, "frame_index": i} for i in range(row["frames"])]
            else:
                rows = [row]
        return path, size, mtime, rows, None, None
    except SkipFile as skip:
        return path, size, mtime, None, skip.code, skip.reason
    except PermissionError:
        return path, size, mtime, None, "unreadable", "permission denied"
    except OSError as err:
        return path, size, mtime, None, "unreadable", f"cannot read file ({err.strerror})"


def _read_chunk(entries: Sequence[tuple[str, int, int]], expand_frames: bool,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[tuple]:
    silence_pydicom_logger()  # worker processes too
    return [_read_file(e, expand_frames, max_pixels) for e in entries]


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


@dataclass
class IndexResult:
    """What an index run produced; ``manifest`` and ``errors`` hold real paths (keys are only on disk)."""

    manifest: pd.DataFrame
    errors: pd.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)


def _pseudonymize_row(row: dict, pz: Pseudonymizer) -> dict:
    row["patient_id"] = pz.patient(row["patient_id"])
    for col in ("study_uid", "series_uid", "sop_uid"):
        row[col] = pz.uid(row[col])
    return row


def _previous(out: Path) -> tuple[dict[str, tuple[int, int]], pd.DataFrame, pd.DataFrame]:
    """Load a previous manifest + errors, keyed by real path, with the stamps of the files they describe."""
    manifest = read_manifest(out)
    ep = errors_path(out)
    errors = read_table_csv(ep, ["path", "reason", "code"], required=ERROR_COLUMNS[:3], what="errors table") \
        if ep.is_file() else pd.DataFrame(columns=ERROR_COLUMNS)
    if not errors.empty and errors["path"].str.startswith(PATHMAP_PREFIX).any():
        mapping = read_path_map(pathmap_path(out))
        keyed = errors["path"].str.startswith(PATHMAP_PREFIX).fillna(False)
        errors.loc[keyed, "path"] = errors.loc[keyed, "path"].map(mapping)
    stamps: dict[str, tuple[int, int]] = {}
    for df in (manifest, errors):
        for p, s, m in zip(df["path"], df["file_size"], df["file_mtime_ns"]):
            if isinstance(p, str) and pd.notna(s) and pd.notna(m):
                stamps[p] = (int(s), int(m))
    return stamps, manifest, errors


_OWN_HEADERS = {"manifest": b"path,patient_id,", "errors table": b"path,reason,code", "path map": b"key,path"}


def _is_own_output(path: Path, what: str) -> bool:
    """Whether an existing file is what an earlier index wrote there (so overwriting it loses nothing)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    if what == "meta file":
        return head.lstrip().startswith(b"{") and b'"format_version"' in head
    return head.startswith(_OWN_HEADERS[what])


def check_index_outputs(root: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Check where an index will write before reading the tree; returns ``out`` resolved.

    An output that is a folder, an unwritable folder, or an existing file of the indexed tree that the
    index did not write itself (``--out`` naming an input DICOM would replace it by a CSV) each raise one
    line naming the file, so nothing is read and no half-written output (a path map without its manifest)
    is left behind.
    """
    out_p = Path(out).resolve()
    outputs = {"manifest": out_p, "errors table": errors_path(out_p), "path map": pathmap_path(out_p),
               "meta file": meta_path(out_p)}
    for what, p in outputs.items():
        check_output_file(p, what)
    root_p = Path(root).resolve()
    for what, p in outputs.items():
        if p.exists() and _inside(str(p), str(root_p)) and not _is_own_output(p, what):
            raise FileExistsError(f"{p}: the {what} would overwrite a file of the indexed folder {root_p} that "
                                  "an index did not write: choose an --out outside the tree or a new name")
    return out_p


def _listing_errors(problems: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{**p, "file_size": pd.NA, "file_mtime_ns": pd.NA} for p in problems], columns=ERROR_COLUMNS)


#: Manifest columns an index does not produce itself but must keep: ``medssl split``'s assignment and
#: label fractions (losing them lets val/test images leak into pretraining), and joined labels.
def _carry_columns(previous: pd.DataFrame, manifest: pd.DataFrame, keep_label: bool) -> pd.DataFrame:
    """Copy the previous manifest's extra columns (split, labeled_*, ...) onto rows of unchanged files.

    A row keeps them when its file has the same path, size and mtime (and frame/slice) as before; rows of
    new or changed files get none (unassigned: training refuses them until the manifest is split again).
    """
    extra = [c for c in previous.columns if c not in MANIFEST_COLUMNS]
    cols = extra + (["label"] if keep_label and "label" in previous.columns else [])
    if previous.empty or not cols:
        return manifest

    def keys(df: pd.DataFrame) -> pd.Series:
        parts = [df[c].astype("string").fillna("") for c in
                 ("path", "file_size", "file_mtime_ns", "frame_index", "slice_index")]
        return parts[0].str.cat(parts[1:], sep="\x00")

    prev = previous.assign(_key=keys(previous).to_numpy()).drop_duplicates("_key").set_index("_key")
    manifest = manifest.copy()
    mkeys = keys(manifest)
    for c in cols:
        carried = mkeys.map(prev[c])
        if c == "label":
            manifest[c] = manifest[c].astype("string").fillna(carried.astype("string"))
        else:
            manifest[c] = carried.to_numpy()
    return manifest


def index_tree(
    root: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    workers: int = 1,
    pseudonymizer: Pseudonymizer | None = None,
    incremental: bool = True,
    expand_frames: bool = False,
    labels: pd.DataFrame | None = None,
    label_key: str = "patient_id",
    label_column: str = "label",
    progress: Callable[[int, int], None] | None = None,
    chunk_size: int = _CHUNK,
    cohort: CohortFilter | None = None,
    follow_links: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> IndexResult:
    """Index every file under ``root``; write ``out`` (+ ``.errors.csv``, ``.meta.json``) when given.

    Args:
        workers: processes reading headers in parallel (1 = in this process).
        pseudonymizer: replaces patient ids and UIDs by salted hashes and paths by opaque keys on disk.
        incremental: when ``out`` exists (made with the same salt and options), re-read only files whose
            size or mtime changed; unchanged files keep their rows. Either way, rows of unchanged files keep
            the columns a later step added (``split``, ``labeled_*``).
        expand_frames: one row per frame of a multi-frame instance (``frame_index``) instead of one per instance.
        labels: a table joined on ``label_key`` (original, un-pseudonymised values) giving ``label_column``.
        progress: called with (files just processed, total files) for a progress bar.
        chunk_size: files per task handed to a worker process.
        cohort: keep only images whose header matches (modality, body part, study date, series
            description); the others are counted in ``stats["excluded"]``, neither indexed nor errors.
        follow_links: follow symbolic links to files or folders outside ``root`` (reported, not read, otherwise).
        max_pixels: Rows x Columns above which an image is skipped as ``too_large`` (``None``/0: no limit).
    """
    t0 = time.perf_counter()
    silence_pydicom_logger()
    out_p = check_index_outputs(root, out) if out is not None else None
    exclude: set[str] = set()
    if out_p is not None:
        exclude = {str(out_p), str(errors_path(out_p)), str(pathmap_path(out_p)), str(meta_path(out_p))}
    problems: list[dict[str, Any]] = []
    listing = list(iter_files(root, exclude, follow_links=follow_links, problems=problems))
    files = [p for p, _, _ in listing]
    meta = {
        "format_version": FORMAT_VERSION,
        "pseudonymized": pseudonymizer is not None,
        "salt_fingerprint": pseudonymizer.fingerprint if pseudonymizer else None,
        "expand_frames": expand_frames,
        "follow_links": follow_links,
        "max_pixels": max_pixels or None,
    }
    if cohort is not None and not cohort.empty:  # absent otherwise: manifests made before cohorts stay reusable
        meta["cohort"] = cohort.as_dict()
    stamps: dict[str, tuple[int, int]] = {}
    prev_manifest = pd.DataFrame(columns=MANIFEST_COLUMNS)
    prev_errors = pd.DataFrame(columns=ERROR_COLUMNS)
    if out_p is not None and out_p.is_file():
        try:
            old_stamps, prev_manifest, prev_errors = _previous(out_p)
        except Exception as err:  # a damaged previous manifest only costs a full re-index
            logger.warning("cannot reuse the previous manifest (%s): indexing everything", type(err).__name__)
            prev_manifest, prev_errors = pd.DataFrame(columns=MANIFEST_COLUMNS), pd.DataFrame(columns=ERROR_COLUMNS)
            old_stamps = {}
        if incremental and all(read_meta(out_p).get(k) == v for k, v in meta.items()):
            stamps = old_stamps
        elif incremental:
            logger.warning("previous manifest was made with other options or another salt: indexing everything")

    to_read: list[tuple[str, int, int]] = []
    reuse: set[str] = set()
    for p, size, mtime in listing:
        if stamps.get(p) == (size, mtime):
            reuse.add(p)
        else:
            to_read.append((p, size, mtime))
    if progress and reuse:
        progress(len(reuse), len(files))

    results: list[tuple] = []
    chunks = [to_read[i : i + chunk_size] for i in range(0, len(to_read), chunk_size)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            n = len(chunks)
            for res in pool.map(_read_chunk, chunks, [expand_frames] * n, [max_pixels] * n):
                results.extend(res)
                if progress:
                    progress(len(res), len(files))
    else:
        for chunk in chunks:
            res = _read_chunk(chunk, expand_frames, max_pixels)
            results.extend(res)
            if progress:
                progress(len(res), len(files))

    new_rows: list[dict] = []
    new_errors: list[dict] = []
    excluded = 0
    for path, size, mtime, rows, code, reason in results:
        if rows is None:
            new_errors.append({"path": path, "reason": reason, "code": code, "file_size": size, "file_mtime_ns": mtime})
            continue
        if cohort is not None and not cohort.matches(rows[0]):
            excluded += 1
            continue
        for row in rows:
            if pseudonymizer is not None:
                _pseudonymize_row(row, pseudonymizer)
            new_rows.append({"path": path, **row, "file_size": size, "file_mtime_ns": mtime})

    listing_errors = _listing_errors(problems)
    prev_listing = prev_errors[prev_errors["file_size"].isna()] if stamps else prev_errors.iloc[:0]
    same_listing = sorted(zip(prev_listing["path"], prev_listing["code"])) == sorted(
        zip(listing_errors["path"], listing_errors["code"]))
    unchanged = not to_read and len(reuse) == len(stamps) and labels is None and same_listing and bool(stamps)
    if unchanged:  # the previous manifest is already merged, typed and sorted
        manifest, errors = prev_manifest, _typed_errors(prev_errors)
    else:
        manifest = _concat(prev_manifest[prev_manifest["path"].isin(reuse)],
                           pd.DataFrame(new_rows, columns=MANIFEST_COLUMNS), MANIFEST_COLUMNS)
        errors = _concat(prev_errors[prev_errors["path"].isin(reuse)],
                         pd.concat([pd.DataFrame(new_errors, columns=ERROR_COLUMNS), listing_errors]), ERROR_COLUMNS)
        if labels is not None:
            manifest = apply_labels(manifest, labels, label_key, label_column, pseudonymizer)
        manifest = _carry_columns(prev_manifest, normalize_dtypes(manifest), keep_label=labels is None)
        manifest = manifest.sort_values(["path", "frame_index", "slice_index"], na_position="first", kind="stable")
        manifest = manifest.reset_index(drop=True)
        errors = _typed_errors(errors).sort_values("path", kind="stable").reset_index(drop=True)

    stats = summarize(manifest, errors)
    stats.update(files_seen=len(files) + len(problems), files_read=len(to_read), files_reused=len(reuse),
                 excluded=excluded,
                 seconds=round(time.perf_counter() - t0, 3))
    if out_p is not None and not unchanged:  # an unchanged tree leaves the output files (and their mtimes) alone
        write_index(out_p, manifest, errors, pseudonymizer, meta)
    return IndexResult(manifest=manifest, errors=errors, stats=stats)


def _concat(old: pd.DataFrame, new: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    parts = [df for df in (old, new) if not df.empty]
    return pd.concat(parts, ignore_index=True).reindex(columns=columns) if parts else pd.DataFrame(columns=columns)


def _typed_errors(errors: pd.DataFrame) -> pd.DataFrame:
    errors = errors.astype({"path": "string", "reason": "string", "code": "string"})
    return errors.astype({"file_size": "Int64", "file_mtime_ns": "Int64"})


def read_labels(path: str | os.PathLike, key: str = "patient_id", column: str = "label") -> pd.DataFrame:
    """A label table keyed by an original identifier; ``NA``/``None`` keys and labels stay strings."""
    return read_table_csv(path, [key, column], required=[key, column], what="labels table")


def apply_labels(manifest: pd.DataFrame, labels: pd.DataFrame, key: str, column: str,
                 pseudonymizer: Pseudonymizer | None = None) -> pd.DataFrame:
    """Join labels keyed by an original identifier; with pseudonymisation the keys are hashed the same way."""
    if key not in ("patient_id", "study_uid", "series_uid", "sop_uid"):
        raise ValueError(f"label key must be one of patient_id/study_uid/series_uid/sop_uid, got {key!r}")
    if key not in labels.columns or column not in labels.columns:
        raise ValueError(f"labels table needs columns {key!r} and {column!r}; it has {list(labels.columns)}")
    known = labels[key].notna()
    keys = labels.loc[known, key].astype(str).str.strip()
    if pseudonymizer is not None:
        hash_fn = pseudonymizer.patient if key == "patient_id" else pseudonymizer.uid
        keys = keys.map(hash_fn)
    mapping = dict(zip(keys, labels.loc[known, column].astype("string")))
    manifest = manifest.copy()
    manifest["label"] = manifest[key].map(mapping).astype("string")
    return manifest


def write_index(out: Path, manifest: pd.DataFrame, errors: pd.DataFrame, pseudonymizer: Pseudonymizer | None,
                meta: dict) -> None:
    """Write manifest, errors, meta (and the private path map when pseudonymised), each atomically.

    A path map written for a manifest that then fails to be written is removed again: a path map without
    its manifest would be an orphan list of real (identifying) paths.
    """
    import json

    from .manifest import atomic_write_text

    manifest = manifest.copy()
    errors = errors.copy()
    pm_path = pathmap_path(out)
    new_pathmap = False
    try:
        if pseudonymizer is not None:
            all_paths = sorted(set(manifest["path"]).union(errors["path"]))
            keys = {p: PATHMAP_PREFIX + pseudonymizer.path_key(p) for p in all_paths}
            pm = pd.DataFrame({"key": [keys[p] for p in all_paths], "path": all_paths})
            new_pathmap = not pm_path.exists()
            atomic_write_text(pm_path, pm.to_csv(index=False), mode=0o600)
            manifest["path"] = manifest["path"].map(keys)
            errors["path"] = errors["path"].map(keys)
        elif pm_path.exists():
            pm_path.unlink()
        write_manifest(manifest, out)
    except BaseException:
        if new_pathmap and pm_path.exists() and not out.exists():
            pm_path.unlink()
        raise
    write_manifest(errors, errors_path(out), columns=ERROR_COLUMNS)
    atomic_write_text(meta_path(out), json.dumps(meta, indent=2) + "\n")


def summarize(manifest: pd.DataFrame, errors: pd.DataFrame) -> dict[str, Any]:
    """Counts a user checks after an index: what was found and why anything was skipped."""
    per_patient = manifest.groupby("patient_id").size() if not manifest.empty else pd.Series(dtype=int)
    return {
        "files_indexed": int(manifest["path"].nunique()),
        "instances": len(manifest),
        "files_skipped": len(errors),
        "skipped_by_reason": dict(sorted(Counter(errors["code"].astype(str)).items())),
        "patients": int(manifest["patient_id"].nunique()),
        "studies": int(manifest["study_uid"].nunique()),
        "series": int(manifest["series_uid"].nunique()),
        "multi_image_patients": int((per_patient >= 2).sum()),
    }
