"""Running a PACS cohort: withdrawn instances, prune/purge, label keys, --count-only, the audit trail.

Against a real Orthanc (DICOMweb and DIMSE) on 127.0.0.1 holding the sample tree, with an AccessionNumber
per study; expected values come from reading the uploaded files with plain pydicom.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import stat
from collections import Counter
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from orthanc_server import SCU_AET, SERVER_AET, start_orthanc

from medssl_monai.cli import main as cli
from medssl_monai.data import Pseudonymizer, read_manifest
from medssl_monai.data.labels import LABEL_KEYS
from medssl_monai.pacs.audit import AuditLog, audit_path
from medssl_monai.pacs.local_copy import LocalCopy

NON_IMAGE = {"1.2.840.10008.5.1.4.1.1.88.33"}  # the tree's SR test file: selected and fetched, not indexed
#: manifest column -> DICOM keyword, for the label keys
KEYWORDS = {"patient_id": "PatientID", "study_uid": "StudyInstanceUID", "accession_number": "AccessionNumber",
            "series_uid": "SeriesInstanceUID", "sop_uid": "SOPInstanceUID"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """The sample tree, one AccessionNumber per study, and each instance's identifiers read back by pydicom."""
    from medssl_monai.sample_data import make_sample_data

    root = tmp_path_factory.mktemp("ops_tree")
    make_sample_data(root, n_patients=4)
    accessions: dict[str, str] = {}
    headers = {}
    for f in sorted((root / "dicom").rglob("*")):
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue
        ds.AccessionNumber = accessions.setdefault(str(ds.StudyInstanceUID), f"RIS{len(accessions) + 1:04d}")
        ds.save_as(f)
        headers[str(ds.SOPInstanceUID)] = {"file": f, **{kw: str(ds.get(kw, "") or "") for kw in (
            *KEYWORDS.values(), "PatientName", "Modality", "BodyPartExamined", "StudyDate", "SOPClassUID")}}
    assert len(set(accessions.values())) > len({h["PatientID"] for h in headers.values()})  # studies > patients
    return {"root": root / "dicom", "labels": root / "labels.csv", "headers": headers}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, tree):
    from dicomweb_client import DICOMwebClient

    from medssl_monai.pacs.credentials import Credentials, make_session

    server = start_orthanc(tmp_path_factory.mktemp("orthanc_ops"))
    try:
        server.client = DICOMwebClient(server.dicomweb, session=make_session(Credentials("basic", *server.auth)))
        server.client.store_instances([pydicom.dcmread(h["file"]) for h in tree["headers"].values()])
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def credentials(orthanc, monkeypatch):
    monkeypatch.setenv("MEDSSL_DICOMWEB_USER", orthanc.auth[0])
    monkeypatch.setenv("MEDSSL_DICOMWEB_PASSWORD", orthanc.auth[1])


def _images(tree) -> dict[str, dict]:
    return {u: h for u, h in tree["headers"].items() if h["SOPClassUID"] not in NON_IMAGE}


def _dimse(orthanc) -> list[str]:
    return ["--dimse", f"127.0.0.1:{orthanc.dicom_port}", "--calling-ae", SCU_AET, "--called-ae", SERVER_AET]


def _counts_block(text: str, title: str) -> dict[str, int]:
    block = text.split(f"instances {title}:\n", 1)[1]
    out = {}
    for line in block.splitlines():
        if not line.startswith("  "):
            break
        name, n = line.strip().rsplit(None, 1)
        out[name] = int(n)
    return out


# ---------------------------------------------------------------- before a fetch: --count-only, empty cohort


@pytest.mark.parametrize("source", ["dicomweb", "dimse"])
def test_count_only_prints_the_cohort_and_downloads_nothing(source, orthanc, tree, tmp_path, capsys):
    out = tmp_path / "manifest.csv"
    src = ["--dicomweb", orthanc.dicomweb] if source == "dicomweb" else _dimse(orthanc)
    assert cli(["-q", "index", *src, "--out", str(out), "--count-only", "--labels", str(tree["labels"])]) == 0
    text = capsys.readouterr().out
    hs = list(tree["headers"].values())
    expect = {"patients": len({h["PatientID"] for h in hs if h["PatientID"]}), "studies": len({h["StudyInstanceUID"] for h in hs}),
              "series": len({h["SeriesInstanceUID"] for h in hs}), "instances": len(hs)}
    for k, v in expect.items():
        assert re.search(rf"^{k}:\s+{v}$", text, re.M), (k, text)
    assert _counts_block(text, "by modality") == dict(Counter(h["Modality"] or "(none)" for h in hs))
    assert _counts_block(text, "by body part") == dict(Counter(h["BodyPartExamined"] or "(none)" for h in hs))
    assert _counts_block(text, "by year") == dict(Counter(h["StudyDate"][:4] or "(none)" for h in hs))
    labels = dict(pd.read_csv(tree["labels"], dtype=str).itertuples(index=False))
    assert _counts_block(text, "by label") == dict(Counter(labels.get(h["PatientID"], "(none)") for h in hs))
    copy = out.with_name("manifest.cache")
    assert not out.exists() and (not copy.exists() or not any(copy.iterdir()))  # nothing downloaded or indexed
    (entry,) = AuditLog(audit_path(copy)).entries()
    assert entry["event"] == "query" and entry["count_only"] and entry["counts"]["instances"] == len(hs)


def test_empty_cohort_is_one_line_and_a_nonzero_exit(orthanc, tmp_path, capsys):
    out = tmp_path / "manifest.csv"
    assert cli(["-q", "index", "--dicomweb", orthanc.dicomweb, "--out", str(out), "--modality", "MG"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "cohort is empty" in err[0] and orthanc.dicomweb in err[0], err
    assert not out.exists()


# ---------------------------------------------------------------- withdrawn data, prune, purge


def _orthanc_patient(orthanc, patient_id: str) -> str:
    (hit,) = orthanc.rest("POST", "/tools/find", json={"Level": "Patient", "Query": {"PatientID": patient_id}})
    return hit


def test_withdrawn_instances_leave_the_manifest_and_are_pruned(orthanc, tree, tmp_path, capsys):
    salt = tmp_path / "secret" / "salt.key"
    out = tmp_path / "run" / "manifest.csv"
    args = ["-q", "index", "--dicomweb", orthanc.dicomweb, "--out", str(out), "--pseudonymize", str(salt)]
    assert cli(args) == 0
    assert "withdrawn:             0" in capsys.readouterr().out
    pz = Pseudonymizer.from_file(salt)
    images = _images(tree)
    assert set(read_manifest(out, resolve_paths=False)["sop_uid"]) == {pz.uid(u) for u in images}
    gone_patient = "SMP002"
    gone = {u for u, h in tree["headers"].items() if h["PatientID"] == gone_patient}
    orthanc.rest("DELETE", f"/patients/{_orthanc_patient(orthanc, gone_patient)}")  # withdrawn in the PACS
    try:
        assert cli(args) == 0
        printed = capsys.readouterr().out
        assert re.search(rf"^withdrawn:\s+{len(gone)} ", printed, re.M), printed
        manifest = read_manifest(out, resolve_paths=False)
        assert set(manifest["sop_uid"]) == {pz.uid(u) for u in images if u not in gone}
        copy = LocalCopy(out.with_name("manifest.cache"))
        assert gone <= copy.known()  # still on disk until pruned
        record = copy.selection_file  # beside the private folder: keyed hashes only, 0600
        assert stat.S_IMODE(os.stat(record).st_mode) == 0o600 and record.parent == copy.root.parent
        assert len(record.read_text().split()) == len(tree["headers"]) - len(gone)
        assert not any(u in record.read_text() for u in tree["headers"])
        assert cli(["-q", "local-copy", "prune", "--manifest", str(out), "--salt", str(salt)]) == 0
        assert f"pruned:                {len(gone)} " in capsys.readouterr().out
        assert copy.known() == set(tree["headers"]) - gone
        assert cli(["-q", "cache", "prune", "--manifest", str(out)]) == 0  # the alias; nothing left to prune
        assert copy.known() == set(tree["headers"]) - gone
        key = AuditLog.for_local_copy(copy.root).key_path
        key.rename(key.with_suffix(".moved"))  # without the key the record matches nothing: refuse, delete nothing
        assert cli(["-q", "local-copy", "prune", "--manifest", str(out)]) == 1
        assert "key of the recorded selection is missing" in capsys.readouterr().err
        assert copy.known() == set(tree["headers"]) - gone
        key.with_suffix(".moved").rename(key)
        prune = [e for e in AuditLog(audit_path(copy.root)).entries() if e["event"] == "prune"]
        assert prune[0]["counts"] == {"deleted": len(gone), "kept": len(tree["headers"]) - len(gone)}
        assert set(prune[0]["instances"]) == {pz.uid(u) for u in gone}  # the run's pseudonyms
        assert prune[1]["counts"]["deleted"] == 0 and prune[1]["instances"] == []
    finally:
        orthanc.client.store_instances([pydicom.dcmread(tree["headers"][u]["file"]) for u in gone])


def test_purge_deletes_local_copy_path_map_and_salt_and_refuses_a_foreign_folder(orthanc, tree, tmp_path, capsys):
    salt = tmp_path / "salt.key"
    out = tmp_path / "run" / "manifest.csv"
    copy = tmp_path / "copy"
    assert cli(["-q", "index", "--dicomweb", orthanc.dicomweb, "--out", str(out), "--pseudonymize", str(salt),
                "--local-copy", str(copy), "--modality", "CR"]) == 0
    n = len(LocalCopy(copy).known())
    assert n and (out.with_name("manifest.pathmap.csv")).is_file()
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("not DICOM")
    assert cli(["-q", "local-copy", "purge", "--local-copy", str(foreign)]) == 1
    assert "not purged" in capsys.readouterr().err and (foreign / "thesis.docx").is_file()
    assert cli(["-q", "local-copy", "purge", "--manifest", str(out), "--local-copy", str(copy),
                "--salt", str(salt)]) == 0
    assert not copy.exists() and not out.with_name("manifest.pathmap.csv").exists() and not salt.exists()
    assert not LocalCopy(copy, create=False).selection_file.exists()
    assert out.is_file()  # the pseudonymised manifest stays; without its path map and salt it leads nowhere
    (purge,) = [e for e in AuditLog(audit_path(copy)).entries() if e["event"] == "purge"]
    assert purge["counts"] == {"instances": n, "path_map": 1, "salt": 1} and len(purge["instances"]) == n


# ---------------------------------------------------------------- labels by patient, study, series, instance


def _label_table(tree, key: str, classes: int = 0) -> tuple[pd.DataFrame, dict[str, str]]:
    """Labels per value of ``key`` (each its own, or ``classes`` of them in turn), and each image's label."""
    images = _images(tree)
    values = sorted({h[KEYWORDS[key]] for h in images.values() if h[KEYWORDS[key]]})
    labels = {v: f"finding{i % classes if classes else i}" for i, v in enumerate(values)}
    expected = {u: labels.get(h[KEYWORDS[key]]) for u, h in images.items()}
    return pd.DataFrame({key: list(labels), "finding": list(labels.values())}), expected


@pytest.mark.parametrize("key", LABEL_KEYS)
def test_each_label_key_joins_its_level(key, tree, tmp_path):
    table, expected = _label_table(tree, key)
    table.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "manifest.csv"
    assert cli(["-q", "index", str(tree["root"]), "--out", str(out), "--labels", str(tmp_path / "labels.csv"),
                "--label-key", key, "--label-col", "finding"]) == 0
    m = read_manifest(out, resolve_paths=False).drop_duplicates("sop_uid").set_index("sop_uid")
    assert {u: (None if pd.isna(v) else v) for u, v in m["label"].items()} == expected
    if key != "patient_id":  # the point of a finer key: one patient, several labels
        per_patient = m.groupby("patient_id")["label"].nunique()
        assert (per_patient > 1).any()


def test_accession_number_is_read_pseudonymised_and_joined_through_the_pacs(orthanc, tree, tmp_path):
    table, expected = _label_table(tree, "accession_number")
    table.to_csv(tmp_path / "labels.csv", index=False)
    salt = tmp_path / "salt.key"
    out = tmp_path / "manifest.csv"
    assert cli(["-q", "index", "--dicomweb", orthanc.dicomweb, "--out", str(out), "--pseudonymize", str(salt),
                "--labels", str(tmp_path / "labels.csv"), "--label-key", "accession_number",
                "--label-col", "finding"]) == 0
    pz = Pseudonymizer.from_file(salt)
    m = read_manifest(out, resolve_paths=False).drop_duplicates("sop_uid").set_index("sop_uid")
    for u, h in _images(tree).items():
        assert m.loc[pz.uid(u), "accession_number"] == pz.accession(h["AccessionNumber"])
        assert m.loc[pz.uid(u), "label"] == expected[u]
    assert not any(h["AccessionNumber"] in out.read_text() for h in tree["headers"].values())


def test_conflicting_labels_are_refused_naming_pseudonyms(orthanc, tree, tmp_path, capsys):
    rows = [("SMP001", "a"), ("SMP001", "b"), ("SMP002", "a"), ("SMP002", "a"), ("SMP003", "b"), ("SMP003", "c")]
    pd.DataFrame(rows, columns=["patient_id", "label"]).to_csv(tmp_path / "labels.csv", index=False)
    salt = tmp_path / "salt.key"
    out = tmp_path / "manifest.csv"
    assert cli(["-q", "index", "--dicomweb", orthanc.dicomweb, "--out", str(out), "--pseudonymize", str(salt),
                "--labels", str(tmp_path / "labels.csv")]) == 1
    err = capsys.readouterr().err.strip()
    pz = Pseudonymizer.from_file(salt)
    assert len(err.splitlines()) == 1 and "2 patient_id value(s) have conflicting labels" in err, err
    assert pz.patient("SMP001") in err and pz.patient("SMP003") in err and "SMP00" not in err
    assert not out.exists() and not out.with_name("manifest.cache").exists()  # refused before any fetch
    # without pseudonymisation the keys are named as given; a duplicate row with the same label is fine
    assert cli(["-q", "index", str(tree["root"]), "--out", str(out), "--labels", str(tmp_path / "labels.csv")]) == 1
    assert "SMP001, SMP003" in capsys.readouterr().err


def test_pipeline_data_label_key_goes_through_ingest(tree, tmp_path):
    from medssl_monai.experiments.pipeline import prepare_data, validate_pipeline

    table, expected = _label_table(tree, "series_uid", classes=2)
    table.rename(columns={"finding": "label"}).to_csv(tmp_path / "labels.csv", index=False)
    cfg = {"_base": str(tmp_path), "data": {"dicom_root": str(tree["root"]), "labels": str(tmp_path / "labels.csv"),
                                            "label_key": "series_uid", "pseudonymize": False}, "phases": {}}
    assert not [p for p in validate_pipeline(cfg) if "label_key" in p]
    assert any("data.label_key" in p for p in validate_pipeline({**cfg, "data": {"label_key": "study"}, "phases": {}}))
    m = read_manifest(prepare_data(cfg, tmp_path / "run"), resolve_paths=False).drop_duplicates("sop_uid")
    assert {u: (None if pd.isna(v) else v) for u, v in zip(m["sop_uid"], m["label"])} == expected


# ---------------------------------------------------------------- the audit trail


def test_audit_log_records_every_operation_and_no_identifier_in_clear(orthanc, tree, tmp_path):
    from medssl_monai.pacs.credentials import load_credentials
    from medssl_monai.reporting.dicom_sr import stow_files

    out = tmp_path / "run" / "manifest.csv"
    assert cli(["-q", "index", "--dicomweb", orthanc.dicomweb, "--out", str(out)]) == 0  # not pseudonymised
    assert cli(["-q", "index", *_dimse(orthanc), "--out", str(out)]) == 0
    copy = out.with_name("manifest.cache")
    log = AuditLog.for_local_copy(copy)
    one = next(iter(_images(tree).values()))
    stow_files(orthanc.dicomweb, [one["file"]], load_credentials(), audit=log)  # a resend: Orthanc replaces it
    assert cli(["-q", "local-copy", "prune", "--manifest", str(out)]) == 0
    assert cli(["-q", "local-copy", "purge", "--manifest", str(out)]) == 0
    entries = log.entries()
    assert [e["event"] for e in entries] == ["query", "retrieve", "query", "stow", "prune", "purge"]
    assert all(e["user"] == getpass.getuser() for e in entries)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", e["time"]) for e in entries)
    assert entries[0]["server"] == orthanc.dicomweb and entries[3]["server"] == orthanc.dicomweb
    assert entries[2]["server"].startswith(f"127.0.0.1:{orthanc.dicom_port}")
    assert entries[1]["counts"]["fetched"] == len(tree["headers"]) and entries[2]["counts"]["instances"] == len(
        tree["headers"])
    key = log.key_path
    assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600 and stat.S_IMODE(os.stat(key).st_mode) == 0o600
    hasher = Pseudonymizer(key.read_bytes().strip())  # whoever holds the key can check an instance
    assert set(entries[1]["instances"]) == {hasher.uid(u) for u in tree["headers"]}
    assert entries[3]["instances"] == [hasher.uid(pydicom.dcmread(one["file"]).SOPInstanceUID)]
    text = log.path.read_text()
    secret = orthanc.auth[1]
    clear = {v for h in tree["headers"].values() for kw in (*KEYWORDS.values(), "PatientName") for v in [h[kw]] if v}
    leaked = sorted(v for v in clear | {secret, str(tree["root"])} if v in text)
    assert not leaked, leaked[:3]
    assert all(isinstance(json.loads(line), dict) for line in text.splitlines())
    assert not copy.exists() and log.path.is_file()  # the purge keeps the record of itself


def test_audit_log_is_append_only_and_hides_userinfo(tmp_path):
    log = AuditLog(tmp_path / "x.audit.jsonl")
    log.record("query", server="https://alice:pw@pacs.example.org:8443/dicom-web?token=t0k", instances=["1.2.3"])
    log.path.chmod(0o644)
    log.record("retrieve", server="pacs:104", instances=["1.2.3"], counts={"fetched": 1})
    entries = log.entries()
    assert entries[0]["server"] == "https://pacs.example.org:8443/dicom-web" and len(entries) == 2
    assert entries[0]["instances"] == entries[1]["instances"] and "1.2.3" not in log.path.read_text()
    assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600
    with pytest.raises(ValueError, match="audit event"):
        log.record("download")
    assert Path(str(tmp_path / "x.audit.key")).is_file()


def test_progress_bar_on_fetches_and_off_with_quiet(orthanc, tree, tmp_path, monkeypatch):
    import tqdm.auto

    made = []

    class Bar:  # records what the command line's bar is told
        def __init__(self, **kw):
            self.kw, self.total, self.n = kw, None, 0
            made.append(self)

        def update(self, n):
            self.n += n

        def refresh(self):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    cr = sum(h["Modality"] == "CR" for h in tree["headers"].values())
    assert cli(["index", "--dicomweb", orthanc.dicomweb, "--out", str(tmp_path / "a.csv"), "--modality", "CR"]) == 0
    (bar,) = made
    assert bar.kw["desc"] == "fetching" and bar.total == bar.n == cr and bar.closed
    made.clear()
    assert cli(["-q", "index", "--dicomweb", orthanc.dicomweb, "--out", str(tmp_path / "b.csv"), "--modality",
                "CR", "--cache", str(tmp_path / "old_name")]) == 0  # --cache: the former name of --local-copy
    assert made == [] and len(LocalCopy(tmp_path / "old_name").known()) == cr


def test_pacs_source_takes_local_copy_and_its_former_name():
    from medssl_monai.ingest import pacs_source

    assert pacs_source("dicomweb", {"url": "https://p/dicom-web", "cache": "d"})["local_copy"] == "d"
    assert pacs_source("dimse", {"address": "p:104", "local_copy": "d"})["local_copy"] == "d"
    with pytest.raises(ValueError, match="not both"):
        pacs_source("dimse", {"address": "p:104", "local_copy": "d", "cache": "e"})
