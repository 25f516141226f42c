"""Markdown pieces of the reports: tables."""

from __future__ import annotations

import pandas as pd

__all__ = ["label_efficiency_table", "md_table"]


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
