"""Predict sets (a user's new images, the blind test set): ``medssl predict`` on a folder and on an id + path
CSV names every image once, maps each id to its own image, and writes probabilities that sum to 1."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medssl_monai.bundle.locate import bundle_path
from medssl_monai.cli import main as cli
from medssl_monai.data import table_to_manifest, write_manifest
from medssl_monai.experiments.predict import predict_set_manifest, predictions_table
from medssl_monai.experiments.runner import run_bundle

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A fine-tuning bundle trained for one epoch on HAM10000's ``mini`` subset (tiny CBR, 32 px)."""
    from conftest import require_data

    ham = require_data("ham10000")
    tmp = tmp_path_factory.mktemp("predict")
    table = pd.read_csv(ham / "metadata.csv", dtype=str)
    table = table[table["mini"].str.lower() == "true"]
    manifest = table_to_manifest(table, group_col="lesion_id", label_col="dx", instance_col="image_id", root=ham)
    write_manifest(manifest, tmp / "manifest.csv")
    root = tmp / "bundle" / "finetune_classification"
    run_bundle(bundle_path("finetune_classification"), "train.json", root,
               {"manifest": str(tmp / "manifest.csv"), "backbone": "cbr_tiny", "image_size": 32, "in_channels": 3,
                "max_epochs": 1, "batch_size": 32, "num_workers": 0}, tmp, "ft", root / "models" / "model.pt")
    return root, ham, tmp


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={0: str}, compression="infer")


def test_folder_and_csv_predictions_agree_image_by_image(trained, tmp_path):
    root, ham, _ = trained
    images = sorted((ham / "images").rglob("*.jpg"))[:9] if (ham / "images").is_dir() else []
    if not images:
        meta = pd.read_csv(ham / "metadata.csv", dtype=str).head(9)
        images = [ham / p for p in meta["path"]]
    folder = tmp_path / "new_images"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(images):  # one in a sub-folder: ids are relative paths without the suffix
        shutil.copy(p, (folder / "sub" if i == 0 else folder) / f"img{i}.jpg")
    (folder / ".hidden.jpg").write_bytes(b"not an image")  # hidden files are not images of the set
    out_dir = tmp_path / "by_folder.csv"
    assert cli(["-q", "predict", str(root), str(folder), "--out", str(out_dir)]) == 0
    by_folder = _read(out_dir)
    assert sorted(by_folder["image_id"]) == sorted(["sub/img0"] + [f"img{i}" for i in range(1, len(images))])
    # the same images under shuffled ids in a CSV (relative paths, resolved against the CSV's folder)
    rng = np.random.default_rng(0)
    ids = [f"x{k:02d}" for k in rng.permutation(len(images))]
    rel = ["sub/img0.jpg"] + [f"img{i}.jpg" for i in range(1, len(images))]
    pd.DataFrame({"blind_id": ids, "path": rel}).to_csv(folder / "images.csv", index=False)
    out_csv = tmp_path / "by_csv.csv.gz"
    assert cli(["-q", "predict", str(root), str(folder / "images.csv"), "--out", str(out_csv)]) == 0
    with gzip.open(out_csv) as fh:
        assert fh.read(9) == b"blind_id,"
    by_csv = _read(out_csv).set_index("blind_id")
    classes = json.loads((root / "models" / "classes.json").read_text())
    assert set(classes) <= set(HAM_CLASSES) and len(classes) >= 2
    cols = [f"prob_{c}" for c in classes]
    assert list(by_csv.columns) == cols and len(by_csv) == len(images) and by_csv.index.is_unique
    np.testing.assert_allclose(by_csv[cols].sum(axis=1), 1.0, atol=1e-3)
    folder_ids = ["sub/img0"] + [f"img{i}" for i in range(1, len(images))]
    by_image = by_folder.set_index("image_id")
    for k, (blind_id, image_id) in enumerate(zip(ids, folder_ids)):
        assert by_csv.loc[blind_id, cols].tolist() == pytest.approx(by_image.loc[image_id, cols].tolist(), abs=1e-9), k
    # probabilities differ between images (a mapping bug that gave every id one image's row would pass above
    # only if the images were identical)
    assert by_csv[cols].round(4).drop_duplicates().shape[0] > 1


def test_predict_set_refuses_repeated_ids_and_partial_predictions(tmp_path):
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    pd.DataFrame({"blind_id": ["b1", "b1"], "path": ["a.png", "a.png"]}).to_csv(tmp_path / "i.csv", index=False)
    with pytest.raises(ValueError, match="more than once"):
        predict_set_manifest(tmp_path / "i.csv", tmp_path / "m.csv")
    pd.DataFrame({"sop_uid": ["b1"], "prob_a": [0.2], "prob_b": [0.8]}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(ValueError, match="without a prediction"):
        predictions_table(tmp_path / "p.csv", "blind_id", ["a", "b"], expected_ids=["b1", "b2"])
    with pytest.raises(ValueError, match="prob_c"):
        predictions_table(tmp_path / "p.csv", "blind_id", ["a", "c"])
    table = predictions_table(tmp_path / "p.csv", "blind_id", ["a", "b"], expected_ids=["b1"])
    assert table.to_dict("records") == [{"blind_id": "b1", "prob_a": 0.2, "prob_b": 0.8}]
