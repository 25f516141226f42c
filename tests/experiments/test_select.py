"""``medssl select`` end to end on the generated sample DICOM, pseudonymised: whole patients, nested split
columns, a worklist whose original UIDs round-trip through the path map, the embedding cache, and a
selection split that trains through the unchanged fine-tune bundle."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from medssl_monai.cli import main as cli
from medssl_monai.data import Pseudonymizer, index_tree, read_manifest
from medssl_monai.data.labels import read_labels
from medssl_monai.data.manifest import pathmap_path, read_path_map
from medssl_monai.experiments.select import embed_manifest, select_manifest
from medssl_monai.ingest import split_manifest
from medssl_monai.networks import get_backbone
from medssl_monai.sample_data import make_sample_data
from medssl_monai.selection import budget_count

REPO = Path(__file__).resolve().parents[2]
SALT = b"0123456789abcdef-select-salt"
ARCH = {"backbone": "cbr_tiny", "in_channels": 1, "image_size": 32}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("select")
    make_sample_data(tmp / "sample", n_patients=12, size=32)
    manifest = tmp / "data" / "manifest.csv"
    index_tree(tmp / "sample" / "dicom", manifest, pseudonymizer=Pseudonymizer(SALT),
               labels=read_labels(tmp / "sample" / "labels.csv"), label_key="patient_id", label_column="label")
    split_manifest(manifest, {"train": 0.6, "val": 0.4}, None, seed=0)
    torch.manual_seed(0)
    ckpt = tmp / "model.pt"
    torch.save(get_backbone("cbr_tiny", in_channels=1).state_dict(), ckpt)
    return {"tmp": tmp, "manifest": manifest, "ckpt": ckpt}


def test_worklist_whole_patients_nested_columns_and_original_uids(data: dict, tmp_path: Path) -> None:
    manifest, ckpt = data["manifest"], data["ckpt"]
    result = select_manifest(manifest, ckpt, tmp_path / "sel", fractions=[0.3, 0.6], strategy="typiclust", **ARCH)
    raw = read_manifest(manifest, resolve_paths=False)
    train = raw[raw["split"] == "train"]
    n = train["patient_id"].nunique()
    copy = read_manifest(result.manifest, resolve_paths=False)
    assert list(copy["sop_uid"]) == list(raw["sop_uid"])
    small, large = copy["labeled_30pct"].astype(bool), copy["labeled_60pct"].astype(bool)
    assert (small <= large).all() and not (large & (copy["split"] != "train")).any()  # nested, pool only
    for col, f in (("labeled_30pct", 0.3), ("labeled_60pct", 0.6)):
        chosen = copy.loc[copy[col].astype(bool), "patient_id"].unique()
        assert len(chosen) == budget_count(n, fraction=f)
        # whole patients: every train image of a chosen patient is marked
        assert copy.loc[copy["patient_id"].isin(chosen) & (copy["split"] == "train"), col].astype(bool).all()
    assert list(dict.fromkeys(result.order)) == result.order and len(result.order) == budget_count(n, fraction=0.6)
    # the copy resolves to the same images through its own (copied, private) path map
    assert list(read_manifest(result.manifest)["path"]) == list(read_manifest(manifest)["path"])
    assert stat.S_IMODE(pathmap_path(result.manifest).stat().st_mode) == 0o600

    wl = pd.read_csv(result.worklist, dtype=str)
    assert wl["rank"].astype(int).is_monotonic_increasing
    assert list(dict.fromkeys(wl["group"])) == result.order
    for g, rows in wl.groupby("group"):  # never a split patient
        assert set(rows["sop_uid"]) == set(train.loc[train["patient_id"] == g, "sop_uid"])
    assert set(wl.loc[wl["first_budget"] == "labeled_30pct", "group"]) == set(result.order[:budget_count(n, fraction=0.3)])
    assert wl["path"].str.startswith("pm:").all()
    text = result.worklist.read_text()
    assert str(data["tmp"]) not in text and "SMP0" not in text  # no real path, no original patient id

    # original UIDs, checked independently: path map -> file -> header, and the salt's pseudonyms
    uids = pd.read_csv(result.worklist_uids, dtype=str)
    assert stat.S_IMODE(result.worklist_uids.stat().st_mode) == 0o600
    assert list(uids["sop_uid"]) == list(wl["sop_uid"])
    files = read_path_map(pathmap_path(manifest))
    pz = Pseudonymizer(SALT)
    for r in uids.itertuples():
        ds = pydicom.dcmread(files[r.path], stop_before_pixels=True)
        assert (r.original_study_uid, r.original_series_uid, r.original_sop_uid) == (
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert pz.uid(r.original_sop_uid) == r.sop_uid and pz.uid(r.original_study_uid) == r.study_uid
        assert r.original_sop_uid not in text


def test_same_seed_same_worklist_cached_embedding_and_study_level(data: dict, tmp_path: Path) -> None:
    manifest, ckpt = data["manifest"], data["ckpt"]
    cache = tmp_path / "cache"
    a = select_manifest(manifest, ckpt, tmp_path / "a", budgets=[3], strategy="kcenter", seed=5, cache_dir=cache, **ARCH)
    assert len(list(cache.glob("embeddings-*.npz"))) == 1
    b = select_manifest(manifest, ckpt, tmp_path / "b", budgets=[3], strategy="kcenter", seed=5, cache_dir=cache, **ARCH)
    assert a.worklist.read_bytes() == b.worklist.read_bytes()
    keys, feats = embed_manifest(manifest, ckpt, cache_dir=cache, **ARCH)
    fresh_keys, fresh = embed_manifest(manifest, ckpt, **ARCH)  # no cache: computed again
    assert keys == fresh_keys and np.allclose(feats, fresh, atol=1e-5)
    raw = read_manifest(manifest, resolve_paths=False)
    assert keys == list(raw.loc[raw["split"] == "train", "path"])  # pool rows, manifest order
    torch.save({k: v + 0.01 for k, v in torch.load(ckpt, weights_only=True).items()}, tmp_path / "other.pt")
    embed_manifest(manifest, tmp_path / "other.pt", cache_dir=cache, **ARCH)
    assert len(list(cache.glob("embeddings-*.npz"))) == 2  # keyed by the checkpoint's checksum

    s = select_manifest(manifest, ckpt, tmp_path / "s", budgets=[2], level="study", strategy="random", seed=1,
                        cache_dir=cache, **ARCH)
    wl = pd.read_csv(s.worklist, dtype=str)
    assert wl["study_uid"].nunique() == 2 and set(wl["group"]) == set(wl["study_uid"])
    train = raw[raw["split"] == "train"]
    for g, rows in wl.groupby("study_uid"):
        assert set(rows["sop_uid"]) == set(train.loc[train["study_uid"] == g, "sop_uid"])


def test_cli_and_its_one_line_errors(data: dict, tmp_path: Path, capsys) -> None:
    args = ["select", str(data["manifest"]), "--checkpoint", str(data["ckpt"]), "--backbone", "cbr_tiny",
            "--in-channels", "1", "--image-size", "32", "--out-dir", str(tmp_path / "o"), "--strategy", "random"]
    assert cli(["-q", *args, "--budget", "1,2", "--stratify", "modality"]) == 0
    out = capsys.readouterr().out
    assert "label_fraction=" in out and "worklist_uids.csv" in out
    for extra, msg in ((["--budget", "999"], "exceeds the"), (["--budget", "x"], "--budget: 'x' is not"),
                       (["--fraction", "0.1", "--stratify", "nope"], "stratify: column(s) ['nope']"),
                       (["--fraction", "0.1", "--level", "study", "--checkpoint", str(tmp_path / "none.pt")],
                        "none.pt: checkpoint not found")):
        assert cli(["-q", *args, *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("medssl select: error: ") and msg in err and len(err.splitlines()) == 1


def test_selected_split_trains_through_the_unchanged_finetune_bundle(data: dict, tmp_path: Path) -> None:
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = select_manifest(data["manifest"], data["ckpt"], tmp_path / "sel", budgets=[3], strategy="typiclust",
                             **ARCH)
    spec = result.budgets[0]
    bundle = tmp_path / "finetune_classification"
    shutil.copytree(REPO / "bundles" / "finetune_classification", bundle,
                    ignore=shutil.ignore_patterns("*.pt", "output"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(bundle), "--config_file",
                        str(bundle / "configs" / "train.json"), "--manifest", str(result.manifest),
                        "--label_fraction", str(spec["label_fraction"]), "--pretrained_ckpt", str(data["ckpt"]),
                        "--backbone", "cbr_tiny", "--in_channels", "1", "--image_size", "32", "--max_epochs", "1",
                        "--batch_size", "2", "--progress_bar", "False", "--device", "cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    log = (bundle / "output" / "train.log").read_text()
    assert f"using the shipped column '{spec['column']}'" in log
    copy = read_manifest(result.manifest, resolve_paths=False)
    n_train = int((copy[spec["column"]].astype(bool) & copy["label"].notna()).sum())
    assert n_train == len(pd.read_csv(result.worklist))  # the worklist is what trains
    acc = EventAccumulator(str(bundle / "output" / "tensorboard"))
    acc.Reload()
    assert len(acc.Scalars("train_loss")) == -(-n_train // 2)  # one epoch over exactly the selected images
    assert (bundle / "models" / "model.pt").is_file()
