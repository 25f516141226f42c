"""What each prediction was made from: a fingerprint of every source file, recorded at prediction time.

Results go back to the PACS under the identity of the file they were predicted on, read again later. A
re-export that re-uses file names, or a copy restored over another, would put one patient's finding under
another's identity. So the prediction run records, per predicted image, a SHA-256 of the file's bytes and
of the SOP Instance UID its header holds, and ``results-to-dicom`` proves both before it writes anything.

The record (``<predictions>.sources.csv``, mode 0600) holds digests only, no identifier in clear: a
pseudonymised run's outputs stay pseudonymised.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..utils.atomic import atomic_write_text

__all__ = ["SOURCE_COLUMNS", "SourceFingerprint", "fingerprint", "read_source_record", "source_record_path",
           "write_source_record"]

#: columns of the record: the image's id as predicted (``sop_uid`` of the predictions CSV) and its digests
SOURCE_COLUMNS = ("sop_uid", "source_sha256", "source_uid_sha256")


@dataclass(frozen=True)
class SourceFingerprint:
    """A file's content digest, the digest of the SOP Instance UID in its header ("" when it has none), and,
    for DICOM files, the header read from the same bytes (so a check reads each file once)."""

    sha256: str
    uid_sha256: str
    header: object | None = None


def _uid_digest(uid: str) -> str:
    return hashlib.sha256(uid.encode("utf-8")).hexdigest() if uid else ""


def fingerprint(path: str | os.PathLike, keep_header: bool = False) -> SourceFingerprint:
    """Digest one file: its bytes, and the SOP Instance UID of its header when it is DICOM (else "")."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    data = Path(path).read_bytes()
    header = None
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        uid = str(header.get("SOPInstanceUID", "") or "")
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError):
        uid = ""  # a PNG or NIfTI source: its content digest is the proof
    return SourceFingerprint(hashlib.sha256(data).hexdigest(), _uid_digest(uid), header if keep_header else None)


def source_record_path(predictions: str | os.PathLike) -> Path:
    """``predictions.csv`` -> ``predictions.sources.csv`` beside it."""
    p = Path(predictions)
    return p.with_name(f"{p.stem}.sources.csv")


def write_source_record(predictions: str | os.PathLike, files: Mapping[str, str], sop_uids: Iterable[str]) -> Path:
    """Fingerprint the file of every predicted ``sop_uid`` (``files``: sop_uid -> path) into the record."""
    rows = []
    for uid in dict.fromkeys(sop_uids):
        fp = fingerprint(files[uid])
        rows.append({"sop_uid": uid, "source_sha256": fp.sha256, "source_uid_sha256": fp.uid_sha256})
    out = source_record_path(predictions)
    atomic_write_text(out, pd.DataFrame(rows, columns=list(SOURCE_COLUMNS)).to_csv(index=False), mode=0o600)
    return out


def read_source_record(predictions: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """sop_uid -> (content digest, UID digest); one line naming the file when it is missing or malformed."""
    path = source_record_path(predictions)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no record of the files {Path(predictions).name} was predicted from (it "
                                "is written with the predictions): re-run the prediction to send its results")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns) != list(SOURCE_COLUMNS) or df["sop_uid"].duplicated().any():
        raise ValueError(f"{path}: not a source record (columns {', '.join(SOURCE_COLUMNS)}, one row per image)")
    return {r["sop_uid"]: (r["source_sha256"], r["source_uid_sha256"]) for r in df.to_dict("records")}
