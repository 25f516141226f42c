"""Back from a pseudonymised manifest to the original images: pseudonym -> source file -> its header.

A pseudonymised run knows its images only by hashed UIDs and ``pm:`` keys; whoever holds the private path
map (``manifest.pathmap.csv``) can reach the source files and read their original Study/Series/SOP
Instance UIDs, which is what a PACS, a viewer or a labelling worklist needs. Without the map this refuses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..manifest import PATHMAP_PREFIX, pathmap_path, read_manifest

__all__ = ["PathMapError", "original_uids", "source_files"]


class PathMapError(ValueError):
    """The original images cannot be reached: the path map is missing, or an id is not in the manifest."""


def source_files(manifest: str | os.PathLike, sop_uids: Sequence[str]) -> dict[str, str]:
    """Pseudonymised (or plain) SOP UID -> the source file, through the private path map when keyed."""
    manifest = Path(manifest)
    raw = read_manifest(manifest, resolve_paths=False)
    keyed = raw["path"].str.startswith(PATHMAP_PREFIX).fillna(False)
    if keyed.any() and not pathmap_path(manifest).is_file():
        raise PathMapError(f"{manifest} is pseudonymised and its private pseudonym map {pathmap_path(manifest)} is "
                           "missing: the original images can only be reached through it")
    df = read_manifest(manifest)
    by_sop = df.drop_duplicates("sop_uid").set_index("sop_uid")["path"]
    missing = [u for u in sop_uids if u not in by_sop.index]
    if missing:
        raise PathMapError(f"{len(missing)} image(s) are not in {manifest} (e.g. {missing[0]}): give the manifest "
                           "they came from")
    return {u: str(by_sop[u]) for u in sop_uids}


def original_uids(manifest: str | os.PathLike, sop_uids: Sequence[str]) -> pd.DataFrame:
    """``sop_uid`` (as in the manifest) with the source file's ``original_study_uid``, ``original_series_uid``
    and ``original_sop_uid``, read from its DICOM header (pixels not read). A file that is no DICOM (a PNG of a
    table manifest) has none: empty cells."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = source_files(manifest, list(dict.fromkeys(sop_uids)))
    rows = []
    for uid, path in files.items():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
            found = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                     str(ds.get("SOPInstanceUID", "")))
        except (InvalidDicomError, OSError):
            found = ("", "", "")
        rows.append({"sop_uid": uid, "original_study_uid": found[0] or pd.NA, "original_series_uid": found[1] or pd.NA,
                     "original_sop_uid": found[2] or pd.NA})
    return pd.DataFrame(rows, columns=["sop_uid", "original_study_uid", "original_series_uid", "original_sop_uid"]
                        ).astype("string")
