"""Table adapter on HAM10000, grouping, patient-level splits, leakage check and nested label fractions."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medssl_monai.data import (
    LeakageError,
    MultiInstanceIndex,
    check_no_leakage,
    nested_label_fractions,
    read_manifest,
    split_groups,
    table_to_manifest,
)
from medssl_monai.data.manifest import write_manifest


@pytest.fixture(scope="module")
def ham_manifest() -> pd.DataFrame:
    from conftest import require_data

    root = require_data("ham10000")
    return table_to_manifest(root / "metadata.csv", group_col="lesion_id", label_col="dx", instance_col="image_id")


def test_ham10000_groups(ham_manifest: pd.DataFrame) -> None:
    from conftest import require_data

    raw = pd.read_csv(require_data("ham10000") / "metadata.csv")
    per_lesion = raw.groupby("lesion_id").size()  # independent count straight from the CSV
    idx = MultiInstanceIndex(ham_manifest)
    assert len(idx) == per_lesion.size == 5977  # the data README's numbers
    assert len(idx.multi_image_groups()) == int((per_lesion >= 2).sum()) == 1580
    assert len(ham_manifest) == len(raw) == 8035
    assert idx.summary()["max_images_per_group"] == per_lesion.max()
    some = per_lesion[per_lesion == per_lesion.max()].index[0]
    assert set(idx.images(some)["sop_uid"]) == set(raw.loc[raw["lesion_id"] == some, "image_id"])
    assert set(ham_manifest["label"]) == set(raw["dx"])
    assert ham_manifest["path"].map(lambda p: Path(p).is_absolute()).all()
    # extra columns survive for subgroup analysis later
    assert {"split", "sex", "age", "localization", "labeled_10pct", "mini"} <= set(ham_manifest.columns)
    assert ham_manifest["mini"].dtype == bool and ham_manifest["mini"].sum() == raw["mini"].sum()


def test_ham10000_shipped_split_does_not_leak(ham_manifest: pd.DataFrame) -> None:
    check_no_leakage(ham_manifest, "patient_id", "split")


def test_table_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    pd.DataFrame({"path": ["a.png", "missing.png"], "g": ["1", "2"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        table_to_manifest(tmp_path / "t.csv", group_col="g", label_col=None)
    with pytest.raises(ValueError, match="lesion_id"):
        table_to_manifest(tmp_path / "t.csv", group_col="lesion_id", label_col=None)


def test_split_groups_leak_free_stratified_deterministic(ham_manifest: pd.DataFrame) -> None:
    df = ham_manifest.drop(columns=["split"])
    a = split_groups(df, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    b = split_groups(df, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    c = split_groups(df, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=4)
    assert a["split"].equals(b["split"]) and not a["split"].equals(c["split"])
    check_no_leakage(a)
    groups = a.groupby("patient_id")["split"].first()
    assert abs((groups == "train").mean() - 0.7) < 0.01
    # stratified: every class's share of groups in val is close to its share overall
    glabel = MultiInstanceIndex(a).group_labels()
    overall = glabel.value_counts(normalize=True)
    in_val = glabel[groups[groups == "val"].index].value_counts(normalize=True)
    for cls, share in overall.items():
        assert abs(in_val.get(cls, 0) - share) < 0.02, cls


def test_leakage_check_fails_loudly() -> None:
    df = pd.DataFrame({"patient_id": ["a", "a", "b"], "split": ["train", "val", "train"]})
    with pytest.raises(LeakageError, match="1 patient_id group"):
        check_no_leakage(df)


def test_nested_fractions(ham_manifest: pd.DataFrame) -> None:
    df = nested_label_fractions(ham_manifest, (0.01, 0.1, 0.2, 1.0), seed=0)
    train = df["split"] == "train"
    cols = ["labeled_1pct", "labeled_10pct", "labeled_20pct", "labeled_100pct"]
    for small, big in itertools.pairwise(cols):
        assert (df[small] <= df[big]).all(), f"{small} not inside {big}"
    assert df.loc[train, "labeled_100pct"].all() and not df.loc[~train, cols].any().any()
    n_train_groups = df.loc[train, "patient_id"].nunique()
    for col, f in zip(cols, (0.01, 0.1, 0.2, 1.0)):
        chosen = df.loc[df[col], "patient_id"].nunique()
        assert abs(chosen - f * n_train_groups) <= 7  # per-class rounding, at most one group per class
        # whole groups: a chosen lesion has all its training images labelled
        assert df.loc[df["patient_id"].isin(df.loc[df[col], "patient_id"]) & train, col].all()
    assert set(df.loc[df["labeled_1pct"], "label"]) == set(df.loc[train, "label"])  # every class at 1%
    again = nested_label_fractions(ham_manifest, (0.01, 0.1, 0.2, 1.0), seed=0)
    assert df["labeled_10pct"].equals(again["labeled_10pct"])


def test_split_cli_on_manifest(tmp_path: Path, ham_manifest: pd.DataFrame) -> None:
    from medssl_monai.cli import main

    mini = ham_manifest[ham_manifest["mini"]].drop(columns=["split"])
    write_manifest(mini, tmp_path / "mini.csv")
    assert main(["split", str(tmp_path / "mini.csv"), "--out", str(tmp_path / "s.csv"), "--seed", "1"]) == 0
    s = read_manifest(tmp_path / "s.csv")
    check_no_leakage(s)
    assert set(s["split"]) == {"train", "val", "test"}
    assert "labeled_10pct" in s.columns and s["labeled_10pct"].sum() > 0
    assert np.array_equal(s["path"].to_numpy(), read_manifest(tmp_path / "mini.csv")["path"].to_numpy())


def test_table_to_manifest_of_a_filtered_table_keeps_rows_aligned(tmp_path):
    """A DataFrame filtered before the call (index 2, 5, ...) once gave misaligned extra columns and empty paths."""
    import pandas as pd

    from medssl_monai.data import table_to_manifest

    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(b"")
    table = pd.DataFrame({"path": [f"{i}.png" for i in range(6)], "patient_id": [f"p{i}" for i in range(6)],
                          "label": list("abcabc"), "extra": range(6)})
    kept = table[table["extra"] % 2 == 1]
    out = table_to_manifest(kept, root=tmp_path, check_files=False)
    assert len(out) == 3 and out["path"].notna().all()
    assert out["patient_id"].tolist() == ["p1", "p3", "p5"] and out["extra"].tolist() == [1, 3, 5]
