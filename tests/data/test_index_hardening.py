"""Index hardening: a corpus of every bad kind indexed once, NA-like ids, re-indexing a split manifest,
outputs and salts checked before the tree is read, one-line errors for bad tables (issue 13)."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from medssl_monai.bundle.data import load_rows
from medssl_monai.cli import main
from medssl_monai.data import (
    LoadManifestImage,
    Pseudonymizer,
    index_tree,
    load_or_create_salt,
    read_manifest,
    split_groups,
    table_to_manifest,
)
from medssl_monai.data.dicom import check_index_outputs
from medssl_monai.data.dicom import index as dicom_index
from medssl_monai.data.dicom import walk as dicom_walk
from medssl_monai.data.labels import read_labels
from medssl_monai.data.manifest import errors_path, pathmap_path, write_manifest
from medssl_monai.data.splits import nested_label_fractions
from medssl_monai.sample_data import synthetic_image, write_dicom

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ROOT_SKIP = "running as root: file permissions do not stop root from reading or writing"


def _dcm(path: Path, pid: str = "GOOD", i: int = 0, **kw) -> Path:
    return write_dicom(path, kw.pop("pixels", synthetic_image(i % 3, 1, i, 32)), patient_id=pid,
                       study_uid=f"1.2.3.{i}", series_uid=f"1.2.3.{i}.1", sop_uid=f"1.2.3.{i}.1.{i}",
                       instance_number=i + 1, **kw)


def _edit(src: Path, dst: Path, change) -> Path:
    """Rewrite a DICOM with one element changed (validation off: the point is an invalid file)."""
    ds = pydicom.dcmread(src)
    with pydicom_config.disable_value_validation():
        change(ds)
        ds.save_as(dst)
    return dst


def _encapsulated_cuts(path: Path) -> dict[str, int]:
    """Cut points inside encapsulated pixel data, located from pydicom's own reading of the value.

    ``ds.PixelData`` of an encapsulated file is its item sequence (offset table, fragments) without the
    8-byte sequence delimiter, and the last element of the file: with the delimiter it ends the file.
    """
    raw = path.read_bytes()
    value = pydicom.dcmread(path).PixelData
    start = len(raw) - 8 - len(value)
    assert raw[start:-8] == value and raw[-8:] == b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    bot = struct.unpack("<I", value[4:8])[0]
    first = struct.unpack("<I", value[8 + bot + 4 : 8 + bot + 8])[0]
    return {
        "in_element_header": start - 6,
        "in_offset_table_header": start + 4,
        "in_first_fragment": start + 8 + bot + 8 + first // 2,
        "last_byte_missing": len(raw) - 9,
        "no_delimiter": len(raw) - 8,
        "half_delimiter": len(raw) - 4,
    }


@contextlib.contextmanager
def _unlistable(folder: Path):
    """A folder the index cannot list: chmod 000, or (as root, which reads it anyway) a refusing scandir."""
    if not IS_ROOT:
        folder.chmod(0)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    real = os.scandir

    def scandir(path="."):
        if os.path.abspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dicom_walk.os, "scandir", scandir)
        yield


def make_corpus(tmp: Path, pydicom_test_file) -> tuple[Path, set[str], dict[str, str], Path]:
    """A tree with good files and one file (or entry) of every bad kind; returns (tree, good names,
    bad name -> expected code, the folder to make unlistable)."""
    tree, outside = tmp / "export", tmp / "outside"
    tree.mkdir()
    good: set[str] = set()
    bad: dict[str, str] = {}
    # --- good files: native, RLE single and multi-frame, baseline JPEG, JPEG 2000
    native = _dcm(tree / "good_native.dcm", "PAT1", 0)
    rle = _dcm(tree / "good_rle.dcm", "PAT1", 1, compress_rle=True)
    frames = np.stack([synthetic_image(1, 2, k, 32) for k in range(3)])
    rle3 = _dcm(tree / "good_rle_3frames.dcm", "PAT2", 2, pixels=frames, compress_rle=True,
                sop_class="1.2.840.10008.5.1.4.1.1.7.3")
    shutil.copy(pydicom_test_file("SC_rgb_jpeg_dcmtk.dcm"), tree / "good_jpeg.dcm")
    shutil.copy(pydicom_test_file("JPEG2000.dcm"), tree / "good_j2k.dcm")
    good |= {"good_native.dcm", "good_rle.dcm", "good_rle_3frames.dcm", "good_jpeg.dcm", "good_j2k.dcm"}
    # --- encapsulated data cut short, at several points of three files (RLE, JPEG, RLE multi-frame)
    for stem, src in (("rle", rle), ("jpeg", tree / "good_jpeg.dcm"), ("rle3", rle3)):
        raw = src.read_bytes()
        for where, cut in _encapsulated_cuts(src).items():
            (tree / f"cut_{stem}_{where}.dcm").write_bytes(raw[:cut])
            bad[f"cut_{stem}_{where}.dcm"] = "truncated"
    # --- headers that disagree with their pixel data
    _edit(native, tree / "rows_too_big.dcm", lambda ds: setattr(ds, "Rows", 64))
    bad["rows_too_big.dcm"] = "pixel_length_mismatch"
    _edit(native, tree / "rgb_claimed.dcm", lambda ds: setattr(ds, "SamplesPerPixel", 3))
    bad["rgb_claimed.dcm"] = "pixel_length_mismatch"
    _edit(native, tree / "frames_native.dcm", lambda ds: setattr(ds, "NumberOfFrames", 4))
    bad["frames_native.dcm"] = "pixel_length_mismatch"
    _edit(rle3, tree / "frames_vs_fragments.dcm", lambda ds: setattr(ds, "NumberOfFrames", 5))
    bad["frames_vs_fragments.dcm"] = "frames_exceed_fragments"
    _edit(native, tree / "frames_negative.dcm", lambda ds: ds.__setitem__(0x00280008, DataElement(0x00280008, "IS", "-2")))
    bad["frames_negative.dcm"] = "bad_number_of_frames"
    _edit(native, tree / "frames_text.dcm",
          lambda ds: ds.__setitem__(0x00280008, RawDataElement(Tag(0x00280008), "IS", 4, b"abc ", 0, False, True)))
    bad["frames_text.dcm"] = "bad_number_of_frames"
    # --- identifiers with a wrong VR or invalid content
    pid = 0x00100020
    _edit(native, tree / "pid_ob.dcm", lambda ds: ds.__setitem__(pid, DataElement(pid, "OB", b"\x07\x00")))
    _edit(native, tree / "pid_us.dcm", lambda ds: ds.__setitem__(pid, DataElement(pid, "US", 7)))
    _edit(native, tree / "pid_sq.dcm", lambda ds: ds.__setitem__(pid, DataElement(pid, "SQ", Sequence([Dataset()]))))
    _edit(native, tree / "pid_control.dcm", lambda ds: setattr(ds, "PatientID", "A\x07B"))
    bad |= dict.fromkeys(["pid_ob.dcm", "pid_us.dcm", "pid_sq.dcm", "pid_control.dcm"], "bad_patient_id")
    study = 0x0020000D
    _edit(native, tree / "uid_ob.dcm", lambda ds: ds.__setitem__(study, DataElement(study, "OB", b"1.2\x00")))
    _edit(native, tree / "uid_letters.dcm", lambda ds: setattr(ds, "StudyInstanceUID", "1.2.abc"))
    _edit(native, tree / "uid_too_long.dcm", lambda ds: setattr(ds, "SeriesInstanceUID", "1." + "2" * 70))
    bad |= dict.fromkeys(["uid_ob.dcm", "uid_letters.dcm", "uid_too_long.dcm"], "bad_uid")
    # --- a header announcing 12000 x 12000 (2.7 GB decoded for one load)
    _edit(native, tree / "huge.dcm", lambda ds: (setattr(ds, "Rows", 12000), setattr(ds, "Columns", 12000)))
    bad["huge.dcm"] = "too_large"
    # --- names and entries the listing cannot index
    _dcm(tree / os.fsdecode(b"caf\xe9.dcm"), "PAT3", 3)
    bad["caf\\xe9.dcm"] = "bad_filename"
    outside.mkdir()
    _dcm(outside / "elsewhere.dcm", "PAT4", 4)
    os.symlink(outside / "elsewhere.dcm", tree / "link_out.dcm")
    bad["link_out.dcm"] = "link_outside_root"
    os.symlink(outside, tree / "link_dir")
    bad["link_dir"] = "link_to_folder"
    os.symlink(tmp / "gone.dcm", tree / "dangling.dcm")
    bad["dangling.dcm"] = "dangling_link"
    os.mkfifo(tree / "pipe.dcm")
    bad["pipe.dcm"] = "not_a_file"
    locked = tree / "locked"
    _dcm(locked / "hidden_away.dcm", "PAT5", 5)
    bad["locked"] = "unlistable"
    return tree, good, bad, locked


def test_corpus_every_bad_kind_reported_every_good_file_indexed(tmp_path: Path, pydicom_test_file) -> None:
    tree, good, bad, locked = make_corpus(tmp_path, pydicom_test_file)
    assert len([k for k, v in bad.items() if v == "truncated"]) == 18  # 6 cut points x 3 encapsulated files
    out = tmp_path / "manifest.csv"
    with _unlistable(locked):
        res = index_tree(tree, out)
    assert sorted(Path(p).name for p in res.manifest["path"]) == sorted(good)
    got = {Path(p).name: c for p, c in zip(res.errors["path"], res.errors["code"])}
    assert got == bad
    errs = pd.read_csv(errors_path(out), keep_default_na=False)
    assert len(errs) == len(bad) and not errs["reason"].str.contains("\n").any()
    assert (errs["reason"].str.len() > 15).all()
    reason = dict(zip(errs["path"].map(lambda p: Path(p).name), errs["reason"]))
    assert "holds 2048 bytes" in reason["rows_too_big.dcm"] and "need 4096" in reason["rows_too_big.dcm"]  # 64x32x2
    assert "only 3 fragment" in reason["frames_vs_fragments.dcm"]
    assert "12000 x 12000" in reason["huge.dcm"]
    assert res.stats["files_seen"] == len(good) + len(bad)
    # the good files really load, and the truncated ones really do not (the index is not over-strict)
    for p, rows, cols in zip(res.manifest["path"], res.manifest["rows"], res.manifest["columns"]):
        assert tuple(LoadManifestImage(in_channels=1)(p).shape[-2:]) == (rows, cols)
    for name in ("cut_rle_in_first_fragment.dcm", "cut_rle_last_byte_missing.dcm", "cut_jpeg_in_first_fragment.dcm"):
        with pytest.raises((ValueError, EOFError, OSError, RuntimeError, AttributeError)):
            _ = pydicom.dcmread(tree / name).pixel_array
    # following links is an opt-in: then the outside file and folder are indexed; the file reached twice (a
    # link and the linked folder) is one instance: the first path is kept, the other is a duplicate_instance
    with _unlistable(locked):
        followed = index_tree(tree, follow_links=True)
    names = {Path(p).name for p in followed.manifest["path"]}
    assert names - good == {"elsewhere.dcm"} and good <= names
    dup = followed.errors[followed.errors["code"] == "duplicate_instance"]
    assert [Path(p).name for p in dup["path"]] == ["link_out.dcm"]
    # a limit is a limit: 32 x 32 = 1024 pixels is over 1000
    small = index_tree(tree / "good_native.dcm", max_pixels=1000)
    assert list(small.errors["code"]) == ["too_large"] and small.manifest.empty


def test_unlistable_folder_without_root_mechanism(tmp_path: Path) -> None:
    """chmod 000 only stops a non-root user; as root the fake scandir above stands in (and this skips)."""
    if IS_ROOT:
        pytest.skip(ROOT_SKIP)
    _dcm(tmp_path / "t" / "locked" / "a.dcm")
    (tmp_path / "t" / "locked").chmod(0)
    try:
        res = index_tree(tmp_path / "t")
    finally:
        (tmp_path / "t" / "locked").chmod(0o755)
    assert list(res.errors["code"]) == ["unlistable"]


def test_listing_problems_tracked_incrementally(tmp_path: Path) -> None:
    """A dangling link that is removed leaves the errors file; an unchanged tree leaves every file alone."""
    tree = tmp_path / "t"
    _dcm(tree / "a.dcm")
    os.symlink(tmp_path / "nowhere", tree / "dangling")
    out = tmp_path / "m.csv"
    assert list(index_tree(tree, out).errors["code"]) == ["dangling_link"]
    mtime = out.stat().st_mtime_ns
    again = index_tree(tree, out)
    assert again.stats["files_read"] == 0 and list(again.errors["code"]) == ["dangling_link"]
    assert out.stat().st_mtime_ns == mtime
    (tree / "dangling").unlink()
    assert index_tree(tree, out).errors.empty
    assert pd.read_csv(errors_path(out)).empty


def test_non_utf8_name_with_pseudonymiser(tmp_path: Path) -> None:
    name = os.fsdecode(b"M\xfcller.dcm")
    _dcm(tmp_path / "t" / name, "PATX")
    _dcm(tmp_path / "t" / "ok.dcm", "PATY", 1)
    pz = Pseudonymizer(b"0123456789abcdef-salt")
    assert pz.path_key(name) != pz.path_key("M?ller.dcm")  # the HMAC takes such a name, never raises
    out = tmp_path / "m.csv"
    res = index_tree(tmp_path / "t", out, pseudonymizer=pz)
    assert list(res.errors["code"]) == ["bad_filename"] and len(res.manifest) == 1
    assert res.errors["path"].iloc[0].endswith("M\\xfcller.dcm")
    assert read_manifest(out)["path"].tolist() == [str(tmp_path / "t" / "ok.dcm")]


# --------------------------------------------------------------------------------------------------------
# NA-like identifiers and labels (item 10)
# --------------------------------------------------------------------------------------------------------
NA_IDS = ["NA", "N/A", "null", "None"]
NA_LABELS = {"NA": "None", "N/A": "NA", "null": "null", "None": "N/A"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medssl_monai.cli", "-q", *args], capture_output=True, text=True,
                          timeout=300)


def _main(capsys, *args: str) -> tuple[int, str]:
    """``medssl ARGS`` in this process (a subprocess costs a torch import): exit code and error text.

    A user-facing error is an exception with a one-line message, which ``main`` prints; either way the
    message is returned.
    """
    capsys.readouterr()
    try:
        rc = main(["-q", *args])
    except (ValueError, OSError) as err:
        assert "\n" not in str(err), str(err)
        return 1, str(err)
    return rc, capsys.readouterr().err


def test_na_like_ids_and_labels_round_trip(tmp_path: Path, capsys) -> None:
    tree = tmp_path / "t"
    for k, pid in enumerate(NA_IDS):
        for j in range(2):
            _dcm(tree / f"p{k}" / f"i{j}.dcm", pid, 10 * k + j)
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("patient_id,label\n" + "".join(f"{p},{lab}\n" for p, lab in NA_LABELS.items()))
    labels = read_labels(labels_csv)
    assert list(labels["patient_id"]) == NA_IDS
    out = tmp_path / "m.csv"

    def check(res) -> None:
        assert res.stats["patients"] == 4
        back = read_manifest(out)
        assert sorted(back["patient_id"]) == sorted(NA_IDS * 2)
        assert dict(zip(back["patient_id"], back["label"])) == NA_LABELS

    check(index_tree(tree, out, labels=labels))
    unchanged = index_tree(tree, out)
    assert unchanged.stats["files_read"] == 0
    check(unchanged)
    os.utime(tree / "p0" / "i0.dcm", ns=(1, 10**18))  # touched: re-read, the rest reused
    touched = index_tree(tree, out, labels=labels)
    assert touched.stats["files_read"] == 1
    check(touched)
    rc, err = _main(capsys, "split", str(out), "--fractions", "train=0.5,val=0.25,test=0.25", "--label-fractions", "")
    assert rc == 0, err
    split = read_manifest(out)
    assert split["split"].notna().all() and split.groupby("split")["patient_id"].nunique().sum() == 4
    assert sorted(split["patient_id"].unique()) == sorted(NA_IDS)
    # the same ids through a table, and a pseudonymised label join keyed by them
    (tmp_path / "tab.csv").write_text("path,patient_id,label\n" + "".join(
        f"t/p{k}/i0.dcm,{pid},{NA_LABELS[pid]}\n" for k, pid in enumerate(NA_IDS)))
    tab = table_to_manifest(tmp_path / "tab.csv")
    assert list(tab["patient_id"]) == NA_IDS and list(tab["label"]) == [NA_LABELS[p] for p in NA_IDS]
    pz = Pseudonymizer(b"0123456789abcdef-salt")
    hashed = index_tree(tree, pseudonymizer=pz, labels=labels).manifest
    assert dict(zip(hashed["patient_id"], hashed["label"])) == {pz.patient(p): lab for p, lab in NA_LABELS.items()}


# --------------------------------------------------------------------------------------------------------
# Re-indexing a split manifest (item 11)
# --------------------------------------------------------------------------------------------------------
def test_reindex_keeps_split_and_fractions(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    for k in range(8):
        for j in range(2):
            _dcm(tree / f"p{k}" / f"i{j}.dcm", f"PAT{k}", 10 * k + j)
    out = tmp_path / "m.csv"
    m = index_tree(tree, out).manifest
    m["label"] = ["a" if k % 2 else "b" for k in range(8) for _ in range(2)]
    m = nested_label_fractions(split_groups(m, {"train": 0.5, "val": 0.25, "test": 0.25}), (0.5, 1.0))
    write_manifest(m, out)
    before = read_manifest(out).set_index("path")
    assert {"split", "labeled_50pct", "labeled_100pct"} <= set(before.columns)
    touched = tree / "p0" / "i0.dcm"
    os.utime(touched, ns=(1, 10**18))
    _dcm(tree / "p9" / "i0.dcm", "PAT9", 99)
    res = index_tree(tree, out)
    assert res.stats["files_read"] == 2
    after = read_manifest(out).set_index("path")
    same = [p for p in before.index if p != str(touched)]
    cols = ["split", "label", "labeled_50pct", "labeled_100pct"]
    pd.testing.assert_frame_equal(after.loc[same, cols].astype(str), before.loc[same, cols].astype(str))
    new = [str(touched), str(tree / "p9" / "i0.dcm")]
    assert after.loc[new, "split"].isna().all()
    with pytest.raises(ValueError, match=r"2 row\(s\) have no 'split'"):
        load_rows(manifest=out, split="train")
    # --full re-reads every file but keeps the assignment of files that did not change
    full = index_tree(tree, out, incremental=False)
    assert full.stats["files_read"] == full.stats["files_seen"]
    again = read_manifest(out).set_index("path")
    pd.testing.assert_frame_equal(again.loc[same, cols].astype(str), before.loc[same, cols].astype(str))
    assert again.loc[new, "split"].isna().all()
    write_manifest(split_groups(read_manifest(out)), out)  # split again: training may start
    assert len(load_rows(manifest=out, split=["train", "val", "test"])) == 17


# --------------------------------------------------------------------------------------------------------
# Outputs, salts and tables checked first, one line each (items 3, 12, 13, 15)
# --------------------------------------------------------------------------------------------------------
def _one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg


def test_out_inside_tree_refused_unless_own_output(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    victim = _dcm(tree / "a.dcm")
    original = victim.read_bytes()
    with pytest.raises(FileExistsError) as err:
        index_tree(tree, victim)
    _one_line(err, str(victim), "overwrite")
    assert victim.read_bytes() == original
    user_csv = tree / "notes.csv"
    user_csv.write_text("patient,comment\n1,x\n")
    with pytest.raises(FileExistsError):
        index_tree(tree, tree / "notes.csv")
    inside = tree / "index.csv"  # the index's own earlier output may be rewritten
    assert len(index_tree(tree, inside).manifest) == 1
    _dcm(tree / "b.dcm", "P2", 1)
    assert len(index_tree(tree, inside).manifest) == 2
    assert {Path(p).name for p in read_manifest(inside)["path"]} == {"a.dcm", "b.dcm"}
    r = _cli("index", str(tree), "--out", str(victim))
    assert r.returncode != 0 and str(victim) in r.stderr and victim.read_bytes() == original


def test_output_problems_found_before_reading(tmp_path: Path, monkeypatch) -> None:
    tree = tmp_path / "t"
    _dcm(tree / "a.dcm")
    read = []
    monkeypatch.setattr(dicom_index, "iter_files", lambda *a, **k: read.append(1) or iter(()))
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(ValueError) as err:
        index_tree(tree, tmp_path / "folder.csv")
    _one_line(err, "folder.csv", "folder")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError) as err:
        index_tree(tree, tmp_path / "afile" / "m.csv")
    _one_line(err, "afile", "not a folder")
    (tmp_path / "m.errors.csv").mkdir()  # a derived output that is a folder counts too
    with pytest.raises(ValueError):
        index_tree(tree, tmp_path / "m.csv")
    assert not read


@pytest.mark.skipif(IS_ROOT, reason=ROOT_SKIP)
def test_read_only_out_folder(tmp_path: Path) -> None:
    _dcm(tmp_path / "t" / "a.dcm")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(PermissionError) as err:
            check_index_outputs(tmp_path / "t", tmp_path / "ro" / "m.csv")
    finally:
        (tmp_path / "ro").chmod(0o755)
    _one_line(err, "ro")


def test_cli_checks_outputs_and_salt_before_reading(tmp_path: Path, capsys) -> None:
    """No salt created, no path map, no manifest when the output, the salt path or the labels are unusable."""
    tree = tmp_path / "t"
    _dcm(tree / "a.dcm")
    (tmp_path / "out_dir").mkdir()
    salt = tmp_path / "new.salt"
    rc, err = _main(capsys, "index", str(tree), "--out", str(tmp_path / "out_dir"), "--pseudonymize", str(salt))
    assert rc != 0 and "out_dir" in err
    assert not salt.exists() and list((tmp_path / "out_dir").iterdir()) == []
    (tmp_path / "salt_dir").mkdir()
    rc, err = _main(capsys, "index", str(tree), "--out", str(tmp_path / "m.csv"), "--pseudonymize",
                    str(tmp_path / "salt_dir"))
    assert rc != 0 and "salt path is a folder" in err
    assert not (tmp_path / "m.csv").exists() and not pathmap_path(tmp_path / "m.csv").exists()
    labels = tmp_path / "labels.csv"
    labels.write_text("pid,dx\nA,1\n")
    rc, err = _main(capsys, "index", str(tree), "--out", str(tmp_path / "m.csv"), "--labels", str(labels),
                    "--pseudonymize", str(salt))
    assert rc != 0 and "labels.csv" in err and "['patient_id', 'label']" in err
    assert not (tmp_path / "m.csv").exists() and not salt.exists()


def test_salt_file_checks(tmp_path: Path) -> None:
    created = tmp_path / "s" / "salt.key"
    salt = load_or_create_salt(created)
    assert len(salt) == 64 and created.stat().st_mode & 0o777 == 0o600
    created.chmod(0o644)
    with pytest.raises(PermissionError) as err:
        load_or_create_salt(created)
    _one_line(err, str(created), "0644", "chmod 600")
    created.chmod(0o600)
    assert load_or_create_salt(created) == salt
    short = tmp_path / "short.key"
    short.write_text("abc")
    short.chmod(0o600)
    with pytest.raises(ValueError) as err:
        load_or_create_salt(short)
    _one_line(err, str(short), "too short")
    with pytest.raises(ValueError) as err:
        load_or_create_salt(tmp_path / "s")
    _one_line(err, "folder")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(PermissionError) as err:  # cannot be created: its folder is a file
        load_or_create_salt(tmp_path / "plain" / "salt.key")
    _one_line(err, "cannot create")


@pytest.mark.skipif(IS_ROOT, reason=ROOT_SKIP)
def test_unreadable_salt(tmp_path: Path) -> None:
    salt = tmp_path / "salt.key"
    load_or_create_salt(salt)
    salt.chmod(0o200)
    try:
        with pytest.raises(PermissionError) as err:
            load_or_create_salt(salt)
    finally:
        salt.chmod(0o600)
    _one_line(err, "cannot read")


def test_bad_tables_one_line(tmp_path: Path, pydicom_test_file) -> None:
    no_path = tmp_path / "no_path.csv"
    no_path.write_text("patient_id,label\nA,1\n")
    with pytest.raises(ValueError) as err:
        read_manifest(no_path)
    _one_line(err, str(no_path), "'path'")
    dicom_as_csv = tmp_path / "garbage.csv"
    shutil.copy(pydicom_test_file("CT_small.dcm"), dicom_as_csv)
    with pytest.raises(ValueError) as err:
        read_manifest(dicom_as_csv)
    _one_line(err, str(dicom_as_csv))
    with pytest.raises(ValueError) as err:
        read_manifest(tmp_path)
    _one_line(err, "folder")
    with pytest.raises(ValueError) as err:
        read_labels(no_path, "patient_id", "dx")
    _one_line(err, str(no_path), "'dx'")
    with pytest.raises(ValueError) as err:
        table_to_manifest(dicom_as_csv)
    _one_line(err, str(dicom_as_csv))


def test_split_and_table_cli_errors(tmp_path: Path, capsys) -> None:
    _dcm(tmp_path / "t" / "a.dcm")
    out = tmp_path / "m.csv"
    index_tree(tmp_path / "t", out)
    before = out.read_bytes()
    for args, expect in ((["--fractions", "train=abc"], "train=abc"),
                         (["--label-fractions", "0.1,x"], "--label-fractions"),
                         (["--label-col", "dx"], "'dx'"),
                         (["--out", str(tmp_path)], "folder")):
        rc, err = _main(capsys, "split", str(out), *args)
        assert rc != 0 and expect in err, (args, err)
    assert out.read_bytes() == before
    rc, err = _main(capsys, "table", str(out), "--out", str(out))
    assert rc != 0 and "input table itself" in err
    rc, err = _main(capsys, "table", str(out), "--out", str(tmp_path / "x.csv"), "--group-col", "lesion")
    assert rc != 0 and "'lesion'" in err and str(out) in err


def test_table_max_pixels_from_header(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("L", (40, 30)).save(tmp_path / "big.png")
    Image.new("L", (20, 10)).save(tmp_path / "small.png")
    (tmp_path / "t.csv").write_text("path,patient_id,label\nbig.png,A,x\nsmall.png,B,y\n")
    assert len(table_to_manifest(tmp_path / "t.csv")) == 2
    with pytest.raises(ValueError) as err:
        table_to_manifest(tmp_path / "t.csv", max_pixels=1000)
    _one_line(err, "big.png (40 x 30)", "1 image(s)")
