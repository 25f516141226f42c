"""The label-efficiency study's summary: ``results.md`` (mean ± std with seed counts) and its curve."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..experiments.label_efficiency import summarize
from ..experiments.runner import bundle_minutes
from ..experiments.study import run_study
from ..utils.atomic import atomic_write_text
from .markdown import label_efficiency_table, per_class_recall_table
from .plots import plot_label_efficiency

__all__ = ["run_study_and_summarize", "write_study_summary"]


def write_study_summary(results: pd.DataFrame, run: Path, seconds: float, eval_split: str) -> Path:
    """``results.md`` (table with seed counts and spread) and ``label_efficiency.png``."""
    summary = summarize(results)
    plot_label_efficiency(summary, run / "label_efficiency.png", eval_split)
    text = (f"# Label-efficiency study\n\nWall time of the last invocation: {seconds / 60:.1f} min; bundle runs: "
            f"{bundle_minutes(run):.1f} min in total (as each run recorded it). Metrics on the `{eval_split}` "
            "split, mean ± standard deviation over seeds.\n\n" + label_efficiency_table(summary)
            + "\n\n![curve](label_efficiency.png)\n" + _recall_section(results))
    out = run / "results.md"
    atomic_write_text(out, text)
    return out


def _recall_section(results: pd.DataFrame) -> str:
    """Per-class recall at the 5% budget (or the middle budget below 100%) when the study recorded it."""
    budgets = sorted(f for f in results["fraction"].unique() if f < 1)
    if not budgets or not any(c.startswith("recall_") for c in results.columns):
        return ""
    at = 0.05 if any(abs(f - 0.05) < 1e-9 for f in budgets) else budgets[len(budgets) // 2]
    return (f"\n## Per-class recall at {at:.0%} of the labels (`val`, mean over seeds)\n\n"
            + per_class_recall_table(results, at) + "\n")


def run_study_and_summarize(config: str | os.PathLike | Mapping[str, Any], run_dir: str | os.PathLike | None = None,
                            force: bool = False, finished_only: bool = False) -> pd.DataFrame:
    """``medssl study``: :func:`~medssl_monai.experiments.study.run_study`, then :func:`write_study_summary`."""
    return run_study(config, run_dir, force, summary=write_study_summary, finished_only=finished_only)
