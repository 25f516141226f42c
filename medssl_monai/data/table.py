"""Turn a CSV of image paths (PNG/JPEG/NIfTI/DICOM) with a group column and labels into a manifest.

Public non-DICOM datasets ship as a table (HAM10000: ``lesion_id, image_id, dx, path, ...``); mapping them
onto the manifest's columns lets the same grouping, splitting and MICLe code run on them unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .manifest import DEFAULT_MAX_PIXELS, MANIFEST_COLUMNS, read_table_csv
from .pseudonymize import Pseudonymizer

__all__ = ["image_size_from_header", "table_to_manifest"]

_SOURCES = {".png": "image", ".jpg": "image", ".jpeg": "image", ".bmp": "image", ".tif": "image",
            ".tiff": "image", ".nii": "nifti", ".gz": "nifti", ".dcm": "dicom"}


_PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def image_size_from_header(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(width, height)`` of a PNG/JPEG/BMP/TIFF read from its header only (PIL decodes lazily), or ``None``.

    PIL refuses a header beyond twice its own bomb limit at ``open``; such an image is reported as that
    size's lower bound rather than as unreadable.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Image.DecompressionBombError:
        return (Image.MAX_IMAGE_PIXELS or 0) * 2, 1
    except Exception:  # unreadable images are the loader's business (skipped and logged there)
        return None


def _too_large(paths: list[str], max_pixels: int | None) -> list[tuple[str, int, int]]:
    if not max_pixels or max_pixels <= 0:
        return []
    import warnings

    from PIL import Image

    big = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for p in paths:
            if Path(p).suffix.lower() in _PIL_SUFFIXES:
                size = image_size_from_header(p)
                if size is not None and size[0] * size[1] > max_pixels:
                    big.append((p, *size))
    return big


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
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> pd.DataFrame:
    """Map a table onto the manifest's columns; every other column of the table is kept as it is.

    Args:
        group_col: the grouping key (patient, or lesion for HAM10000); it becomes ``patient_id``.
        study_col, series_col: optional finer levels; they default to the group.
        instance_col: the per-image id (``image_id``); becomes ``sop_uid`` (default: the path).
        root: folder that relative paths are relative to (default: the CSV's folder).
        check_files: fail with the list of missing files when some paths do not exist, or of images whose
            header gives more than ``max_pixels`` pixels (``None``/0: no limit) -- one such image can take
            gigabytes of memory in a data loader.

    Identifiers and labels spelled ``NA``, ``None``, ``null`` stay strings; only an empty cell is missing.
    """
    if isinstance(table, pd.DataFrame):
        df = table.reset_index(drop=True)  # a filtered table's index would misalign the columns built below
        base = Path(root) if root is not None else Path.cwd()
        src = "<table>"
    else:
        src = str(table)
        id_cols = [c for c in (path_col, group_col, label_col, study_col, series_col, instance_col) if c]
        df = read_table_csv(table, id_cols, what="table")  # other columns keep inferred types
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
        big = _too_large(paths, max_pixels)
        if big:
            examples = ", ".join(f"{p} ({w} x {h})" for p, w, h in big[:3])
            raise ValueError(f"{src}: {len(big)} image(s) larger than {max_pixels} pixels (--max-pixels), e.g. "
                             f"{examples}: downscale them or raise the limit")
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
