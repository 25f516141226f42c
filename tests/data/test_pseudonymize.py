"""Pseudonymisation: no original id, UID, name or birth date in the manifest, errors, meta, path map keys or logs."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from medssl_monai.data import LoadManifestImage, Pseudonymizer, index_tree, read_manifest
from medssl_monai.sample_data import synthetic_image, write_dicom


def _secrets(tree: Path) -> set[str]:
    """Every identifying value in the tree, read independently with pydicom (names split into parts)."""
    found: set[str] = set()
    for p in tree.rglob("*"):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        for kw in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientBirthDate"):
            v = str(ds.get(kw, "") or "").strip()
            if len(v) >= 4:
                found.add(v)
        name = str(ds.get("PatientName", "") or "")
        found |= {part for part in name.replace("^", " ").split() if len(part) >= 3}
    return found


@pytest.fixture
def identifying_tree(tmp_path: Path, dicom_data: Path) -> Path:
    """Real pydicom tree (folder 77654033 *is* a PatientID) plus files whose folder is a patient's name."""
    tree = tmp_path / "export"
    shutil.copytree(dicom_data / "pydicom_dicomdirtests", tree / "pacs")
    write_dicom(tree / "DOE_JOHN" / "img1.dcm", synthetic_image(1, 1, 1, 32), patient_id="MRN12345",
                patient_name="Doe^John", birth_date="19800101", study_uid="1.2.840.99.1",
                series_uid="1.2.840.99.1.1", sop_uid="1.2.840.99.1.1.1")
    # a skipped file whose path still names the patient: it must not leak through the errors file
    write_dicom(tree / "DOE_JOHN" / "nopix.dcm", synthetic_image(1, 1, 2, 32), patient_id="MRN12345",
                patient_name="Doe^John", study_uid="1.2.840.99.1", series_uid="1.2.840.99.1.2",
                sop_uid="1.2.840.99.1.2.1", include_pixels=False)
    return tree


def test_no_identifier_in_any_output(tmp_path: Path, identifying_tree: Path) -> None:
    secrets = _secrets(identifying_tree) | {"DOE_JOHN", "77654033", "98890234"}
    assert {"MRN12345", "Doe", "John", "19800101", "Archibald"} <= secrets
    out = tmp_path / "out" / "manifest.csv"
    salt = tmp_path / "salt.key"
    r = subprocess.run([sys.executable, "-m", "medssl_monai.cli", "index", str(identifying_tree), "--out", str(out),
                        "--pseudonymize", str(salt), "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    public = [out, out.with_name("manifest.errors.csv"), out.with_name("manifest.meta.json")]
    texts = {p.name: p.read_text() for p in public}
    texts["stdout"], texts["stderr"] = r.stdout, r.stderr
    for where, text in texts.items():
        leaked = sorted(s for s in secrets if s in text)
        assert not leaked, f"{where} leaks {leaked}"
    # the private path map is the only place real paths live, and it is owner-only
    pm = out.with_name("manifest.pathmap.csv")
    assert pm.stat().st_mode & 0o077 == 0
    # the pseudonymised manifest still loads images through the path map
    m = read_manifest(out)
    assert m["path"].map(lambda p: Path(p).is_file()).all()
    img = LoadManifestImage()(m.iloc[0].to_dict())
    assert img.ndim == 3


def test_stable_with_salt_and_different_without(tmp_path: Path, identifying_tree: Path) -> None:
    pz = Pseudonymizer(b"0123456789abcdef-salt")
    a = index_tree(identifying_tree, pseudonymizer=pz).manifest
    b = index_tree(identifying_tree, pseudonymizer=Pseudonymizer(b"0123456789abcdef-salt")).manifest
    c = index_tree(identifying_tree, pseudonymizer=Pseudonymizer(b"another-salt-0123456")).manifest
    plain = index_tree(identifying_tree).manifest
    assert list(a["patient_id"]) == list(b["patient_id"])
    assert not set(a["patient_id"]) & set(c["patient_id"])
    # grouping structure is preserved exactly: same partition of rows into patients/studies/series
    for col in ("patient_id", "study_uid", "series_uid", "sop_uid"):
        assert a[col].nunique() == plain[col].nunique()
        pairs = pd.DataFrame({"h": a[col], "o": plain[col]}).drop_duplicates()
        assert len(pairs) == plain[col].nunique()
    assert all(u.startswith("2.25.") and len(u) <= 64 for u in a["study_uid"])
    assert pz.patient("MRN12345") == Pseudonymizer(b"0123456789abcdef-salt").patient("MRN12345")


def test_incremental_refuses_other_salt(tmp_path: Path, identifying_tree: Path) -> None:
    out = tmp_path / "m.csv"
    index_tree(identifying_tree, out, pseudonymizer=Pseudonymizer(b"salt-one-0123456789"))
    res = index_tree(identifying_tree, out, pseudonymizer=Pseudonymizer(b"salt-one-0123456789"))
    assert res.stats["files_read"] == 0
    res = index_tree(identifying_tree, out, pseudonymizer=Pseudonymizer(b"salt-two-0123456789"))
    assert res.stats["files_read"] == res.stats["files_seen"]  # never mixes pseudonyms of two salts


def test_labels_join_before_hashing(tmp_path: Path, identifying_tree: Path) -> None:
    labels = pd.DataFrame({"patient_id": ["MRN12345", "77654033"], "label": ["effusion", "normal"]})
    pz = Pseudonymizer(b"0123456789abcdef-salt")
    m = index_tree(identifying_tree, pseudonymizer=pz, labels=labels).manifest
    assert set(m.loc[m["patient_id"] == pz.patient("MRN12345"), "label"]) == {"effusion"}
    assert set(m.loc[m["patient_id"] == pz.patient("77654033"), "label"]) == {"normal"}
    assert m.loc[m["patient_id"] == pz.patient("98890234"), "label"].isna().all()


def test_pydicom_warnings_never_reach_logs(tmp_path: Path, caplog) -> None:
    """An invalid value makes pydicom warn *with the value*; the indexer must keep it out of the logs."""
    p = write_dicom(tmp_path / "t" / "a.dcm", synthetic_image(0, 1, 1, 16), patient_id="PID77", study_uid="1.2.7",
                    series_uid="1.2.7.1", sop_uid="1.2.7.1.1", instance_number=12345678)
    raw = p.read_bytes()
    assert raw.count(b"12345678") == 1
    p.write_bytes(raw.replace(b"12345678", b"SECRETXY"))  # InstanceNumber with an invalid IS value
    logging.getLogger().setLevel(logging.DEBUG)
    with caplog.at_level(logging.DEBUG):
        res = index_tree(tmp_path / "t", pseudonymizer=Pseudonymizer(b"0123456789abcdef-salt"))
    assert len(res.manifest) == 1 and pd.isna(res.manifest["instance_number"].iloc[0])
    assert "SECRETXY" not in caplog.text
