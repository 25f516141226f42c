"""Patient-level splits, a leakage check, and nested label fractions.

Splitting images instead of patients lets near-duplicate images of one patient sit on both sides and
inflates every validation number; all splits here assign whole groups, and ``check_no_leakage`` makes a
crossing group an error, not a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .grouping import LEVELS

__all__ = [
    "LeakageError",
    "check_no_leakage",
    "fraction_column",
    "nested_label_fractions",
    "select_labelled",
    "split_groups",
]

logger = logging.getLogger(__name__)


class LeakageError(ValueError):
    """A group (patient) appears in more than one split."""


def _group_table(df: pd.DataFrame, group_col: str, label_col: str | None) -> pd.DataFrame:
    groups = pd.DataFrame({group_col: pd.unique(df[group_col])})
    if label_col and label_col in df.columns and df[label_col].notna().any():
        lab = df[[group_col, label_col]].dropna()
        counts = lab.groupby([group_col, label_col]).size().reset_index(name="n")
        counts = counts.sort_values([group_col, "n", label_col], ascending=[True, False, True])
        major = counts.drop_duplicates(group_col).set_index(group_col)[label_col]
        groups["stratum"] = groups[group_col].map(major).fillna("<unlabelled>").astype(str)
    else:
        groups["stratum"] = "<all>"
    return groups


def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_groups(
    df: pd.DataFrame,
    fractions: Mapping[str, float] | None = None,
    *,
    group_col: str = "patient_id",
    label_col: str | None = "label",
    seed: int = 0,
    split_col: str = "split",
) -> pd.DataFrame:
    """Assign every group to a split, stratified by the group's majority label; deterministic in ``seed``.

    Returns a copy of ``df`` with ``split_col`` set for every row (all rows of a group share one split).
    """
    fractions = dict(fractions or {"train": 0.7, "val": 0.15, "test": 0.15})
    total = sum(fractions.values())
    if not np.isclose(total, 1.0) or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    if group_col in LEVELS:
        group_col = LEVELS[group_col]
    groups = _group_table(df, group_col, label_col)
    rng = np.random.default_rng(seed)
    names = list(fractions)
    assignment: dict[object, str] = {}
    for stratum in sorted(groups["stratum"].unique()):
        members = groups.loc[groups["stratum"] == stratum, group_col].to_numpy()
        members = members[rng.permutation(len(members))]
        counts = _largest_remainder(len(members), [fractions[n] for n in names])
        start = 0
        for name, c in zip(names, counts):
            for g in members[start : start + c]:
                assignment[g] = name
            start += c
    out = df.copy()
    out[split_col] = out[group_col].map(assignment).astype("string")
    check_no_leakage(out, group_col=group_col, split_col=split_col)
    return out


def check_no_leakage(df: pd.DataFrame, group_col: str = "patient_id", split_col: str = "split") -> None:
    """Raise ``LeakageError`` naming the groups that appear in more than one split."""
    if group_col in LEVELS:
        group_col = LEVELS[group_col]
    per_group = df.dropna(subset=[split_col]).groupby(group_col)[split_col].nunique()
    crossing = per_group[per_group > 1]
    if len(crossing):
        examples = ", ".join(map(str, crossing.index[:5]))
        raise LeakageError(
            f"{len(crossing)} {group_col} group(s) appear in more than one split (e.g. {examples}): "
            "images of one patient must stay on one side")


def fraction_column(fraction: float) -> str:
    """0.1 -> ``labeled_10pct``; 0.015 -> ``labeled_1.5pct``."""
    pct = fraction * 100
    return f"labeled_{round(pct)}pct" if abs(pct - round(pct)) < 1e-9 else f"labeled_{pct:g}pct"


def nested_label_fractions(
    df: pd.DataFrame,
    fractions: Sequence[float] = (0.01, 0.1, 0.2, 1.0),
    *,
    group_col: str = "patient_id",
    label_col: str | None = "label",
    split_col: str | None = "split",
    train_value: str = "train",
    seed: int = 0,
) -> pd.DataFrame:
    """Mark nested subsets of the training groups as labelled: 1% inside 10% inside 20% inside 100%.

    Within each label stratum the groups are shuffled once and every fraction takes a prefix of that order,
    which makes the subsets nested by construction; each stratum keeps at least one group per fraction
    where it has any, so every class is present even at 1%. Adds one boolean column per fraction.
    """
    if group_col in LEVELS:
        group_col = LEVELS[group_col]
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"label fractions must be in (0, 1], got {list(fractions)}")
    train = df if split_col is None else df[df[split_col] == train_value]
    if train.empty:
        raise ValueError(f"no training rows ({split_col} == {train_value!r}) to draw label fractions from")
    groups = _group_table(train, group_col, label_col)
    rng = np.random.default_rng(seed)
    order: dict[str, np.ndarray] = {}
    for stratum in sorted(groups["stratum"].unique()):
        members = groups.loc[groups["stratum"] == stratum, group_col].to_numpy()
        order[stratum] = members[rng.permutation(len(members))]
    out = df.copy()
    for f in sorted(fractions):
        chosen = set()
        for members in order.values():
            n = len(members)
            k = n if f >= 1 else min(n, max(1, round(f * n)))
            chosen.update(members[:k])
        out[fraction_column(f)] = out[group_col].isin(chosen)
        if split_col is not None:
            out[fraction_column(f)] &= (out[split_col] == train_value).fillna(False)
    return out


# ------------------------------------------------------------------- label fractions for fine-tuning
def _as_bool(s: pd.Series) -> pd.Series:
    """Flag column as booleans; a CSV read as text gives ``"True"``/``"False"`` strings."""
    if pd.api.types.is_bool_dtype(s):
        return s.fillna(False).astype(bool)
    if pd.api.types.is_numeric_dtype(s):
        return s.fillna(0).astype(float) != 0
    return s.astype("string").str.strip().str.lower().isin(["true", "1", "yes", "y", "t"]).fillna(False)


def select_labelled(
    df: pd.DataFrame,
    label_fraction: float,
    split_col: str = "split",
    train_value: str = "train",
    seed: int = 0,
    *,
    label_col: str = "label",
    group_col: str = "patient_id",
) -> pd.DataFrame:
    """The labelled training rows for ``label_fraction`` (a copy, original index kept).

    * ``1.0``: every training row;
    * a shipped flag column ``labeled_<p>pct`` (:func:`fraction_column`, e.g. HAM10000's
      ``labeled_10pct``) is used as it is, so published subsets are reproduced exactly;
    * otherwise groups are drawn with :func:`nested_label_fractions` (whole patients,
      stratified, nested across fractions for a given ``seed``) among the labelled training rows.

    Rows without a label are dropped (and their number logged): they can serve pretraining, not fine-tuning.
    """
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}.")
    for col in (split_col, label_col):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not found; columns are {list(df.columns)}.")
    train = df[(df[split_col].astype("string") == train_value).fillna(False)]
    if train.empty:
        raise ValueError(f"no training rows ({split_col} == {train_value!r}).")
    column = fraction_column(label_fraction)
    if label_fraction >= 1.0:
        chosen = train
    elif column in df.columns:
        chosen = train[_as_bool(train[column])]
        logger.info("label fraction %g: using the shipped column %r", label_fraction, column)
    else:
        labelled = train[train[label_col].notna()]
        if labelled.empty:
            raise ValueError("no labelled training rows.")
        marked = nested_label_fractions(labelled, (label_fraction,), group_col=group_col, label_col=label_col,
                                        split_col=None, seed=seed)
        chosen = labelled[marked[column].to_numpy(dtype=bool)]
        logger.info("label fraction %g: drew %d groups (seed %d)", label_fraction,
                    chosen[group_col].nunique(), seed)
    missing = chosen[label_col].isna()
    if missing.any():
        logger.info("select_labelled: dropped %d training row(s) without a label", int(missing.sum()))
    return chosen[~missing].copy()
