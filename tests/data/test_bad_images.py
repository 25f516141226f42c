"""Unreadable images at run time: skipped, listed by manifest key, fatal only past ``max_bad_images``; and a
pseudonymised pipeline whose run folder holds no original patient id, name, UID or path (issue 13, items 1
and 5).

The DICOM trees are generated here, laid out as ``<root>/<PatientID>/IMnnn`` (export folders named after
patients), indexed with pseudonymisation and split; files are then cut short or deleted, as happens when an
export changes after it was indexed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pydicom.uid import generate_uid

from medssl_monai.cli import main as cli
from medssl_monai.data import read_manifest
from medssl_monai.data.bad_images import BadImageLog, TooManyBadImagesError, max_bad_count
from medssl_monai.sample_data import synthetic_image, write_dicom

REPO = Path(__file__).resolve().parents[2]
PREFIX = "1.2.826.0.1.3680043.10.1431.77."


def make_tree(root: Path, n_patients: int = 8, per_patient: int = 2, size: int = 32) -> dict[str, list[str]]:
    """Patient-named folders with ``per_patient`` images each and a labels CSV; returns the originals that must
    never reach a pseudonymised run's outputs."""
    secrets: dict[str, list[str]] = {"ids": [], "names": [], "uids": [], "paths": []}
    labels = []
    for p in range(n_patients):
        pid, name = f"QX{p:02d}ID{7300 + p}", f"DOEFAMILY^JANE{p:02d}"
        study, series = (generate_uid(PREFIX, entropy_srcs=[pid, k]) for k in ("study", "series"))
        secrets["ids"].append(pid)
        secrets["names"].append(name)
        secrets["uids"] += [study, series]
        labels.append({"patient_id": pid, "label": ("normal", "nodule")[p % 2]})
        for i in range(per_patient):
            sop = generate_uid(PREFIX, entropy_srcs=[pid, str(i)])
            path = root / pid / f"IM{i:03d}"
            write_dicom(path, synthetic_image(p % 2, p, 100 * p + i, size), patient_id=pid, patient_name=name,
                        study_uid=study, series_uid=series, sop_uid=sop, instance_number=i + 1,
                        compress_rle=i == 1)  # cut short, encapsulated data makes pydicom warn "in file <path>"
            secrets["uids"].append(sop)
            secrets["paths"].append(str(path))
    pd.DataFrame(labels).to_csv(root.parent / "labels.csv", index=False)
    return secrets


def index_and_split(root: Path, manifest: Path) -> None:
    assert cli(["index", str(root), "--out", str(manifest), "--full", "--pseudonymize",
                str(manifest.parent / "salt.key"), "--labels", str(root.parent / "labels.csv")]) == 0
    assert cli(["split", str(manifest), "--fractions", "train=0.5,val=0.25,test=0.25", "--seed", "0"]) == 0


def truncate(path: Path, keep: float = 0.6) -> None:
    """Cut a file inside its pixel data (the header stays readable)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def run_bundle(bundle: str, config: str, dst: Path, *args: str) -> subprocess.CompletedProcess:
    import shutil

    root = dst / bundle
    if not root.exists():
        shutil.copytree(REPO / "bundles" / bundle, root, ignore=shutil.ignore_patterns("*.pt", "output"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(root), "--config_file",
                           str(root / "configs" / config), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def leaks(text: str, secrets: dict[str, list[str]]) -> list[str]:
    return [s for kind in ("ids", "names", "paths") for s in secrets[kind] if s in text]


@pytest.fixture
def damaged(tmp_path: Path) -> dict:
    """A pseudonymised, split manifest of 8 patients x 2 images; one training image of each of two patients is
    then cut short and deleted."""
    root = tmp_path / "export" / "dicom"
    secrets = make_tree(root)
    manifest = tmp_path / "data" / "manifest.csv"
    index_and_split(root, manifest)
    m = read_manifest(manifest)
    keys = read_manifest(manifest, resolve_paths=False)["path"]
    m["key"] = keys.to_numpy()
    train = m[m["split"] == "train"]
    cut = train[train["path"].str.endswith("IM001")].iloc[0]  # RLE
    gone = train[train["patient_id"] != cut["patient_id"]].iloc[0]
    truncate(Path(cut["path"]))
    Path(gone["path"]).unlink()
    val = m[m["split"] == "val"].iloc[0]
    return {"manifest": manifest, "secrets": secrets, "cut": cut, "gone": gone, "val": val, "rows": m}


MICLE = ("--max_epochs", "1", "--batch_size", "4", "--image_size", "32", "--in_channels", "1", "--backbone",
         "cbr_tiny", "--preset", "chest_xray", "--knn_interval", "1", "--log_interval", "1")


def test_micle_bundle_skips_unreadable_images_and_names_them_by_key(damaged: dict, tmp_path: Path) -> None:
    """MICLe pairs every image of a 2-image patient each epoch and the k-NN monitor caches all labelled train/val
    images at start-up: both meet the cut and the deleted file, skip them, and list them under their keys."""
    r = run_bundle("micle_medical", "train.json", tmp_path / "ok", "--manifest", str(damaged["manifest"]), *MICLE,
                   "--max_bad_images", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "ok" / "micle_medical" / "output"
    assert (tmp_path / "ok" / "micle_medical" / "models" / "model.pt").is_file()
    bad = pd.read_csv(out / "bad_images.csv", dtype=str)
    cut, gone = damaged["cut"]["key"], damaged["gone"]["key"]
    assert cut.startswith("pm:") and gone.startswith("pm:")
    for phase in ("train", "knn"):
        rows = bad[bad["phase"] == phase].set_index("key")
        assert set(rows.index) == {cut, gone}, (phase, bad)  # each once, nothing else
        assert "FileNotFoundError" in rows.loc[gone, "reason"]
        assert "pixel data" in rows.loc[cut, "reason"]  # pydicom's own message, now with the image's key
    log = (out / "train.log").read_text()
    assert f"skipped unreadable image {cut} (train)" in log and f"skipped unreadable image {gone} (knn)" in log
    assert log.count(f"skipped unreadable image {cut} (train)") == 1  # logged once
    assert f"End of file reached before delimiter (FFFE,E0DD) found in file {cut}" in log  # pydicom's warning
    for text in (log, r.stdout, r.stderr, (out / "bad_images.csv").read_text()):
        assert leaks(text, damaged["secrets"]) == []
        assert str(damaged["manifest"].parent.parent / "export") not in text

    # two bad images (of 8 training images): past max_bad_images=1 the run stops, saying why, still by key only
    r = run_bundle("micle_medical", "train.json", tmp_path / "strict", "--manifest", str(damaged["manifest"]),
                   *MICLE, "--max_bad_images", "1")
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "TooManyBadImagesError" in text and "more than max_bad_images=1 allows (1)" in text, text[-3000:]
    assert leaks(text + (tmp_path / "strict" / "micle_medical" / "output" / "train.log").read_text(),
                 damaged["secrets"]) == []
    assert not (tmp_path / "strict" / "micle_medical" / "models" / "model.pt").exists()


def test_finetune_validation_skips_an_unreadable_image(damaged: dict, tmp_path: Path) -> None:
    """Fine-tuning with a cut training image and a cut validation image: validation drops it, training
    replaces it, the run finishes and the validation metrics count only the readable images."""
    truncate(Path(damaged["val"]["path"]), keep=0.5)
    r = run_bundle("finetune_classification", "train.json", tmp_path, "--manifest", str(damaged["manifest"]),
                   "--max_epochs", "1", "--batch_size", "4", "--image_size", "32", "--in_channels", "1",
                   "--backbone", "cbr_tiny", "--max_bad_images", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = tmp_path / "finetune_classification"
    bad = pd.read_csv(root / "output" / "bad_images.csv", dtype=str)
    assert set(bad[bad["phase"] == "eval"]["key"]) == {damaged["val"]["key"]}
    assert set(bad[bad["phase"] == "train"]["key"]) <= {damaged["cut"]["key"], damaged["gone"]["key"]}
    assert (root / "models" / "model.pt").is_file()
    assert leaks((root / "output" / "train.log").read_text() + r.stdout + r.stderr, damaged["secrets"]) == []


def test_max_bad_images_counts_and_fractions(tmp_path: Path) -> None:
    assert [max_bad_count(x, 1000) for x in (0.01, 0.0001, 5, 0)] == [10, 1, 5, 0]
    with pytest.raises(ValueError):
        max_bad_count(-1, 10)
    log = BadImageLog("eval", total=100, path=tmp_path / "bad.csv", max_bad=2)
    assert [log.record("pm:a", "x"), log.record("pm:a", "x"), log.record("pm:b", "y")] == [1, 1, 2]
    with pytest.raises(TooManyBadImagesError, match=r"3 unreadable images in 'eval'.*pm:c: z"):
        log.record("pm:c", "z")
    rows = pd.read_csv(tmp_path / "bad.csv")
    assert list(rows["key"]) == ["pm:a", "pm:b", "pm:c"] and list(rows.columns[:3]) == ["key", "phase", "reason"]


def test_pseudonymised_pipeline_leaves_no_original_identifier_in_the_run_folder(tmp_path: Path) -> None:
    """The issue's privacy test: a pipeline over patient-named folders with a corrupted file finishes, and no
    file under the run folder (logs, TensorBoard events, configs, reports, CSVs, checkpoints: read as bytes)
    holds an original patient id, name, UID or path; only the private path map (mode 0600) maps keys back."""
    from medssl_monai.reporting.pipeline_report import run_pipeline_and_report

    root = tmp_path / "export" / "dicom"
    secrets = make_tree(root, n_patients=8, per_patient=2)
    cfg = {
        "_base": str(tmp_path), "run_dir": "@run",
        "data": {"dicom_root": "@export/dicom", "labels": "@export/labels.csv",
                 "split": {"train": 0.5, "val": 0.25, "test": 0.25}, "label_fractions": [1.0]},
        "common": {"backbone": "cbr_tiny", "image_size": 32, "in_channels": 1, "num_workers": 0},
        "phases": {},
    }
    run_pipeline_and_report(cfg)  # index + split only; then one image is cut short, as a changed export would be
    manifest = read_manifest(tmp_path / "run" / "data" / "manifest.csv")
    train = manifest[manifest["split"] == "train"]["path"]
    victim = train[train.str.endswith("IM001")].iloc[0]  # RLE: pydicom warns, naming the file
    truncate(Path(victim))
    cfg["phases"] = {"phase1": None, "micle": {"preset": "chest_xray", "max_epochs": 1, "batch_size": 4},
                     "finetune": {"max_epochs": 1, "batch_size": 4}, "evaluate": {"eval_split": "test"},
                     "predict": {"split": "test"}}
    roots = run_pipeline_and_report(cfg)
    run = tmp_path / "run"
    assert (run / "report" / "report.md").is_file()
    key = read_manifest(run / "data" / "manifest.csv", resolve_paths=False)["path"][manifest["path"] == victim].iloc[0]
    assert key in (roots["micle"] / "output" / "bad_images.csv").read_text()
    assert f"in file {key}" in (run / "logs" / "micle.log").read_text()
    pathmap = run / "data" / "manifest.pathmap.csv"
    assert pathmap.stat().st_mode & 0o077 == 0
    needles = {s.encode() for kind in ("ids", "names", "uids", "paths") for s in secrets[kind]}
    needles |= {str(root).encode(), str(Path(victim).relative_to(root)).encode()}
    checked, found = 0, []
    for f in run.rglob("*"):
        if not f.is_file() or f == pathmap:
            continue
        data = f.read_bytes()
        checked += 1
        found += [(str(f.relative_to(run)), n.decode()) for n in needles if n in data]
    assert checked > 30 and found == []
    assert any(n in pathmap.read_bytes() for n in needles)  # the check would see them: they exist on disk
