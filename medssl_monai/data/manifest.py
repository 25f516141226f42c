"""The manifest: one table row per image instance, the hand-over format between the data layer and training.

Every source (a DICOM tree, a CSV of image paths, NIfTI volumes) is turned into the same columns so that
grouping, splitting and loading never need to know where an image came from.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from ..utils.atomic import atomic_write_text
from .run_context import register_path_keys

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ERROR_COLUMNS",
    "ID_COLUMNS",
    "MANIFEST_COLUMNS",
    "PATHMAP_PREFIX",
    "check_output_file",
    "errors_path",
    "meta_path",
    "normalize_dtypes",
    "pathmap_path",
    "read_manifest",
    "read_path_map",
    "read_table_csv",
    "write_manifest",
]

#: Columns every manifest has, in order (extra columns such as labels or split flags follow).
MANIFEST_COLUMNS: list[str] = [
    "path",
    "patient_id",
    "study_uid",
    "series_uid",
    "sop_uid",
    "accession_number",
    "instance_number",
    "modality",
    "view_position",
    "body_part",
    "rows",
    "columns",
    "frames",
    "frame_index",
    "slice_index",
    "photometric",
    "transfer_syntax",
    "label",
    "source",
    "file_size",
    "file_mtime_ns",
]
#: Identifier columns: always read as strings (a PatientID such as ``007`` must keep its zeros).
ID_COLUMNS = ["path", "patient_id", "study_uid", "series_uid", "sop_uid", "accession_number", "label"]
INT_COLUMNS = ["instance_number", "rows", "columns", "frames", "frame_index", "slice_index", "file_size"]
ERROR_COLUMNS = ["path", "reason", "code", "file_size", "file_mtime_ns"]
#: In a pseudonymised manifest, ``path`` holds ``pm:<key>``; the real path lives in the private path map.
PATHMAP_PREFIX = "pm:"
#: Largest image (Rows x Columns of one frame or slice) indexed by default: a 12000 x 12000 JPEG takes
#: 2.7 GB of memory for one load, far beyond what any training input needs.
DEFAULT_MAX_PIXELS = 100_000_000


def errors_path(manifest: str | os.PathLike) -> Path:
    """``manifest.csv`` -> ``manifest.errors.csv``."""
    p = Path(manifest)
    return p.with_name(p.stem + ".errors.csv")


def pathmap_path(manifest: str | os.PathLike) -> Path:
    """``manifest.csv`` -> ``manifest.pathmap.csv`` (private: maps opaque keys back to file paths)."""
    p = Path(manifest)
    return p.with_name(p.stem + ".pathmap.csv")


def meta_path(manifest: str | os.PathLike) -> Path:
    """``manifest.csv`` -> ``manifest.meta.json`` (how the manifest was made, for incremental re-indexing)."""
    p = Path(manifest)
    return p.with_name(p.stem + ".meta.json")


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Check, before any work, that ``path`` can be written: not a folder, in a folder that takes new files.

    Returns the resolved path; raises one line naming it otherwise (a run that fails only when it writes
    its result has wasted the whole read, and may leave half of its outputs behind).
    """
    p = Path(path).resolve()
    if p.is_dir():
        raise ValueError(f"{p}: the {what} to write is a folder: give a file name, e.g. {p / 'manifest.csv'}")
    probe = p.parent
    while not probe.exists():  # the folders are created when writing: the nearest existing one must take them
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{p}: cannot write the {what}: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".medssl-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise PermissionError(f"{p}: cannot write the {what} into the folder {probe} ({err.strerror or err})") from None
    return p


def _order(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    columns = list(columns)
    for c in columns:
        if c not in df.columns:
            df[c] = pd.NA
    extra = [c for c in df.columns if c not in columns]
    return df[columns + extra]


def normalize_dtypes(df: pd.DataFrame) -> pd.DataFrame:
    """Give a manifest its canonical column order and dtypes (ids as strings, counts as nullable ints)."""
    df = _order(df, MANIFEST_COLUMNS)
    for c in [*ID_COLUMNS, "modality", "view_position", "body_part", "photometric", "transfer_syntax", "source"]:
        df[c] = df[c].astype("string").replace("", pd.NA)  # CSV cannot tell "" from missing
    for c in INT_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    df["file_mtime_ns"] = pd.to_numeric(df["file_mtime_ns"], errors="coerce").astype("Int64")
    return df


def write_manifest(df: pd.DataFrame, path: str | os.PathLike, columns: Iterable[str] = MANIFEST_COLUMNS) -> None:
    """Write a manifest (or an errors table with ``columns=ERROR_COLUMNS``) atomically."""
    df = _order(df.copy(), columns)
    for c in INT_COLUMNS:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    atomic_write_text(path, df.to_csv(index=False))


def read_table_csv(path: str | os.PathLike, string_columns: Iterable[str] = (), required: Iterable[str] = (),
                   what: str = "table") -> pd.DataFrame:
    """Read a CSV without guessing missing values: only an empty cell is missing.

    pandas' default turns ``NA``, ``N/A``, ``null`` or ``None`` into NaN, which silently erases patients and
    labels spelled that way; here they stay strings. ``string_columns`` are read as strings (``007`` keeps
    its zeros); a file that is no CSV, or lacks a ``required`` column, raises one ``ValueError`` line
    naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a {what} CSV file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        df = pd.read_csv(path, dtype=dict.fromkeys(string_columns, "string"), keep_default_na=False,
                         na_values=[""])
    except (ValueError, pd.errors.ParserError) as err:  # UnicodeDecodeError and EmptyDataError included
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{path}: not a readable {what} CSV ({first})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        shown = [str(c)[:40] for c in df.columns[:12]] + (["..."] if len(df.columns) > 12 else [])
        raise ValueError(f"{path}: not a {what}: no column(s) {missing} (its columns: {shown})")
    return df


def read_manifest(path: str | os.PathLike, resolve_paths: bool = True) -> pd.DataFrame:
    """Read a manifest with identifiers kept as strings (``NA``/``None`` ids and labels included).

    Relative paths are resolved against the manifest's folder; in a pseudonymised manifest, ``pm:`` keys are
    resolved through the private path map next to it when it is there (``resolve_paths=False`` keeps keys).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found")
    df = read_table_csv(path, [*ID_COLUMNS, "modality", "view_position", "body_part"], required=["path"],
                        what="manifest")
    df = normalize_dtypes(df)
    if df["path"].isna().any():
        rows = [int(i) + 2 for i in df.index[df["path"].isna()][:5]]
        raise ValueError(f"{path}: empty 'path' in line(s) {rows}: every manifest row needs an image path")
    if not resolve_paths or df.empty:
        return df
    keyed = df["path"].str.startswith(PATHMAP_PREFIX).fillna(False)
    if keyed.any():
        pm = pathmap_path(path)
        if not pm.is_file():
            raise FileNotFoundError(
                f"{path} is pseudonymised and its paths are opaque keys, but the private path map {pm} "
                "is missing: keep it beside the manifest (it is written with the manifest, mode 0600)")
        mapping = read_path_map(pm)
        keys = df.loc[keyed, "path"].copy()
        df.loc[keyed, "path"] = keys.map(mapping)
        if df.loc[keyed, "path"].isna().any():
            raise KeyError(f"{pm} lacks entries for some keys of {path}: re-run the index")
    base = path.parent.resolve()
    df["path"] = pd.array([p if os.path.isabs(p) else str(base / p) for p in df["path"]], dtype="string")
    if keyed.any():  # the current run's logs name these images by key (run_context.install_path_redaction)
        register_path_keys(dict(zip(df.loc[keyed, "path"], keys)))
    return df


def read_path_map(path: str | os.PathLike) -> pd.Series:
    """The private path map: ``pm:`` key -> real path."""
    pm = read_table_csv(path, ["key", "path"], required=["key", "path"], what="path map")
    return pm.set_index("key")["path"]


def read_meta(manifest: str | os.PathLike) -> dict:
    p = meta_path(manifest)
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
