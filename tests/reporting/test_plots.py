"""The label-efficiency figure reads in percent of labels."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medssl_monai.experiments.label_efficiency import summarize
from medssl_monai.reporting.plots import plot_label_efficiency


def test_label_efficiency_axis_reads_in_percent(tmp_path: Path) -> None:
    results = pd.DataFrame([{"arm": arm, "fraction": f, "seed": s, "balanced_accuracy": 0.5 + f / 4 + s / 100,
                             "auc_macro": 0.6 + f / 4} for arm in ("pretrained", "random") for f in (0.1, 0.2, 1.0)
                            for s in (0, 1)])
    summary = summarize(results)
    assert summary["seeds"].tolist() == [2] * 6
    ticks = plot_label_efficiency(summary, tmp_path / "le.png", "val")
    assert ticks == ["10%", "20%", "100%"]
    assert (tmp_path / "le.png").stat().st_size > 5000
