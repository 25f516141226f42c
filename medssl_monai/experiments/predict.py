"""Predict a set of images with a trained classifier bundle: a user's new images, or a study's blind test set.

A *predict set* is images without labels that no phase may train, pretrain, select or choose on: a folder of
images, a CSV of ``path`` plus an id column (the blind set's ``images.csv``: ``blind_id, path``) or a
manifest. Each fine-tuned model writes one CSV of ``<id>, prob_<class>...`` (4 decimals), the format the
blind set is scored in outside the project. The images go through the bundle's own ``inference.json``, so a
prediction here equals what MONAI Label or ``monai.bundle run`` would give.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..bundle.data import IMAGE_SUFFIXES
from ..data.manifest import MANIFEST_COLUMNS, read_manifest, read_table_csv, write_manifest
from ..data.table import table_to_manifest
from ..utils.atomic import atomic_write_bytes
from .runner import run_bundle

__all__ = ["DECIMALS", "predict_images", "predict_set_manifest", "predictions_table"]

logger = logging.getLogger(__name__)

DECIMALS = 4


def _id_column(columns: list[str], id_col: str | None, src: str) -> str:
    if id_col:
        if id_col not in columns:
            raise ValueError(f"{src}: no id column {id_col!r}; columns are {columns}")
        return id_col
    ids = [c for c in columns if c != "path" and (c == "id" or c.endswith("_id"))]
    if len(ids) != 1:
        raise ValueError(f"{src}: cannot tell the id column among {columns}: name it (--id-col)")
    return ids[0]


def predict_set_manifest(source: str | os.PathLike, out: str | os.PathLike,
                         id_col: str | None = None) -> tuple[Path, str]:
    """A manifest of the images in ``source`` (folder, ``path`` + id CSV, or manifest) at ``out``, with each
    image's id as ``sop_uid`` (so the bundle's predictions name it); returns the manifest and the id name.

    Labels, if any, are dropped: a predict set is never scored or chosen on inside the project.
    """
    src = Path(source)
    if src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(src).parts))
        if not paths:
            raise ValueError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        ids = [str(p.relative_to(src).with_suffix("")) for p in paths]
        table = pd.DataFrame({"path": [str(p) for p in paths], "image_id": ids})
        name, manifest = "image_id", table_to_manifest(table, group_col="image_id", instance_col="image_id",
                                                       label_col=None)
    elif not src.is_file():
        raise FileNotFoundError(f"{src}: no such image folder or CSV")
    else:
        header = list(pd.read_csv(src, nrows=0).columns)
        if set(MANIFEST_COLUMNS) <= set(header):
            manifest = read_manifest(src)
            name = "sop_uid"
        else:
            name = _id_column(header, id_col, str(src))
            table = read_table_csv(src, [name, "path"], required=[name, "path"], what="image list")
            manifest = table_to_manifest(table, group_col=name, instance_col=name, label_col=None,
                                         root=src.resolve().parent)
        manifest = manifest.assign(label=pd.NA)
    dupes = manifest["sop_uid"].astype(str).duplicated()
    if dupes.any():
        raise ValueError(f"{src}: {int(dupes.sum())} image id(s) appear more than once, e.g. "
                         f"{manifest.loc[dupes, 'sop_uid'].astype(str).head(3).tolist()}")
    manifest = manifest.assign(split="predict")
    out = Path(out)
    write_manifest(manifest, out)
    return out, name


def predictions_table(predictions_csv: str | os.PathLike, id_name: str, classes: list[str],
                      expected_ids: list[str] | None = None) -> pd.DataFrame:
    """The bundle's ``predictions.csv`` as ``<id_name>, prob_<class>...`` rounded to :data:`DECIMALS`.

    Refuses a table that misses a class, has an id twice, or (``expected_ids``) misses an image: a partial
    blind CSV would be scored as if the model had abstained.
    """
    df = pd.read_csv(predictions_csv, dtype={"sop_uid": str}, keep_default_na=False)
    cols = [f"prob_{c}" for c in classes]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{predictions_csv}: no column(s) {missing} for the bundle's classes")
    if df["sop_uid"].duplicated().any():
        raise ValueError(f"{predictions_csv}: {int(df['sop_uid'].duplicated().sum())} image(s) predicted twice")
    if expected_ids is not None:
        absent = sorted(set(expected_ids) - set(df["sop_uid"]))
        if absent:
            raise ValueError(f"{predictions_csv}: {len(absent)} image(s) without a prediction (unreadable? see "
                             f"bad_images.csv), e.g. {absent[:3]}")
    probs = df[cols].to_numpy(dtype=float)
    if not np.isfinite(probs).all():
        raise ValueError(f"{predictions_csv}: probabilities that are not finite")
    out = pd.DataFrame({id_name: df["sop_uid"].astype(str)})
    for c, col in zip(cols, probs.T):
        out[c] = np.round(col, DECIMALS)
    return out.sort_values(id_name, kind="stable").reset_index(drop=True)


def predict_images(bundle_root: str | os.PathLike, manifest: str | os.PathLike, id_name: str,
                   out_csv: str | os.PathLike, run_dir: str | os.PathLike, tag: str, *,
                   overrides: Mapping[str, Any] | None = None, force: bool = False) -> Path:
    """Run the trained bundle's ``inference.json`` on a predict-set manifest and write ``out_csv``
    (``.csv`` or ``.csv.gz``: gzip without a timestamp, so the same predictions give the same bytes).

    Skipped when ``out_csv`` exists (unless ``force``). The bundle's raw predictions go to
    ``<bundle_root>/output/predict_<tag>.csv``.
    """
    root, out, run = Path(bundle_root), Path(out_csv), Path(run_dir)
    if out.is_file() and not force:
        return out
    if not (root / "models" / "model.pt").is_file():
        raise FileNotFoundError(f"{root}: no trained model (models/model.pt): fine-tune it first")
    classes = json.loads((root / "models" / "classes.json").read_text())
    raw = root / "output" / f"predict_{tag}.csv"
    run_bundle(root, "inference.json", root,
               {**dict(overrides or {}), "manifest": str(manifest), "predictions_file": str(raw)},
               run, f"predict_{tag}", raw, copy=False, force=True)
    ids = read_manifest(manifest)["sop_uid"].astype(str).tolist()
    table = predictions_table(raw, id_name, classes, expected_ids=ids)
    buf = io.BytesIO()
    compression: Any = {"method": "gzip", "mtime": 0} if out.suffix == ".gz" else None
    table.to_csv(buf, index=False, float_format=f"%.{DECIMALS}f", compression=compression)
    atomic_write_bytes(out, buf.getvalue())
    logger.info("%s: %d predictions", out, len(table))
    return out
