"""Index a folder tree of DICOM (and NIfTI) files into a manifest, reading headers only.

PACS exports come with opaque file names, several studies per folder, one patient spread over folders and
plenty of files that are not images at all; the index therefore groups by DICOM tags only, never by folder
names, and turns every file it cannot use into one line of ``manifest.errors.csv`` instead of an exception.
Incremental: a re-index reads only files whose size or mtime changed.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..cohort import CohortFilter
from ..duplicates import DUPLICATE_CODES, drop_duplicate_files
from ..labels import apply_labels
from ..manifest import (
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
from ..privacy import silence_pydicom_logger
from ..pseudonymize import Pseudonymizer
from .header import NIFTI_SUFFIXES, SkipFile, read_dicom_header, read_nifti_header
from .walk import _inside, iter_files

__all__ = ["FORMAT_VERSION", "IndexResult", "check_index_outputs", "index_tree", "summarize", "write_index"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: encapsulated/geometry/identifier checks, link and size options; 3: accession_number
_CHUNK = 64


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
    if row.get("accession_number"):  # often empty: an empty value stays empty, not one shared pseudonym
        row["accession_number"] = pz.accession(row["accession_number"])
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
    if not errors.empty:  # copies left out last time are read again: the kept copy may be gone
        errors = errors[~errors["code"].isin(DUPLICATE_CODES)]
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
    include: Collection[str] | None = None,
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
        include: index only these files (absolute paths as listed); the others under ``root`` are left out
            of the manifest and the errors (a PACS local copy's instances that left the selection).
    """
    t0 = time.perf_counter()
    silence_pydicom_logger()
    out_p = check_index_outputs(root, out) if out is not None else None
    exclude: set[str] = set()
    if out_p is not None:
        exclude = {str(out_p), str(errors_path(out_p)), str(pathmap_path(out_p)), str(meta_path(out_p))}
    problems: list[dict[str, Any]] = []
    listing = list(iter_files(root, exclude, follow_links=follow_links, problems=problems))
    if include is not None:
        include = set(include)
        listing = [entry for entry in listing if entry[0] in include]
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
        manifest, copies = drop_duplicate_files(manifest.reset_index(drop=True))
        if not copies.empty:
            counts = copies["code"].value_counts()
            logger.warning("%d file(s) repeat an instance of another file (duplicate_instance: %d, uid_conflict: "
                           "%d): left out, listed in the errors table", len(copies),
                           int(counts.get("duplicate_instance", 0)), int(counts.get("uid_conflict", 0)))
            errors = _concat(errors, copies, ERROR_COLUMNS)
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



def write_index(out: Path, manifest: pd.DataFrame, errors: pd.DataFrame, pseudonymizer: Pseudonymizer | None,
                meta: dict) -> None:
    """Write manifest, errors, meta (and the private path map when pseudonymised), each atomically.

    A path map written for a manifest that then fails to be written is removed again: a path map without
    its manifest would be an orphan list of real (identifying) paths.
    """
    import json

    from ...utils.atomic import atomic_write_text

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
