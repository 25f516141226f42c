"""The level that gets labelled (patient, study, series or image) and one embedding per group.

A radiologist labels a patient's (or a study's) images together, so the selection chooses groups, not
images: the images of one group are pooled into one embedding (the mean of their L2-normalised features,
normalised again: the contrastive features live on the sphere) and selected or left out together.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import pandas as pd

__all__ = ["LEVEL_COLUMNS", "aggregate", "group_modes", "level_column", "normalize_rows"]

#: selection level -> the manifest column that keys its groups (``image``: the instance, all its frames)
LEVEL_COLUMNS = {"patient": "patient_id", "study": "study_uid", "series": "series_uid", "image": "sop_uid"}


def level_column(level: str) -> str:
    """``patient`` -> ``patient_id``; an unknown level is one line naming the known ones."""
    if level not in LEVEL_COLUMNS:
        raise ValueError(f"unknown selection level {level!r}: use one of {list(LEVEL_COLUMNS)}")
    return LEVEL_COLUMNS[level]


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _codes(groups: Sequence[Hashable]) -> tuple[list[Hashable], np.ndarray]:
    """Group keys in first-appearance order and each row's position among them."""
    index: dict[Hashable, int] = {}
    codes = np.fromiter((index.setdefault(g, len(index)) for g in groups), dtype=np.int64, count=len(groups))
    return list(index), codes


def aggregate(embeddings: np.ndarray, groups: Sequence[Hashable] | None = None, normalize: bool = True
              ) -> tuple[list[Hashable], np.ndarray]:
    """One embedding per group: ``(keys in first-appearance order, (G, D) array)``.

    ``groups`` gives each row's group key (``None``: every row is its own group, keyed by its position).
    With ``normalize`` the rows are L2-normalised before the mean and the means after it.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings hold NaN or infinite values")
    if groups is None:
        groups = list(range(len(x)))
    if len(groups) != len(x):
        raise ValueError(f"{len(groups)} group keys for {len(x)} embeddings")
    if normalize:
        x = normalize_rows(x)
    keys, codes = _codes(list(groups))
    if len(keys) == len(x):  # one row per group: nothing to pool
        means = x[np.argsort(codes)]
    else:  # sums of the rows sorted by group (np.add.at is slow)
        by_group = np.argsort(codes, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(codes[by_group]) != 0])
        sums = np.add.reduceat(x[by_group].astype(np.float64), starts, axis=0)
        means = (sums / np.bincount(codes, minlength=len(keys))[:, None]).astype(np.float32)
    return keys, normalize_rows(means) if normalize else means


def group_modes(values: Sequence[Hashable], groups: Sequence[Hashable], keys: Sequence[Hashable]) -> list[str]:
    """Each group's most frequent value (ties: the smallest as text): a patient seen on CT and MR takes the
    modality of most of its images. Missing values count as ``"<missing>"``."""
    counts: dict[Hashable, dict[str, int]] = {}
    for g, v in zip(groups, values):
        text = "<missing>" if pd.isna(v) else str(v)
        counts.setdefault(g, {}).setdefault(text, 0)
        counts[g][text] += 1
    return [min(counts[k].items(), key=lambda kv: (-kv[1], kv[0]))[0] for k in keys]
