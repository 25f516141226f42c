"""Results back to the PACS (``medssl results-to-dicom``): any class name, deterministic SR identity, the source
files proven, and the whole input checked before anything is written -- against a real Orthanc on 127.0.0.1.

The predictions CSV is written by the bundle's own ``write_predictions``; the values read back from the PACS
are compared with that CSV as read by Python's ``csv`` module (not the pandas reader the command uses).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pydicom
import pytest
import torch
from orthanc_server import start_orthanc

from medssl_monai.bundle.run import write_predictions
from medssl_monai.cli import main as cli
from medssl_monai.data import index_tree, read_manifest
from medssl_monai.reporting.dicom_sr import derived_uid, sr_uids
from medssl_monai.sample_data import make_sample_data

REPO = Path(__file__).resolve().parents[2]
#: finding names as clinicians write them: hyphens, spaces, dots, commas, brackets, leading digits,
#: non-ASCII letters, and words pandas would read as missing values
CLASSES = ["COVID-19", "No Finding", "E.Coli", "1st-degree (mild)", "Ödem", "a, b [c]", "NA", "Отёк лёгких"]
N_PRED = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small DICOM tree (3 patients) in a private Orthanc, its folder manifest, a trained classifier bundle
    with the class names above, and that bundle's predictions over 6 images (with their source record)."""
    from dicomweb_client import DICOMwebClient

    from medssl_monai.pacs.credentials import Credentials, make_session

    root = tmp_path_factory.mktemp("r2d")
    make_sample_data(root / "sample", n_patients=3, size=16)
    manifest = root / "manifest.csv"
    index_tree(root / "sample" / "dicom", manifest)
    rows = read_manifest(manifest)
    rows = rows[rows["patient_id"].str.startswith("SMP") & (rows["modality"] != "OT")].head(N_PRED)
    assert rows["patient_id"].nunique() >= 2 and len(rows) == N_PRED
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        client = DICOMwebClient(server.dicomweb, session=make_session(Credentials("basic", *server.auth)))
        client.store_instances([pydicom.dcmread(p) for p in rows["path"]])
        server.client = client
        bundle = root / "bundle"
        shutil.copytree(REPO / "bundles" / "finetune_classification" / "configs", bundle / "configs")
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, len(CLASSES)))
        (bundle / "models").mkdir()
        torch.save(net.state_dict(), bundle / "models" / "model.pt")
        (bundle / "models" / "classes.json").write_text(json.dumps(CLASSES, ensure_ascii=False), encoding="utf-8")
        batches = [{"image": torch.randn(len(c), 1, 4, 4), "sop_uid": list(c["sop_uid"]),
                    "patient_id": list(c["patient_id"])} for c in (rows.iloc[:4], rows.iloc[4:])]
        preds = bundle / "output" / "predictions.csv"
        write_predictions(net, batches, CLASSES, preds, sources=rows)
        yield {"root": root, "manifest": manifest, "rows": rows, "bundle": bundle, "preds": preds, "server": server}
    finally:
        server.stop()


@pytest.fixture
def auth_env(world, monkeypatch):
    monkeypatch.setenv("MEDSSL_DICOMWEB_USER", world["server"].auth[0])
    monkeypatch.setenv("MEDSSL_DICOMWEB_PASSWORD", world["server"].auth[1])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _copy_predictions(world, dest: Path) -> Path:
    """The predictions CSV and its source record, copied side by side (the record goes with its CSV)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(world["preds"], dest / "predictions.csv")
    shutil.copy(world["preds"].with_name("predictions.sources.csv"), dest / "predictions.sources.csv")
    return dest / "predictions.csv"


def _results(world, out: Path, predictions: Path | None = None, stow: bool = False) -> int:
    args = ["-q", "results-to-dicom", "--bundle", str(world["bundle"]), "--manifest", str(world["manifest"]),
            "--out-dir", str(out)]
    if predictions is not None:
        args += ["--predictions", str(predictions)]
    if stow:
        args += ["--stow", world["server"].dicomweb]
    return cli(args)


def _sr_count(server) -> int:
    return sum(1 for i in server.rest("GET", "/instances?expand") if i["MainDicomTags"].get("SOPInstanceUID", "")
               .startswith("2.25."))


# ---------------------------------------------------------------- any class name, end to end, twice


def test_any_class_name_round_trips_and_a_resend_replaces(world, auth_env, tmp_path, capsys):
    import highdicom as hd

    server = world["server"]
    header = next(csv.reader(open(world["preds"], newline="", encoding="utf-8")))
    assert header == ["sop_uid", "patient_id", *(f"prob_{c}" for c in CLASSES), "pred"]
    expected = {r["sop_uid"]: r for r in _read_csv(world["preds"])}
    before = len(server.rest("GET", "/instances"))
    out = tmp_path / "sr"
    assert _results(world, out, stow=True) == 0
    assert f"sent (STOW-RS):        {N_PRED} (0 already" in capsys.readouterr().out
    assert len(server.rest("GET", "/instances")) == before + N_PRED

    keyed = _read_csv(out / "results.csv")
    assert [k.removeprefix("prob_") for k in keyed[0] if k.startswith("prob_")] == CLASSES
    sha = hashlib.sha256((world["bundle"] / "models" / "model.pt").read_bytes()).hexdigest()
    for row in keyed:
        want = expected[row["sop_uid"]]  # a plain manifest: the predicted id is the original UID
        src = pydicom.dcmread(world["rows"].set_index("sop_uid").loc[row["sop_uid"], "path"])
        assert row["study_uid"] == src.StudyInstanceUID and row["pred"] == want["pred"]
        for c in CLASSES:
            assert float(row[f"prob_{c}"]) == float(want[f"prob_{c}"])
        # QIDO-RS finds it, WADO-RS returns it, and its content equals the predictions CSV
        found = server.client.search_for_instances(search_filters={"SOPInstanceUID": row["sr_sop_uid"]})
        assert len(found) == 1
        ds = server.client.retrieve_instance(row["study_uid"], found[0]["0020000E"]["Value"][0], row["sr_sop_uid"])
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
        assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.PatientName == src.PatientName
        assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == sr_uids(src.StudyInstanceUID, src.SOPInstanceUID, sha)
        group = hd.sr.ComprehensiveSR.from_dataset(ds).content.get_image_measurement_groups()[0]
        assert group.source_images[0].referenced_sop_instance_uid == src.SOPInstanceUID
        values = {m.name.value: m for m in group.get_measurements()}
        assert sorted(values) == sorted(f"P{i}" for i in range(len(CLASSES)))
        for i, c in enumerate(CLASSES):
            assert values[f"P{i}"].name.meaning == f"Probability of {c}"
            assert abs(values[f"P{i}"].value - float(want[f"prob_{c}"])) < 1e-9
        assert group.finding_type.meaning == want["pred"]
        assert group.finding_type.value == f"C{CLASSES.index(want['pred'])}"

    # the same results again, from a fresh folder: the same UIDs, and still one SR per prediction
    out2 = tmp_path / "sr2"
    assert _results(world, out2, stow=True) == 0
    assert f"sent (STOW-RS):        {N_PRED} ({N_PRED} already held" in capsys.readouterr().out
    assert [r["sr_sop_uid"] for r in _read_csv(out2 / "results.csv")] == [r["sr_sop_uid"] for r in keyed]
    assert len(server.rest("GET", "/instances")) == before + N_PRED
    assert _sr_count(server) == N_PRED


def test_sr_uids_are_uuid_derived_and_named_by_their_inputs():
    uid = derived_uid("a", "b")
    assert uid == derived_uid("a", "b") and uid.startswith("2.25.") and len(uid) <= 64
    u = uuid.UUID(int=int(uid.removeprefix("2.25.")))
    assert u.version == 8 and u.variant == uuid.RFC_4122
    # the first 128 bits of SHA-256 of the parts, apart from the 6 version/variant bits
    digest = int.from_bytes(hashlib.sha256(b"a\x1fb").digest()[:16], "big")
    mask = ~((0xF << 76) | (0x3 << 62)) & (2**128 - 1)
    assert u.int & mask == digest & mask
    assert derived_uid("ab", "") != derived_uid("a", "b")
    series, sop = sr_uids("1.2.3", "1.2.3.4", "f" * 64)
    assert (series, sop) == sr_uids("1.2.3", "1.2.3.4", "f" * 64)
    assert sr_uids("1.2.3", "1.2.3.4", "e" * 64)[1] != sop  # other weights: another SR
    assert sr_uids("1.2.3", "1.2.3.5", "f" * 64) == (series, sr_uids("1.2.3", "1.2.3.5", "f" * 64)[1]) \
        and sr_uids("1.2.3", "1.2.3.5", "f" * 64)[1] != sop  # same study and weights: same results series


def test_orthanc_keeps_the_first_copy_of_a_resent_sop_instance_uid_unless_told_to_overwrite(world, tmp_path):
    """What docs/pacs.md says Orthanc does, observed: the re-send is answered as stored either way."""
    from dicomweb_client import DICOMwebClient

    from medssl_monai.pacs.credentials import Credentials, make_session

    src = pydicom.dcmread(world["rows"]["path"].iloc[0])
    for overwrite in (False, True):
        server = start_orthanc(tmp_path / f"o{overwrite}", options={"OverwriteInstances": overwrite})
        try:
            client = DICOMwebClient(server.dicomweb, session=make_session(Credentials("basic", *server.auth)))
            for desc in ("first", "second"):
                src.SeriesDescription = desc
                answer = client.store_instances([src])
                assert "FailedSOPSequence" not in answer or not answer.FailedSOPSequence
                assert answer.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
            assert len(server.rest("GET", "/instances")) == 1
            kept = client.search_for_instances(search_filters={"SOPInstanceUID": src.SOPInstanceUID},
                                               fields=["SeriesDescription"])[0]["0008103E"]["Value"][0]
            assert kept == ("second" if overwrite else "first")
        finally:
            server.stop()


# ---------------------------------------------------------------- the source files, proven


def test_swapped_source_files_are_refused_naming_how_many(world, tmp_path, capsys):
    """Two source files of different patients swap contents after predicting (a re-export re-using names)."""
    rows = world["rows"]
    a, b = (rows[rows["patient_id"] == p].iloc[0] for p in rows["patient_id"].unique()[:2])
    tree = world["root"] / "sample" / "dicom"
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    manifest = tmp_path / "manifest.csv"
    index_tree(copy, manifest)  # the same instances, found in the copy
    fa, fb = (copy / Path(r["path"]).relative_to(tree) for r in (a, b))
    da, db = fa.read_bytes(), fb.read_bytes()
    fa.write_bytes(db)
    fb.write_bytes(da)
    out = tmp_path / "sr"
    args = ["-q", "results-to-dicom", "--bundle", str(world["bundle"]), "--manifest", str(manifest), "--out", str(out),
            "--predictions", str(_copy_predictions(world, tmp_path / "p"))]
    assert cli(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"2 of {N_PRED} source file(s) no longer hold the image" in err and "2 hold another instance" in err
    assert not out.exists()
    # swapped back: accepted; one file's pixels edited in place (same UID): refused as changed content
    fa.write_bytes(da)
    fb.write_bytes(db)
    ds = pydicom.dcmread(fa)
    ds.PatientComments = "edited"
    ds.save_as(fa)
    assert cli(args) == 1
    assert "1 of 6 source file(s)" in capsys.readouterr().err and not out.exists()
    fa.write_bytes(da)
    assert cli(args) == 0 and len(list(out.glob("*.dcm"))) == N_PRED


def test_predictions_without_their_source_record_are_refused(world, tmp_path, capsys):
    preds = _copy_predictions(world, tmp_path / "p")
    preds.with_name("predictions.sources.csv").unlink()
    assert _results(world, tmp_path / "sr", preds) == 1
    err = capsys.readouterr().err
    assert "predictions.sources.csv: no record of the files" in err and not (tmp_path / "sr").exists()


# ---------------------------------------------------------------- the whole input first, nothing written else


def _edited(world, tmp_path, edit) -> Path:
    preds = _copy_predictions(world, tmp_path / "p")
    rows = _read_csv(preds)
    rows = edit(rows) or rows
    _write_csv(preds, rows)
    return preds


def _set(row: int, column: str, value: str):
    def edit(rows):
        rows[row - 1][column] = value
    return edit


def _rename(old: str, new: str):
    def edit(rows):
        return [{(new if k == old else k): v for k, v in r.items()} for r in rows]
    return edit


def _add_column(name: str):
    def edit(rows):
        return [{**r, name: "x"} for r in rows]
    return edit


def _shift_mass(row: int):
    def edit(rows):  # move the predicted class's probability to another class: pred no longer the argmax
        r = rows[row - 1]
        other = next(c for c in CLASSES if c != r["pred"])
        r[f"prob_{other}"], r[f"prob_{r['pred']}"] = r[f"prob_{r['pred']}"], r[f"prob_{other}"]
        if r[f"prob_{other}"] == r[f"prob_{r['pred']}"]:
            r[f"prob_{other}"] = "1.000000"
    return edit


def _duplicate(row: int, of: int):
    def edit(rows):
        rows[row - 1]["sop_uid"] = rows[of - 1]["sop_uid"]
    return edit


CASES = {
    "empty prediction in row 4": (_set(4, "pred", ""), "row 4 (line 5) column 'pred': empty prediction"),
    "class not in the bundle": (_rename("prob_E.Coli", "prob_E. coli"),
                                "its classes differ from the bundle's models/classes.json"),
    "unknown column": (_add_column("comment"), "unknown column 'comment'"),
    "probability above 1": (_set(2, "prob_No Finding", "1.5"),
                            "row 2 (line 3) column 'prob_No Finding': 1.5 is not a probability in [0, 1]"),
    "negative probability": (_set(3, "prob_Ödem", "-0.1"), "row 3 (line 4) column 'prob_Ödem': -0.1 is not"),
    "nan": (_set(1, "prob_NA", "nan"), "row 1 (line 2) column 'prob_NA': nan is not a probability"),
    "inf": (_set(5, "prob_COVID-19", "inf"), "row 5 (line 6) column 'prob_COVID-19': inf is not"),
    "empty probability": (_set(6, "prob_a, b [c]", ""), "row 6 (line 7) column 'prob_a, b [c]': empty, not a"),
    "sum not 1": (_set(2, "prob_1st-degree (mild)", "0.999999"), "row 2 (line 3): the probabilities sum to"),
    "pred not a class": (_set(1, "pred", "Edema"), "row 1 (line 2) column 'pred': 'Edema' is not one of"),
    "pred not the most probable": (_shift_mass(3), "row 3 (line 4) column 'pred'"),
    "same image twice": (_duplicate(5, 2), "row 5 (line 6) column 'sop_uid': the image of row 2 again"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_whole_and_nothing_is_written_or_sent(case, world, auth_env, tmp_path, capsys):
    edit, message = CASES[case]
    preds = _edited(world, tmp_path, edit)
    before = world["server"].rest("GET", "/instances")
    out = tmp_path / "sr"
    assert _results(world, out, preds, stow=True) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"medssl results-to-dicom: error: {preds}")
    assert message in err, err
    assert not out.exists()  # no SR file, no results.csv
    assert world["server"].rest("GET", "/instances") == before  # nothing sent


def test_bundle_classes_that_cannot_be_dicom_code_meanings_are_refused(world, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(world["bundle"], bundle)
    for bad in (["a\\b", "c"], ["x" * 65, "c"]):
        (bundle / "models" / "classes.json").write_text(json.dumps(bad))
        assert cli(["-q", "results-to-dicom", "--bundle", str(bundle), "--manifest", str(world["manifest"]),
                    "--out", str(tmp_path / "sr")]) == 1
        assert "cannot be a DICOM code meaning" in capsys.readouterr().err
    (bundle / "models" / "classes.json").write_text(json.dumps(CLASSES))
    (bundle / "models" / "architecture.json").write_text(json.dumps({"multi_label": True}))
    assert cli(["-q", "results-to-dicom", "--bundle", str(bundle), "--manifest", str(world["manifest"]),
                "--out", str(tmp_path / "sr")]) == 1
    assert "a multi-label classifier" in capsys.readouterr().err
    (bundle / "models" / "classes.json").unlink()
    assert cli(["-q", "results-to-dicom", "--bundle", str(bundle), "--manifest", str(world["manifest"]),
                "--out", str(tmp_path / "sr")]) == 1
    assert "has no trained classes" in capsys.readouterr().err and not (tmp_path / "sr").exists()
