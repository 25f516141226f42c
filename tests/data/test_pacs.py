"""PACS in and results back, against a real Orthanc (DICOMweb plugin, DIMSE) on 127.0.0.1.

The sample DICOM tree (with a few cohort-relevant header edits) is uploaded by STOW-RS; every network
index is compared with a folder index of the same files, and every cohort filter with a plain pydicom scan.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import torch
from orthanc_server import SCU_AET, SERVER_AET, free_port, start_orthanc

from medssl_monai.bundle.run import write_predictions
from medssl_monai.cli import main as cli
from medssl_monai.data import Pseudonymizer, index_tree, read_manifest
from medssl_monai.data.cohort import CohortFilter, parse_date_range
from medssl_monai.experiments.pipeline import prepare_data
from medssl_monai.pacs.credentials import load_credentials
from medssl_monai.pacs.dicomweb import fetch_dicomweb
from medssl_monai.pacs.dimse import fetch_dimse
from medssl_monai.pacs.errors import PacsError
from medssl_monai.pacs.local_copy import DamagedInstance, LocalCopy
from medssl_monai.reporting.dicom_sr import run_results_to_pacs
from medssl_monai.sample_data import CLASSES, make_sample_data

REPO = Path(__file__).resolve().parents[2]
#: header edits that give the filters something to select: patient -> attributes
EDITS = {
    "SMP001": {"SeriesDescription": "PA chest"},
    "SMP002": {"StudyDate": "20230615", "BodyPartExamined": "HAND", "SeriesDescription": "hand AP"},
    "SMP003": {"Modality": "DX", "SeriesDescription": "Chest PA lateral"},
    "SMP004": {"SeriesDescription": "CHEST PA"},
}
NON_IMAGE = {"1.2.840.10008.5.1.4.1.1.88.33"}  # the tree's SR test file: stored by Orthanc, skipped by the index
META_COLUMNS = ["path", "file_size", "file_mtime_ns"]  # where a file is, not what it is


def _env(server, password: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSSL_DICOMWEB_")}
    env.update(MEDSSL_DICOMWEB_USER=server.auth[0], MEDSSL_DICOMWEB_PASSWORD=password or server.auth[1])
    return env


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """The sample tree with the cohort edits, and its instances' headers read with plain pydicom."""
    root = tmp_path_factory.mktemp("pacs_tree")
    make_sample_data(root, n_patients=4)
    headers = {}
    for f in sorted((root / "dicom").rglob("*")):
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue  # the tree's non-DICOM files
        for kw, value in EDITS.get(str(ds.get("PatientID", "")), {}).items():
            setattr(ds, kw, value)
        ds.save_as(f)
        headers[str(ds.SOPInstanceUID)] = {"file": f, **{kw: str(ds.get(kw, "") or "") for kw in (
            "Modality", "BodyPartExamined", "StudyDate", "SeriesDescription", "SOPClassUID")}}
    return {"root": root / "dicom", "labels": root / "labels.csv", "headers": headers}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, tree):
    from dicomweb_client import DICOMwebClient

    from medssl_monai.pacs.credentials import Credentials, make_session

    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        client = DICOMwebClient(server.dicomweb, session=make_session(Credentials("basic", *server.auth)))
        client.store_instances([pydicom.dcmread(h["file"]) for h in tree["headers"].values()])
        server.client = client
        server.tree_headers = tree["headers"]
        assert len(server.rest("GET", "/instances")) == len(tree["headers"])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def salt(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("salt") / "salt.key"


@pytest.fixture(scope="module")
def folder_manifest(tree, salt, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("folder") / "manifest.csv"
    index_tree(tree["root"], out, pseudonymizer=Pseudonymizer.from_file(salt))
    return read_manifest(out, resolve_paths=False)


@pytest.fixture(scope="module")
def web_run(orthanc, salt, tmp_path_factory, monkeypatch_module):
    """``medssl index --dicomweb`` (pseudonymised) into a run folder, once for the module."""
    run = tmp_path_factory.mktemp("web_run")
    for k, v in _env(orthanc).items():
        monkeypatch_module.setenv(k, v)
    out = run / "data" / "manifest.csv"
    assert cli(["-q", "index", "--dicomweb", orthanc.dicomweb, "--out", str(out), "--pseudonymize", str(salt)]) == 0
    return run, out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _content(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=META_COLUMNS).sort_values("sop_uid").reset_index(drop=True)


def _assert_same_manifest(network: pd.DataFrame, folder: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(_content(network), _content(folder))
    for level in ("patient_id", "study_uid", "series_uid"):  # the same partition at every grouping level
        part = lambda df, lv=level: sorted(map(frozenset, df.groupby(lv)["sop_uid"].apply(set)))  # noqa: E731
        assert part(network) == part(folder)


def _fetched(stdout: str) -> int:
    return int(re.search(r"fetched:\s+(\d+) of", stdout).group(1))


# ---------------------------------------------------------------- cohort filter and cache (no server)


def test_date_range_syntax():
    assert parse_date_range("20230101-20231231") == ("20230101", "20231231")
    assert parse_date_range("20230101-") == ("20230101", "")
    assert parse_date_range("-20231231") == ("", "20231231")
    assert parse_date_range("20230615") == ("20230615", "20230615")
    for bad in ("2023-01-01", "20231301-", "20240101-20230101", "-"):
        with pytest.raises(ValueError):
            parse_date_range(bad)


def test_filter_matching_is_dicom_matching():
    f = CohortFilter.create(modality="cr,dx", series_description="*PA*")
    assert f.modality == ("CR", "DX")
    assert f.matches({"modality": "DX", "series_description": "Chest PA lateral"})
    assert not f.matches({"modality": "DX", "series_description": "chest pa"})  # case-sensitive, as a PACS
    assert not f.matches({"modality": "MR", "series_description": "PA"})
    assert not CohortFilter.create(body_part="CHEST").matches({"body_part": ""})
    assert CohortFilter.create(study_date="-20231231").matches({"study_date": "20230615"})
    assert not CohortFilter.create(study_date="-20231231").matches({"study_date": "20240101"})


def test_cache_refuses_names_that_are_not_uids(tmp_path):
    cache = LocalCopy(tmp_path / "c")
    assert oct(os.stat(tmp_path / "c").st_mode & 0o777) == "0o700"
    for bad in ("../../etc/passwd", "1.2/3", "", "1." * 40):
        with pytest.raises(ValueError):
            cache.path_for(bad)
    with pytest.raises(DamagedInstance):  # what enters the cache is verified: b"x" is no DICOM instance
        cache.write("1.2.3", b"x")
    assert not cache.has("1.2.3") and not list((tmp_path / "c").iterdir())
    cache.write("1.2.3", b"x", verify=False)
    assert oct(os.stat(cache.path_for("1.2.3")).st_mode & 0o777) == "0o600"


def test_auth_file_must_be_private(tmp_path, monkeypatch):
    f = tmp_path / "auth"
    f.write_text("alice:s3cret\n")
    f.chmod(0o644)
    with pytest.raises(PacsError, match="chmod 600"):
        load_credentials(f)
    f.chmod(0o600)
    creds = load_credentials(f)
    assert (creds.kind, creds.user, creds.secret) == ("basic", "alice", "s3cret")
    assert "s3cret" not in repr(creds) and "s3cret" not in str(creds)
    monkeypatch.setenv("MEDSSL_DICOMWEB_TOKEN", "tok")
    monkeypatch.setenv("MEDSSL_DICOMWEB_USER", "alice")
    with pytest.raises(PacsError, match="keep one kind"):
        load_credentials()


def test_tls_verification_on_by_default_and_ca_bundle(tmp_path):
    from medssl_monai.pacs.credentials import Credentials, make_session

    assert make_session(Credentials()).verify is True
    ca = tmp_path / "hospital-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert make_session(Credentials(), ca).verify == str(ca)
    with pytest.raises(PacsError, match="--ca-bundle"):
        make_session(Credentials(), tmp_path / "missing.pem")
    bearer = make_session(Credentials("bearer", "", "tok-123"))
    assert bearer.headers["Authorization"] == "Bearer tok-123" and bearer.auth is None


@pytest.mark.parametrize("status, words", [(401, "refused the credentials"), (403, "denied access"),
                                           (404, "check the URL"), (503, "HTTP 503")])
def test_http_failures_are_one_line_naming_the_server(status, words):
    import requests

    from medssl_monai.pacs.errors import describe_http_error

    resp = requests.Response()
    resp.status_code, resp.reason = status, "x"
    err = describe_http_error("https://pacs/dicom-web", requests.HTTPError(response=resp))
    assert str(err).startswith("https://pacs/dicom-web") and words in str(err) and "\n" not in str(err)
    assert err.fatal == (status in (401, 403))


# ---------------------------------------------------------------- index through the network


def test_dicomweb_index_equals_folder_index(web_run, folder_manifest, orthanc, salt, capsys):
    _run, out = web_run
    network = read_manifest(out, resolve_paths=False)
    _assert_same_manifest(network, folder_manifest)
    assert len(network) == len({s for s, h in orthanc.tree_headers.items() if h["SOPClassUID"] not in NON_IMAGE})
    cache = out.with_name("manifest.cache")
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    capsys.readouterr()
    assert cli(["-q", "index", "--dicomweb", orthanc.dicomweb, "--out", str(out), "--pseudonymize", str(salt)]) == 0
    assert _fetched(capsys.readouterr().out) == 0  # the second run fetches nothing
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps


def test_dimse_index_equals_folder_index(orthanc, folder_manifest, salt, tmp_path, capsys):
    out = tmp_path / "manifest.csv"
    args = ["-q", "index", "--dimse", f"127.0.0.1:{orthanc.dicom_port}", "--calling-ae", SCU_AET, "--called-ae",
            SERVER_AET, "--out", str(out), "--pseudonymize", str(salt)]
    assert cli(args) == 0
    assert _fetched(capsys.readouterr().out) == len(orthanc.tree_headers)
    _assert_same_manifest(read_manifest(out, resolve_paths=False), folder_manifest)
    assert cli(args) == 0
    assert _fetched(capsys.readouterr().out) == 0


FILTERS = {
    "modality": ({"modality": "DX"}, lambda h: h["Modality"] == "DX"),
    "body_part": ({"body_part": "HAND"}, lambda h: h["BodyPartExamined"] == "HAND"),
    "study_date": ({"study_date": "20230101-20231231"}, lambda h: "20230101" <= h["StudyDate"] <= "20231231"),
    "series_description": ({"series_description": "*PA*"}, lambda h: "PA" in h["SeriesDescription"]),
    "combined": ({"modality": "CR", "body_part": "CHEST", "study_date": "20240101-"},
                 lambda h: h["Modality"] == "CR" and h["BodyPartExamined"] == "CHEST" and h["StudyDate"] >= "20240101"),
}


@pytest.mark.parametrize("name", list(FILTERS))
def test_cohort_filter_selects_expected_instances(name, orthanc, tree, tmp_path):
    spec, predicate = FILTERS[name]
    expected = {uid for uid, h in tree["headers"].items() if predicate(h) and h["SOPClassUID"] not in NON_IMAGE}
    assert expected and expected != {u for u, h in tree["headers"].items() if h["SOPClassUID"] not in NON_IMAGE}
    cohort = CohortFilter.create(**spec)
    stats = fetch_dicomweb(orthanc.dicomweb, tmp_path / "web", cohort, load_credentials(environ=_env(orthanc)))
    assert stats.fetched == stats.instances == len(LocalCopy(tmp_path / "web").known())
    web = index_tree(tmp_path / "web", tmp_path / "web.csv", cohort=cohort).manifest
    folder = index_tree(tree["root"], tmp_path / "folder.csv", cohort=cohort).manifest
    assert set(web["sop_uid"]) == set(folder["sop_uid"]) == expected
    assert LocalCopy(tmp_path / "web").known() <= set(tree["headers"])
    if name == "combined":  # the same selection through C-FIND
        fetch_dimse(f"127.0.0.1:{orthanc.dicom_port}", tmp_path / "dimse", cohort, calling_ae=SCU_AET,
                    called_ae=SERVER_AET)
        assert set(index_tree(tmp_path / "dimse", None, cohort=cohort).manifest["sop_uid"]) == expected


_KILLER = """
import os, signal, sys
from medssl_monai.data.cohort import CohortFilter
from medssl_monai.pacs.credentials import load_credentials
from medssl_monai.pacs.dicomweb import fetch_dicomweb
real, calls = os.replace, [0]
def replace(src, dst):  # the process dies between writing an instance and renaming it into place
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
fetch_dicomweb(sys.argv[1], sys.argv[2], CohortFilter(), load_credentials(), workers=1)
"""


def test_fetch_killed_midway_resumes_without_partial_files(orthanc, tree, salt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run" / "manifest.csv"
    cache = tmp_path / "run" / "manifest.cache"
    env = {**_env(orthanc), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", _KILLER, orthanc.dicomweb, str(cache), "6"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert len(LocalCopy(cache).known()) == 5 and len(LocalCopy(cache).partial_files()) == 1
    for k, v in _env(orthanc).items():
        monkeypatch.setenv(k, v)
    assert cli(["-q", "index", "--dicomweb", orthanc.dicomweb, "--out", str(out), "--pseudonymize", str(salt)]) == 0
    assert _fetched(capsys.readouterr().out) == len(tree["headers"]) - 5
    assert LocalCopy(cache).partial_files() == [] and not list(cache.glob(".*"))
    assert LocalCopy(cache).known() == set(tree["headers"])  # complete, and one file per instance
    for sop, h in tree["headers"].items():  # every cached file is whole: the same dataset as the source
        assert pydicom.dcmread(cache / f"{sop}.dcm") == pydicom.dcmread(h["file"])
    m = read_manifest(out, resolve_paths=False)
    assert not m["sop_uid"].duplicated().any()


# ---------------------------------------------------------------- errors: one clear line


def test_wrong_password_one_line_and_nonzero_exit(orthanc, tmp_path):
    secret = "wrong-password-7f3a"
    run = tmp_path / "run"
    env = {**_env(orthanc, password=secret), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "medssl_monai.cli", "-q", "index", "--dicomweb", orthanc.dicomweb,
                        "--out", str(run / "manifest.csv")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert orthanc.dicomweb in lines[0] and "401" in lines[0] and "MEDSSL_DICOMWEB_PASSWORD" in lines[0]
    assert secret not in r.stdout + r.stderr
    assert not (run / "manifest.csv").exists()


def test_connection_and_association_failures_name_the_server(orthanc, tmp_path):
    dead = free_port()
    with pytest.raises(PacsError, match=rf"cannot connect to http://127.0.0.1:{dead}/dicom-web.*check the host"):
        fetch_dicomweb(f"http://127.0.0.1:{dead}/dicom-web", tmp_path / "c", retries=0)
    with pytest.raises(PacsError, match=rf"cannot connect to 127.0.0.1:{dead}"):
        fetch_dimse(f"127.0.0.1:{dead}", tmp_path / "c")
    # Orthanc rejects a wrong called AE, or aborts the association under load: either is the same one line
    with pytest.raises(PacsError, match=rf"127.0.0.1:{orthanc.dicom_port} \(called AE WRONGAE.*(rejected|aborted) "
                                        "the association: check both AE titles"):
        fetch_dimse(f"127.0.0.1:{orthanc.dicom_port}", tmp_path / "c", calling_ae=SCU_AET, called_ae="WRONGAE")
    with pytest.raises(PacsError, match="credentials in the URL are refused"):
        fetch_dicomweb(f"http://u:p@127.0.0.1:{orthanc.http_port}/dicom-web", tmp_path / "c")


# ---------------------------------------------------------------- results back as DICOM SR


@pytest.fixture(scope="module")
def trained_bundle(web_run, tmp_path_factory):
    """A classifier bundle folder (the real configs, real weights) and its predictions CSV, written by the
    bundle's own ``write_predictions`` over the pseudonymised manifest's rows."""
    _run, manifest = web_run
    rows = read_manifest(manifest).head(8)  # paths resolved through the path map: the files predicted on
    bundle = tmp_path_factory.mktemp("bundle") / "finetune_classification"
    shutil.copytree(REPO / "bundles" / "finetune_classification" / "configs", bundle / "configs")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, len(CLASSES)))
    (bundle / "models").mkdir()
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    (bundle / "models" / "classes.json").write_text(json.dumps(list(CLASSES)))
    batches = [{"image": torch.randn(len(chunk), 1, 4, 4), "sop_uid": list(chunk["sop_uid"]),
                "patient_id": list(chunk["patient_id"])} for chunk in (rows.iloc[:5], rows.iloc[5:])]
    write_predictions(net, batches, list(CLASSES), bundle / "output" / "predictions.csv", sources=rows)
    return bundle, manifest


def test_sr_written_back_found_parsed_and_equal_to_predictions(trained_bundle, orthanc, salt, tmp_path, monkeypatch):
    import highdicom as hd

    bundle, manifest = trained_bundle
    monkeypatch.setenv("MEDSSL_DICOMWEB_USER", orthanc.auth[0])
    monkeypatch.setenv("MEDSSL_DICOMWEB_PASSWORD", orthanc.auth[1])
    out = tmp_path / "sr"
    assert cli(["-q", "results-to-dicom", "--bundle", str(bundle), "--manifest", str(manifest), "--out", str(out),
                "--stow", orthanc.dicomweb]) == 0
    preds = pd.read_csv(bundle / "output" / "predictions.csv", dtype={"sop_uid": str, "patient_id": str})
    table = pd.read_csv(out / "results.csv", dtype=str)
    assert len(table) == len(preds) == len(list(out.glob("*.dcm")))
    pz = Pseudonymizer.from_file(salt)
    sha = hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()
    by_pseudonym = preds.set_index("sop_uid")
    for row in table.to_dict("records"):  # by column name: class columns need not be identifiers
        found = orthanc.client.search_for_instances(search_filters={"SOPInstanceUID": row["sr_sop_uid"]})
        assert len(found) == 1  # QIDO-RS finds it in the PACS
        ds = orthanc.client.retrieve_instance(row["study_uid"], found[0]["0020000E"]["Value"][0], row["sr_sop_uid"])
        assert pydicom.dcmread(out / row["sr_file"]).SOPInstanceUID == ds.SOPInstanceUID
        sr = hd.sr.ComprehensiveSR.from_dataset(ds)
        group = sr.content.get_image_measurement_groups()[0]
        ref = group.source_images[0]
        src = orthanc.tree_headers[ref.referenced_sop_instance_uid]  # an original UID of the uploaded tree
        assert ref.referenced_sop_instance_uid == row["sop_uid"]
        pred = by_pseudonym.loc[pz.uid(ref.referenced_sop_instance_uid)]  # the pseudonym it was predicted as
        assert ds.StudyInstanceUID == row["study_uid"] == pydicom.dcmread(src["file"]).StudyInstanceUID
        assert pz.patient(ds.PatientID) == pred["patient_id"]
        values = {m.name.meaning.removeprefix("Probability of "): m.value for m in group.get_measurements()}
        assert values.keys() == set(CLASSES)
        for c in CLASSES:
            assert abs(values[c] - pred[f"prob_{c}"]) < 1e-9
        assert group.finding_type.meaning == pred["pred"]
        assert ds.ContentQualification == "RESEARCH" and "RESEARCH USE ONLY" in ds.SeriesDescription
        params = [str(i.TextValue) for i in ds.ContentSequence[-1].ContentSequence[0].ContentSequence
                  if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]
        assert f"weights sha256 {sha}" in params
        ev = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert ev.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == row["sop_uid"]
        assert ev.SeriesInstanceUID == row["series_uid"]


def test_results_refused_without_the_pseudonym_map(trained_bundle, tmp_path, capsys):
    bundle, manifest = trained_bundle
    copy = tmp_path / "manifest.csv"
    shutil.copy(manifest, copy)  # the manifest alone, without its private .pathmap.csv
    assert cli(["-q", "results-to-dicom", "--bundle", str(bundle), "--manifest", str(copy), "--out",
                str(tmp_path / "sr")]) == 1
    err = capsys.readouterr().err
    assert "pseudonym map" in err and "manifest.pathmap.csv" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sr").exists()


# ---------------------------------------------------------------- pipeline, and the credential nowhere


def test_pipeline_dicomweb_source_and_results_phase(orthanc, tree, trained_bundle, tmp_path, monkeypatch):
    for k, v in _env(orthanc).items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    cfg = {"_base": str(tmp_path), "data": {"dicomweb": {"url": orthanc.dicomweb, "download_workers": 2},
                                            "cohort": {"modality": "CR"}, "labels": str(tree["labels"])}}
    manifest = prepare_data(cfg, run)
    df = read_manifest(manifest, resolve_paths=False)
    expected = {pz for pz, h in ((Pseudonymizer.from_file(run / "data" / "salt.key").uid(u), h)
                                 for u, h in tree["headers"].items()) if h["Modality"] == "CR"}
    assert set(df["sop_uid"]) == expected and "split" in df.columns
    bad = {**cfg, "data": {"dicomweb": {"url": orthanc.dicomweb, "password": "x"}}}
    with pytest.raises(ValueError, match="must not be in a config"):
        prepare_data(bad, tmp_path / "bad")
    bundle, web_manifest = trained_bundle
    out = run_results_to_pacs({"stow": orthanc.dicomweb}, bundle, web_manifest, run, tmp_path)
    assert len(pd.read_csv(out / "results.csv")) == len(pd.read_csv(bundle / "output" / "predictions.csv"))
    assert oct(out.stat().st_mode & 0o777) == "0o700"
    # the credential appears nowhere in the run folders (manifests, maps, caches, SR, results)
    secret = orthanc.auth[1].encode()
    web_run_dir = web_manifest.parents[1]
    for folder in (run, web_run_dir, bundle):
        for f in folder.rglob("*"):
            if f.is_file():
                assert secret not in f.read_bytes(), f
