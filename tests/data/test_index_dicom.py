"""Indexing real DICOM trees: exact counts against the truth table, bad files, workers, incremental mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from medssl_monai.data import MultiInstanceIndex, index_tree, read_manifest
from medssl_monai.data.manifest import errors_path
from medssl_monai.sample_data import synthetic_image, write_dicom

TRUTH_COLUMNS = {"PatientID": "patient_id", "StudyInstanceUID": "study_uid", "SeriesInstanceUID": "series_uid"}


def _truth(dicom_data: Path) -> pd.DataFrame:
    truth = pd.read_csv(dicom_data / "index.csv", dtype=str)
    truth["abs"] = [os.path.abspath(dicom_data / p) for p in truth["path"]]
    return truth


def test_counts_match_truth_table(dicom_data: Path) -> None:
    truth = _truth(dicom_data)
    res = index_tree(dicom_data)
    m = res.manifest
    assert len(m) == len(truth)
    assert set(m["path"]) == set(truth["abs"])
    for tag, col in TRUTH_COLUMNS.items():
        assert m[col].nunique() == truth[tag].nunique(), col
    merged = m.merge(truth, left_on="path", right_on="abs")
    assert len(merged) == len(truth)
    for tag, col in TRUTH_COLUMNS.items():
        assert (merged[col] == merged[tag]).all(), col
    assert (merged["modality"] == merged["Modality"]).all()
    assert (merged["instance_number"].astype(int) == merged["InstanceNumber"].astype(int)).all()
    assert (merged["rows"].astype(int) == merged["Rows"].astype(int)).all()
    assert res.stats["patients"] == truth["PatientID"].nunique()
    assert res.stats["studies"] == truth["StudyInstanceUID"].nunique()
    assert res.stats["series"] == truth["SeriesInstanceUID"].nunique()
    per_patient = truth.groupby("PatientID").size()
    assert res.stats["multi_image_patients"] == int((per_patient >= 2).sum())


def test_groups_by_tags_not_folders(dicom_data: Path) -> None:
    """98892001 and 98892003 are two folders of one patient: one group, not two."""
    m = index_tree(dicom_data).manifest
    idx = MultiInstanceIndex(m, level="patient")
    truth = _truth(dicom_data)
    folders_of = truth.groupby("PatientID")["path"].apply(lambda s: {p.split("/")[1] for p in s})
    spread = [pid for pid, folders in folders_of.items() if len(folders) > 1]
    assert spread, "the truth table should contain a patient spread over folders"
    for pid in spread:
        assert pid in idx
        assert idx.size(pid) == int((truth["PatientID"] == pid).sum())
    for level, tag in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID")):
        assert len(MultiInstanceIndex(m, level=level)) == truth[tag].nunique()
        sizes = truth.groupby(tag).size()
        assert sorted(MultiInstanceIndex(m, level=level).multi_image_groups()) == sorted(sizes[sizes >= 2].index)


def test_non_images_reported_not_indexed(dicom_data: Path) -> None:
    res = index_tree(dicom_data)
    errs = res.errors.set_index("path")
    dicomdir = str(dicom_data / "pydicom_dicomdirtests" / "DICOMDIR")
    assert errs.loc[dicomdir, "code"] == "dicomdir"
    assert errs.loc[str(dicom_data / "index.csv"), "code"] == "not_dicom"
    assert res.stats["files_seen"] == res.stats["files_indexed"] + res.stats["files_skipped"]


def _good(path: Path, pid: str = "GOOD1", name: str = "GOOD^ONE", i: int = 0) -> Path:
    return write_dicom(path, synthetic_image(i % 3, 1, i, 32), patient_id=pid, patient_name=name,
                       study_uid=f"1.2.3.{i}", series_uid=f"1.2.3.{i}.1", sop_uid=f"1.2.3.{i}.1.{i}",
                       instance_number=i + 1)


def make_bad_tree(root: Path, pydicom_test_file) -> dict[str, str]:
    """One file of every kind the index must skip; returns file name -> expected error code."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    _good(root / "good_a.dcm", i=0)
    _good(root / "sub" / "good_b", i=1)
    (root / "empty.dcm").write_bytes(b"")
    expected["empty.dcm"] = "empty"
    (root / "notes.txt").write_text("this is not DICOM\n" * 20)
    expected["notes.txt"] = "not_dicom"
    (root / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    expected["random.bin"] = "not_dicom"
    full = _good(root / "tmp_full.dcm", i=2).read_bytes()
    (root / "tmp_full.dcm").unlink()
    (root / "truncated_pixels.dcm").write_bytes(full[: len(full) - 500])
    expected["truncated_pixels.dcm"] = "truncated"
    (root / "truncated_header.dcm").write_bytes(full[:300])
    expected["truncated_header.dcm"] = "truncated"
    write_dicom(root / "no_pid.dcm", synthetic_image(0, 2, 2, 32), patient_id=None, patient_name="NO^ID",
                study_uid="1.2.4", series_uid="1.2.4.1", sop_uid="1.2.4.1.1")
    expected["no_pid.dcm"] = "no_patient_id"
    write_dicom(root / "no_pixels.dcm", synthetic_image(0, 3, 3, 32), patient_id="NOPIX", study_uid="1.2.5",
                series_uid="1.2.5.1", sop_uid="1.2.5.1.1", include_pixels=False)
    expected["no_pixels.dcm"] = "no_pixel_data"
    shutil.copy(pydicom_test_file("test-SR.dcm"), root / "report.dcm")
    expected["report.dcm"] = "unsupported_sop"
    shutil.copy(pydicom_test_file("rtplan.dcm"), root / "plan.dcm")
    expected["plan.dcm"] = "unsupported_sop"
    shutil.copy(pydicom_test_file("MR_truncated.dcm"), root / "mr_truncated.dcm")
    expected["mr_truncated.dcm"] = "truncated"
    return expected


def test_bad_files_reported_with_reasons(tmp_path: Path, pydicom_test_file) -> None:
    expected = make_bad_tree(tmp_path / "tree", pydicom_test_file)
    out = tmp_path / "manifest.csv"
    res = index_tree(tmp_path / "tree", out)
    assert sorted(Path(p).name for p in res.manifest["path"]) == ["good_a.dcm", "good_b"]
    got = {Path(p).name: c for p, c in zip(res.errors["path"], res.errors["code"])}
    assert got == expected
    errs = pd.read_csv(errors_path(out))
    assert list(errs.columns[:2]) == ["path", "reason"]
    assert errs["reason"].str.len().gt(10).all() and not errs["reason"].str.contains("\n").any()
    assert "8192 bytes" in errs.set_index(errs["path"].map(lambda p: Path(p).name)).loc["mr_truncated.dcm", "reason"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medssl_monai.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_cli_summary_and_exit_codes(tmp_path: Path, pydicom_test_file) -> None:
    expected = make_bad_tree(tmp_path / "tree", pydicom_test_file)
    r = _cli("index", str(tmp_path / "tree"), "--out", str(tmp_path / "m.csv"))
    assert r.returncode == 0, r.stderr
    assert f"files seen:            {len(expected) + 2}" in r.stdout
    assert "truncated            3" in r.stdout
    assert "patients:              1" in r.stdout
    only_bad = tmp_path / "bad_only"
    only_bad.mkdir()
    (only_bad / "a.txt").write_text("nope")
    (only_bad / "b.dcm").write_bytes(b"")
    r = _cli("index", str(only_bad), "--out", str(tmp_path / "bad.csv"))
    assert r.returncode != 0
    assert "nothing indexed" in r.stderr and "bad.errors.csv" in r.stderr
    r = _cli("index", str(tmp_path / "missing"), "--out", str(tmp_path / "x.csv"))
    assert r.returncode != 0 and "no such file or folder" in r.stderr


def _copy_tree_many(src: Path, dst: Path, copies: int) -> None:
    for k in range(copies):
        shutil.copytree(src, dst / f"copy{k}")


def test_workers_give_same_manifest(tmp_path: Path, dicom_data: Path) -> None:
    _copy_tree_many(dicom_data / "pydicom_dicomdirtests", tmp_path / "tree", 3)  # ~100 files: several chunks
    one = index_tree(tmp_path / "tree", workers=1, chunk_size=16)
    two = index_tree(tmp_path / "tree", workers=2, chunk_size=16)
    pd.testing.assert_frame_equal(one.manifest, two.manifest)
    pd.testing.assert_frame_equal(one.errors, two.errors)
    truth = _truth(dicom_data)
    n = truth["path"].str.startswith("pydicom_dicomdirtests/").sum()
    # three copies of one tree: each instance is indexed once, the two other copies are duplicates
    assert len(one.manifest) == n and one.manifest["sop_uid"].is_unique
    assert (one.errors["code"].astype(str) == "duplicate_instance").sum() == 2 * n


def test_incremental_rereads_only_changed(tmp_path: Path, dicom_data: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(dicom_data / "pydicom_dicomdirtests", tree)
    out = tmp_path / "m.csv"
    first = index_tree(tree, out)
    assert first.stats["files_read"] == first.stats["files_seen"]
    again = index_tree(tree, out)
    assert again.stats["files_read"] == 0 and again.stats["files_reused"] == first.stats["files_seen"]
    pd.testing.assert_frame_equal(first.manifest, again.manifest)
    # change one file (content + size), add one, delete one
    victims = sorted(p for p in tree.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    changed, deleted = victims[0], victims[1]
    _good(changed, pid="NEWPAT", i=7)
    deleted.unlink()
    _good(tree / "new" / "IMG1", pid="NEWPAT", i=8)
    third = index_tree(tree, out)
    assert third.stats["files_read"] == 2
    full = index_tree(tree, None, incremental=False)
    pd.testing.assert_frame_equal(third.manifest, full.manifest)
    pd.testing.assert_frame_equal(third.errors, full.errors)
    assert str(deleted) not in set(third.manifest["path"])
    on_disk = read_manifest(out)
    assert (on_disk["patient_id"] == "NEWPAT").sum() == 2
    # --full re-reads everything
    assert index_tree(tree, out, incremental=False).stats["files_read"] == third.stats["files_seen"]


def test_manifest_on_disk_round_trip(tmp_path: Path, dicom_data: Path) -> None:
    out = tmp_path / "m.csv"
    res = index_tree(dicom_data, out)
    back = read_manifest(out)
    assert list(back["path"]) == list(res.manifest["path"])
    assert list(back["patient_id"]) == list(res.manifest["patient_id"])
    assert back["rows"].dtype.name == "Int64"
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o600)  # a normal file, not a private one


def test_multiframe_expanded(tmp_path: Path) -> None:
    frames = np.stack([synthetic_image(1, 5, k, 32) for k in range(4)])
    write_dicom(tmp_path / "t" / "mf.dcm", frames, patient_id="MF", study_uid="1.9", series_uid="1.9.1",
                sop_uid="1.9.1.1", sop_class="1.2.840.10008.5.1.4.1.1.7.3")
    one = index_tree(tmp_path / "t").manifest
    assert len(one) == 1 and int(one["frames"].iloc[0]) == 4
    per_frame = index_tree(tmp_path / "t", expand_frames=True).manifest
    assert list(per_frame["frame_index"]) == [0, 1, 2, 3]


def test_nifti_in_tree(tmp_path: Path) -> None:
    import nibabel as nib

    vol = np.arange(8 * 6 * 5, dtype=np.float32).reshape(8, 6, 5)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "case7.nii.gz")
    m = index_tree(tmp_path).manifest
    assert len(m) == 5 and list(m["slice_index"]) == [0, 1, 2, 3, 4]
    assert set(m["patient_id"]) == {"case7"} and set(m["source"]) == {"nifti"}
    assert int(m["rows"].iloc[0]) == 8 and int(m["columns"].iloc[0]) == 6


def test_header_only(tmp_path: Path, monkeypatch) -> None:
    """The index never decodes pixels: a file whose pixel bytes are garbage still indexes."""
    p = _good(tmp_path / "a.dcm", i=3)
    ds = pydicom.dcmread(p)
    ds.PixelData = b"\xff" * len(ds.PixelData)
    ds.save_as(p)
    called = []
    monkeypatch.setattr(pydicom.Dataset, "convert_pixel_data", lambda *a, **k: called.append(1))
    assert len(index_tree(tmp_path).manifest) == 1 and not called
