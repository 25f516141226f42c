"""The blind-set predictions committed under docs/results/blind/ are what the held-out score is computed from
outside the project: every file must hold every blind image once, one probability per HAM10000 class,
rounded to 4 decimals, summing to 1. A truncated or hand-edited file would be scored silently wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
FILES = sorted((REPO / "docs" / "results" / "blind").glob("*/*.csv*"))
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def test_blind_predictions_are_committed() -> None:
    assert FILES, "no blind-set predictions under docs/results/blind/"


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_blind_csv_has_every_image_once_and_probabilities(path: Path) -> None:
    from conftest import require_data

    ids = pd.read_csv(require_data("blind", "ham10000_test", "images.csv"), dtype=str)["blind_id"]
    df = pd.read_csv(path, dtype={"blind_id": str})
    assert list(df.columns) == ["blind_id"] + [f"prob_{c}" for c in CLASSES]
    assert df["blind_id"].is_unique and set(df["blind_id"]) == set(ids)
    p = df[[f"prob_{c}" for c in CLASSES]].to_numpy(float)
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    assert np.allclose(np.round(p, 4), p, atol=1e-12)  # 4 decimals
    assert np.abs(p.sum(axis=1) - 1).max() <= 7 * 0.00005 + 1e-9  # rounding of 7 values, no more
