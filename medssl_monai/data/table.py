"""Turn a CSV of image paths (PNG/JPEG/NIfTI/DICOM) with a group column and labels into a manifest.

Public non-DICOM datasets ship as a table (HAM10000: ``lesion_id, image_id, dx, path, ...``); mapping them
onto the manifest's columns lets the same grouping, splitting and MICLe code run on them unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .manifest import MANIFEST_COLUMNS
from .pseudonymize import Pseudonymizer

__all__ = ["table_to_manifest"]

_SOURCES = {".png": "image", ".jpg": "image", ".jpeg": "image", ".bmp": "image", ".tif": "image",
            ".tiff": "image", ".nii": "nifti", ".gz": "nifti", ".dcm": "dicom"}


def table_to_manifest(
    table: str | os.PathLike | pd.DataFrame,
    *,
    path_col: str = "path",
    group_col: str = "patient_id",
    label_col: str | None = "label",
    study_col: str | None = None,
    series_col: str | None = None,
    instance_col: str | None = None,
    root: str | os.PathLike | None = None,
    check_files: bool = True,
    pseudonymizer: Pseudonymizer | None = None,
) -> pd.DataFrame:
    """Map a table onto the manifest's columns; every other column of the table is kept as it is.

    Args:
        group_col: the grouping key (patient, or lesion for HAM10000); it becomes ``patient_id``.
        study_col, series_col: optional finer levels; they default to the group.
        instance_col: the per-image id (``image_id``); becomes ``sop_uid`` (default: the path).
        root: folder that relative paths are relative to (default: the CSV's folder).
        check_files: fail with the list of missing files when some paths do not exist.
    """
    if isinstance(table, pd.DataFrame):
        df = table.copy()
        base = Path(root) if root is not None else Path.cwd()
        src = "<table>"
    else:
        src = str(table)
        id_cols = [c for c in (path_col, group_col, label_col, study_col, series_col, instance_col) if c]
        df = pd.read_csv(table, dtype=dict.fromkeys(id_cols, "string"))  # other columns keep inferred types
        base = Path(root) if root is not None else Path(table).resolve().parent
    needed = [c for c in (path_col, group_col, label_col, study_col, series_col, instance_col) if c]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{src}: missing column(s) {missing}; columns are {list(df.columns)}")
    paths = [p if os.path.isabs(p) else str((base / p).resolve()) for p in df[path_col].astype(str)]
    if check_files:
        absent = [p for p in paths if not os.path.isfile(p)]
        if absent:
            raise FileNotFoundError(f"{src}: {len(absent)} image file(s) listed but not found, e.g. {absent[:3]}")
    group = df[group_col].astype("string").str.strip()
    if group.isna().any() or (group == "").any():
        bad = df.index[group.isna() | (group == "")].tolist()[:5]
        raise ValueError(f"{src}: empty {group_col!r} in row(s) {bad}: every image needs a group")
    out = pd.DataFrame({
        "path": paths,
        "patient_id": group,
        "study_uid": df[study_col].astype("string") if study_col else group,
        "series_uid": df[series_col].astype("string") if series_col else group,
        "sop_uid": df[instance_col].astype("string") if instance_col else pd.Series(paths, dtype="string"),
        "label": df[label_col].astype("string") if label_col else pd.NA,
        "source": [_SOURCES.get(Path(p).suffix.lower(), "image") for p in paths],
    })
    if pseudonymizer is not None:
        out["patient_id"] = out["patient_id"].map(pseudonymizer.patient)
        for c in ("study_uid", "series_uid", "sop_uid"):
            out[c] = out[c].map(pseudonymizer.uid)
    extra = df.drop(columns=[c for c in needed if c != path_col] + [path_col])
    extra = extra.drop(columns=[c for c in extra.columns if c in MANIFEST_COLUMNS])
    out = pd.concat([out.reindex(columns=MANIFEST_COLUMNS), extra.reset_index(drop=True)], axis=1)
    return out
