"""DICOM and NIfTI headers: what one file holds, checked without decoding its pixels.

Every check raises :class:`SkipFile` with a code and one line, which the index turns into a row of
``manifest.errors.csv``: a PACS export holds cut-short, mislabelled and non-image files.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID

from ..manifest import (
    DEFAULT_MAX_PIXELS,
)

__all__ = ["NIFTI_SUFFIXES", "SkipFile", "read_dicom_header", "read_nifti_header"]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UN", b"UC", b"UR", b"UT", b"SV", b"UV"}
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"


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
    "AccessionNumber",
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
                "accession_number": _text(ds, "AccessionNumber") if charset in _ASCII_CHARSETS
                else str(ds.get("AccessionNumber", "")).strip(),
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
            "patient_id": stem, "study_uid": stem, "series_uid": stem, "sop_uid": f"{stem}#{k}", "accession_number": "",
            "instance_number": k + 1, "modality": "", "view_position": "", "body_part": "",
            "rows": int(shape[0]), "columns": int(shape[1]), "frames": 1, "slice_index": k if len(shape) >= 3 else None,
            "photometric": "", "transfer_syntax": "", "source": "nifti",
        }
        for k in range(n_slices)
    ]

