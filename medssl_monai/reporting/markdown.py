"""Markdown pieces of the reports: tables."""

from __future__ import annotations

import pandas as pd

__all__ = ["label_efficiency_table", "md_table", "per_class_recall_table"]


def md_table(df: pd.DataFrame) -> str:
    """A data frame as a markdown table, floats to 3 decimals (``_none_`` when empty)."""
    if df.empty:
        return "_none_\n"
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in df.itertuples(index=False):
        out.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out) + "\n"


def label_efficiency_table(summary: pd.DataFrame) -> str:
    """The per-arm, per-fraction table: mean ± std with the seed count."""
    lines = ["| arm | labels | balanced accuracy | macro AUC | seeds |", "|---|---:|---:|---:|---:|"]
    for r in summary.itertuples(index=False):
        sd = lambda v: "" if pd.isna(v) else f" ± {v:.3f}"  # noqa: E731
        lines.append(f"| {r.arm} | {r.fraction:.0%} | {r.balanced_accuracy_mean:.3f}{sd(r.balanced_accuracy_std)} | "
                     f"{r.auc_macro_mean:.3f}{sd(r.auc_macro_std)} | {r.seeds} |")
    return "\n".join(lines)


def per_class_recall_table(results: pd.DataFrame, fraction: float) -> str:
    """Per-class recall (mean over seeds) of every arm at one label budget: what a selection strategy buys
    for the rare classes, which the averaged metrics hide. Columns are the results' ``recall_<class>``."""
    cols = [c for c in results.columns if c.startswith("recall_")]
    rows = results[(results["fraction"] - fraction).abs() < 1e-9]
    if not cols or rows.empty:
        return "_none_\n"
    g = rows.groupby("arm", sort=False)[cols]
    mean, count = g.mean(), g.count().max(axis=1)
    classes = [c.removeprefix("recall_") for c in cols]
    lines = ["| arm | " + " | ".join(classes) + " | seeds |", "|---|" + "---:|" * (len(cols) + 1)]
    for arm, r in mean.iterrows():
        lines.append(f"| {arm} | " + " | ".join("" if pd.isna(v) else f"{v:.2f}" for v in r) + f" | {count[arm]} |")
    return "\n".join(lines)
