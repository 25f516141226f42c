"""``medssl select``: which images to label first, from a pretrained backbone's embedding of the pool.

The embedding is computed the way the pretraining bundles' ``inference.json`` computes it (the same rows,
dataset, loader and backbone factories; :func:`embed_manifest`) and cached on disk, keyed by the checkpoint's
SHA-256 and the pool rows, so a study that tries several strategies and seeds embeds once. The selection
itself is :func:`medssl_monai.selection.select` (layer 0). What comes out (:func:`select_manifest`):

* ``worklist.csv``: the images to label, group by group in selection order, by their manifest keys
  (pseudonymised when the manifest is): shareable with the labelling team;
* ``worklist_uids.csv`` (mode 0600): the same rows with the source files' original Study/Series/SOP Instance
  UIDs, read through the private path map (:mod:`medssl_monai.data.dicom.originals`): for whoever holds it;
* ``manifest.csv``: a copy of the manifest with one ``labeled_<p>pct`` column per budget (nested), which the
  fine-tune bundle reads with ``label_fraction: p`` (:func:`medssl_monai.data.select_labelled`): the selected
  set trains with no new code path;
* ``selection.json``: what was selected how (strategy, level, seed, budgets, checkpoint checksum, seconds).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data.manifest import PATHMAP_PREFIX, pathmap_path, read_manifest, read_path_map, write_manifest
from ..data.splits import fraction_column
from ..selection import budget_counts, level_column, select
from ..utils.atomic import atomic_write_bytes, atomic_write_text
from ..utils.checksum import file_sha256

__all__ = ["SelectionResult", "embed_manifest", "file_sha256", "pool_mask", "row_keys", "select_manifest"]

logger = logging.getLogger(__name__)


def pool_mask(df: pd.DataFrame, split: str | None, split_col: str = "split") -> np.ndarray:
    """The unlabelled pool: rows of ``split`` (every row when ``split`` is empty or the manifest has no
    ``split_col``)."""
    if not split or split_col not in df.columns:
        return np.ones(len(df), dtype=bool)
    return (df[split_col].astype("string") == split).fillna(False).to_numpy(dtype=bool)


def row_keys(raw: pd.DataFrame) -> list[str]:
    """One key per manifest row as the manifest writes it (``pm:`` key or path, ``#<frame>`` for a frame row):
    pseudonymised wherever the manifest is."""
    frames = raw["frame_index"] if "frame_index" in raw.columns else pd.Series(pd.NA, index=raw.index)
    return [str(p) if pd.isna(f) else f"{p}#{int(f)}" for p, f in zip(raw["path"], frames)]


def _cache_file(cache_dir: Path, checkpoint_sha: str, raw: pd.DataFrame, keys: list[str],
                spec: Mapping[str, Any]) -> Path:
    ident = [c for c in ("sop_uid", "file_size", "file_mtime_ns") if c in raw.columns]
    rows = [keys, *(raw[c].astype("string").fillna("").tolist() for c in ident)]
    digest = hashlib.sha256(json.dumps({"spec": dict(spec), "rows": rows}, sort_keys=True).encode()).hexdigest()
    return cache_dir / f"embeddings-{checkpoint_sha[:12]}-{digest[:16]}.npz"


def embed_manifest(manifest: str | os.PathLike, checkpoint: str | os.PathLike, *, split: str | None = "train",
                   backbone: str = "resnet18", backbone_kwargs: Mapping[str, Any] | None = None, in_channels: int = 3,
                   image_size: int = 64, batch_size: int = 64, num_workers: int = 0, device: str | None = None,
                   cache_dir: str | os.PathLike | None = None) -> tuple[list[str], np.ndarray]:
    """Backbone features of the pool's images: ``(row keys, (N, D) float32)``, in manifest order.

    The rows are the manifest's ``split`` rows (:func:`pool_mask`), keyed by :func:`row_keys`; images that
    cannot be read are left out (and logged as in any bundle run). ``checkpoint`` is a backbone's weights (a
    pretraining bundle's ``models/model.pt``; any checkpoint :func:`~medssl_monai.networks.load_backbone_weights`
    reads); ``backbone``/``in_channels``/``image_size`` must be the ones it was trained with (the pretraining
    bundles' defaults: resnet18, 3, 64). With ``cache_dir`` the result is read from / written to
    ``embeddings-<checkpoint sha>-<rows hash>.npz`` there.
    """
    from ..bundle.embed import backbone_features

    manifest, checkpoint = Path(manifest), Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
    raw = read_manifest(manifest, resolve_paths=False)
    mask = pool_mask(raw, split)
    if not mask.any():
        raise ValueError(f"{manifest}: no rows in split {split!r} to select from")
    raw = raw[mask].reset_index(drop=True)
    keys = row_keys(raw)
    spec = {"backbone": backbone, "backbone_kwargs": dict(backbone_kwargs or {}), "in_channels": int(in_channels),
            "image_size": int(image_size)}
    sha = file_sha256(checkpoint)
    cached = _cache_file(Path(cache_dir), sha, raw, keys, spec) if cache_dir else None
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as data:
            logger.info("embeddings of %d images read from the cache %s", len(data["keys"]), cached.name)
            return [str(k) for k in data["keys"]], data["features"].astype(np.float32)
    rows = read_manifest(manifest)[mask].reset_index(drop=True)
    positions, features = backbone_features(rows, checkpoint, batch_size=batch_size, num_workers=num_workers,
                                            device=device, **spec)
    if not positions:
        raise ValueError(f"{manifest}: none of the {len(rows)} pool images could be read")
    out_keys = [keys[i] for i in positions]
    if cached is not None:
        buf = io.BytesIO()
        np.savez(buf, keys=np.asarray(out_keys), features=features)
        atomic_write_bytes(cached, buf.getvalue(), mode=0o600)
    return out_keys, features


@dataclass(frozen=True)
class SelectionResult:
    """What :func:`select_manifest` wrote, and the order it chose."""

    out_dir: Path
    worklist: Path
    manifest: Path
    order: list[str]  # group keys, selection order (the largest budget)
    budgets: list[dict[str, Any]] = field(default_factory=list)  # count, column, label_fraction per budget
    worklist_uids: Path | None = None


def _label_fraction(count: int, n_groups: int, fraction: float | None) -> tuple[float, str]:
    """The ``label_fraction`` the fine-tune bundle is given, and the column it then reads."""
    value = float(fraction) if fraction is not None else float(f"{count / n_groups:.6g}")
    return value, fraction_column(value)


def _strata(raw: pd.DataFrame, columns: Sequence[str]) -> list[str] | None:
    if not columns:
        return None
    missing = [c for c in columns if c not in raw.columns]
    if missing:
        raise ValueError(f"stratify: column(s) {missing} not in the manifest")
    values = raw[list(columns)].astype("string").fillna("<missing>")
    return values.agg("|".join, axis=1).tolist()


def _copy_manifest(manifest: Path, raw_all: pd.DataFrame, out: Path) -> Path:
    """``raw_all`` written to ``out/manifest.csv`` with paths that still resolve there: relative paths made
    absolute; a pseudonymised manifest's private path map copied beside it (absolute, mode 0600)."""
    base = manifest.parent.resolve()
    df = raw_all.copy()
    keyed = df["path"].str.startswith(PATHMAP_PREFIX).fillna(False)
    df["path"] = pd.array([p if k or os.path.isabs(p) else str(base / p) for p, k in zip(df["path"], keyed)],
                          dtype="string")
    target = out / "manifest.csv"
    write_manifest(df, target)
    if keyed.any():
        pm = read_path_map(pathmap_path(manifest))
        table = pd.DataFrame({"key": pm.index, "path": [p if os.path.isabs(p) else str(base / p) for p in pm]})
        atomic_write_text(pathmap_path(target), table.to_csv(index=False), mode=0o600)
    return target


def select_manifest(manifest: str | os.PathLike, checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                    budgets: Sequence[int] = (), fractions: Sequence[float] = (), level: str = "patient",
                    strategy: str = "typiclust", seed: int = 0, stratify: Sequence[str] = (),
                    split: str | None = "train", cache_dir: str | os.PathLike | None = None,
                    embeddings: tuple[list[str], np.ndarray] | None = None, **embed_kwargs: Any) -> SelectionResult:
    """Select the groups to label at ``level`` for each budget (nested), and write the worklist, the
    manifest copy with its ``labeled_<p>pct`` columns and ``selection.json`` into ``out_dir``.

    ``budgets`` (numbers of groups) or ``fractions`` (of the pool's groups), several for nested selections;
    ``embeddings``: precomputed :func:`embed_manifest` output (else computed, cached in ``cache_dir``, default
    ``out_dir/embedding_cache``); ``embed_kwargs`` go to :func:`embed_manifest`.
    """
    t0 = time.perf_counter()
    manifest, out = Path(manifest), Path(out_dir)
    key_col = level_column(level)
    raw_all = read_manifest(manifest, resolve_paths=False)
    mask = pool_mask(raw_all, split)
    pool = raw_all[mask]
    if pool.empty:
        raise ValueError(f"{manifest}: no rows in split {split!r} to select from")
    if pool[key_col].isna().any():
        raise ValueError(f"{manifest}: {int(pool[key_col].isna().sum())} pool row(s) have no {key_col}: cannot "
                         f"select at level {level!r}")
    strata_all = _strata(pool, list(stratify))
    out.mkdir(parents=True, exist_ok=True)
    if embeddings is None:
        embeddings = embed_manifest(manifest, checkpoint, split=split,
                                    cache_dir=cache_dir if cache_dir is not None else out / "embedding_cache",
                                    **embed_kwargs)
    keys, features = embeddings
    position = {k: i for i, k in enumerate(row_keys(pool))}
    unknown = [k for k in keys if k not in position]
    if unknown:
        raise ValueError(f"{len(unknown)} embedded row(s) are not pool rows of {manifest}: embeddings of another "
                         "manifest or split?")
    rows = [position[k] for k in keys]
    groups = pool[key_col].iloc[rows].astype(str).tolist()
    n_groups = pool[key_col].nunique()
    usable = len(set(groups))
    if usable < n_groups:
        logger.warning("%d of %d groups have no readable image and cannot be selected", n_groups - usable, n_groups)
    counts = budget_counts(n_groups, budgets=list(budgets), fractions=list(fractions))
    if max(counts) > usable:
        raise ValueError(f"budget {max(counts)} exceeds the {usable} groups with readable images")
    order = select(features, groups, budget=max(counts), strategy=strategy, seed=seed,
                   stratify=[strata_all[i] for i in rows] if strata_all is not None else None)
    order = [str(g) for g in order]

    specs = []
    for i, c in enumerate(counts):
        value, column = _label_fraction(c, n_groups, fractions[i] if fractions else None)
        specs.append({"count": c, "fraction_of_groups": c / n_groups, "label_fraction": value, "column": column})
    columns = [s["column"] for s in specs]
    if len(set(columns)) != len(columns):
        raise ValueError(f"budgets {counts} give the same split column twice ({columns}): give distinct budgets")
    rank = {g: i + 1 for i, g in enumerate(order)}
    in_pool_key = raw_all[key_col].astype("string")
    for s in specs:
        chosen = set(order[: s["count"]])
        if s["column"] in raw_all.columns:
            logger.warning("column %s of the manifest is replaced by the selection in the copy", s["column"])
        raw_all[s["column"]] = mask & in_pool_key.isin(chosen).fillna(False).to_numpy(dtype=bool)
    copy = _copy_manifest(manifest, raw_all, out)

    sel = raw_all[mask & in_pool_key.isin(set(order)).fillna(False).to_numpy(dtype=bool)].copy()
    sel.insert(0, "rank", sel[key_col].astype(str).map(rank).astype(int))
    sel.insert(1, "group", sel[key_col].astype("string"))
    sel.insert(2, "first_budget", [next(s["column"] for s in sorted(specs, key=lambda s: s["count"])
                                        if r <= s["count"]) for r in sel["rank"]])
    keep = ["rank", "group", "first_budget", "path", "patient_id", "study_uid", "series_uid", "sop_uid",
            "frame_index", "modality", "body_part"]
    worklist = sel.sort_values(["rank"], kind="stable")[[c for c in keep if c in sel.columns]]
    if worklist["frame_index"].isna().all():
        worklist = worklist.drop(columns="frame_index")
    atomic_write_text(out / "worklist.csv", worklist.to_csv(index=False))

    uids_file = _write_worklist_uids(manifest, worklist, out)
    meta = {"strategy": strategy, "level": level, "seed": seed, "stratify": list(stratify), "split": split,
            "pool_groups": int(n_groups), "pool_images": int(mask.sum()), "embedded_images": len(keys),
            "embedding_dim": int(features.shape[1]), "budgets": specs, "manifest": manifest.name,
            "checkpoint_sha256": file_sha256(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
            "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_text(out / "selection.json", json.dumps(meta, indent=1) + "\n")
    logger.info("selected %d of %d %s groups (%s, seed %d) -> %s", max(counts), n_groups, level, strategy, seed, out)
    return SelectionResult(out, out / "worklist.csv", copy, order, specs, uids_file)


def _write_worklist_uids(manifest: Path, worklist: pd.DataFrame, out: Path) -> Path | None:
    """``worklist_uids.csv`` (0600): the worklist with the original UIDs, when the images can be reached
    (a plain manifest, or a pseudonymised one with its path map) and are DICOM."""
    from ..data.dicom.originals import original_uids

    keyed = worklist["path"].str.startswith(PATHMAP_PREFIX).fillna(False)
    if keyed.any() and not pathmap_path(manifest).is_file():
        logger.warning("no path map beside the manifest: the worklist has pseudonymised keys only")
        return None
    uids = original_uids(manifest, worklist["sop_uid"].astype(str).tolist())
    if uids[["original_study_uid", "original_sop_uid"]].isna().all().all():
        return None  # no DICOM sources (an image table): the manifest's ids are all there is
    table = worklist.merge(uids, on="sop_uid", how="left")
    target = out / "worklist_uids.csv"
    atomic_write_text(target, table.to_csv(index=False), mode=0o600)
    return target
