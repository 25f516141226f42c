"""Issue 19 item 5: one image is one row. Copies of an instance and one UID under two patients are reported
at index time; bundles refuse manifests that repeat an image or put a patient in two splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from medssl_monai.bundle.data import load_rows
from medssl_monai.data import index_tree
from medssl_monai.data.duplicates import DuplicateInstanceError
from medssl_monai.data.manifest import errors_path, read_manifest, write_manifest
from medssl_monai.data.splits import LeakageError
from medssl_monai.sample_data import synthetic_image, write_dicom


def _dcm(path: Path, pid: str, i: int) -> Path:
    return write_dicom(path, synthetic_image(i % 3, 1, i, 32), patient_id=pid, study_uid=f"1.2.3.{i}",
                       series_uid=f"1.2.3.{i}.1", sop_uid=f"1.2.3.{i}.1.{i}", instance_number=i + 1)


def _errors(out: Path) -> pd.DataFrame:
    return pd.read_csv(errors_path(out), dtype=str)


def test_copies_of_an_instance_keep_the_first_path(tmp_path: Path) -> None:
    root = tmp_path / "export"
    for i in range(3):
        _dcm(root / f"a/{i}.dcm", f"P{i}", i)
    shutil.copy(root / "a/1.dcm", root / "b_copy.dcm")
    shutil.copy(root / "a/1.dcm", root / "0_copy.dcm")  # sorts first: this copy is the one kept
    out = tmp_path / "manifest.csv"
    result = index_tree(root, out)
    m = read_manifest(out)
    assert len(m) == 3 and m["sop_uid"].is_unique and m["patient_id"].nunique() == 3
    kept = m.loc[m["sop_uid"] == "1.2.3.1.1.1", "path"].tolist()
    assert kept == [str(root / "0_copy.dcm")]
    err = _errors(out)
    dup = err[err["code"] == "duplicate_instance"]
    assert sorted(dup["path"]) == sorted([str(root / "a/1.dcm"), str(root / "b_copy.dcm")])
    assert result.stats["skipped_by_reason"]["duplicate_instance"] == 2
    # the kept copy goes: the next index keeps the next copy by path instead
    (root / "0_copy.dcm").unlink()
    index_tree(root, out)
    m = read_manifest(out)
    assert m.loc[m["sop_uid"] == "1.2.3.1.1.1", "path"].tolist() == [str(root / "a/1.dcm")]
    assert _errors(out)["path"].tolist() == [str(root / "b_copy.dcm")]


def test_one_uid_under_two_patients_is_a_conflict_and_kept_nowhere(tmp_path: Path) -> None:
    root = tmp_path / "export"
    for i in range(3):
        _dcm(root / f"{i}.dcm", f"P{i}", i)
    ds = pydicom.dcmread(root / "2.dcm")
    ds.PatientID = "SOMEONE_ELSE"
    ds.save_as(root / "2_reexport.dcm")
    out = tmp_path / "manifest.csv"
    result = index_tree(root, out)
    m = read_manifest(out)
    assert sorted(m["patient_id"]) == ["P0", "P1"]  # not 4 patients, and the pixels are in neither
    err = _errors(out)
    assert sorted(err.loc[err["code"] == "uid_conflict", "path"]) == [str(root / "2.dcm"), str(root / "2_reexport.dcm")]
    assert result.stats["skipped_by_reason"] == {"uid_conflict": 2}
    assert "SOMEONE_ELSE" not in errors_path(out).read_text() and "P2" not in errors_path(out).read_text()


def _manifest(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "m.csv"
    write_manifest(pd.DataFrame(rows), path)
    return path


def _rows(n: int = 6) -> list[dict]:
    return [{"path": f"/x/{i}.png", "patient_id": f"p{i}", "study_uid": f"s{i}", "series_uid": f"s{i}",
             "sop_uid": f"u{i}", "label": "a" if i % 2 else "b", "split": ["train", "val", "test"][i % 3],
             "source": "image"} for i in range(n)]


def test_a_manifest_with_every_row_twice_is_refused_with_counts(tmp_path: Path) -> None:
    rows = _rows()
    path = _manifest(tmp_path, rows + rows)
    with pytest.raises(DuplicateInstanceError, match=r"6 file\(s\) on 12 rows; 6 SOP Instance UID\(s\) on 12 rows"):
        load_rows(manifest=path, split=["train", "val"])
    assert len(load_rows(manifest=_manifest(tmp_path, rows), split=["train", "val"])) == 4


def test_the_same_uid_in_two_files_is_refused(tmp_path: Path) -> None:
    rows = _rows()
    rows[5] = {**rows[5], "sop_uid": "u0"}  # another file, the same instance
    with pytest.raises(DuplicateInstanceError, match=r"1 SOP Instance UID\(s\) on 2 rows"):
        load_rows(manifest=_manifest(tmp_path, rows), split="test")


def test_train_patients_in_test_are_refused_by_every_phase(tmp_path: Path) -> None:
    rows = _rows()
    extra = [{**rows[0], "path": "/x/0b.png", "sop_uid": "u0b", "split": "test"},
             {**rows[3], "path": "/x/3b.png", "sop_uid": "u3b", "split": "test"}]  # train patients p0, p3
    path = _manifest(tmp_path, rows + extra)
    for split in (["train", "val"], "test", "train"):  # fine-tune, evaluation, pretraining
        with pytest.raises(LeakageError, match=r"2 patient\(s\) appear in more than one split \(test\+train: 2\)"):
            load_rows(manifest=path, split=split)
