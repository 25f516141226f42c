"""The MONAI Label app's parts that need no MONAI Label: label convention, datastore manifest, train overrides,
the app folder. The real server round trip is tests/test_monai_label.py."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest

from medssl_monai.bundle.finetune import ARCHITECTURE_DEFAULTS
from medssl_monai.bundle.monai_label import (
    APP_SOURCE,
    VAL_EVERY,
    datastore_manifest,
    embedding_settings,
    label_from,
    make_private,
    read_labels,
    save_label,
    train_args,
    write_monai_label_app,
)
from medssl_monai.bundle.overrides import load_bundle_config, unknown_override

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "finetune_classification"


def test_label_comes_from_params_or_the_uploaded_json(tmp_path: Path) -> None:
    f = tmp_path / "label.json"
    f.write_text(json.dumps({"label": "No Finding"}))
    assert label_from({"label": " COVID-19 "}, f) == "COVID-19"  # params win over the file
    assert label_from({}, f) == "No Finding"
    f.write_text("not json")
    for info in ({}, {"label": ""}, {"label": 3}):
        with pytest.raises(ValueError, match="params"):
            label_from(info, f)


def test_saved_labels_are_private_and_replace_earlier_ones(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "classification_labels.json"
    save_label(path, "1.2.3", "effusion", {"split": "val", "user": "rad1", "other": "dropped"})
    save_label(path, "1.2.4", "normal", {})
    save_label(path, "1.2.3", "normal", {"user": "rad2"})
    labels = read_labels(path)
    assert {k: v["label"] for k, v in labels.items()} == {"1.2.3": "normal", "1.2.4": "normal"}
    assert labels["1.2.3"].get("user") == "rad2" and "split" not in labels["1.2.3"] and "other" not in labels["1.2.3"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="split"):
        save_label(path, "1.2.5", "normal", {"split": "test"})


def test_make_private_closes_an_existing_tree(tmp_path: Path) -> None:
    (tmp_path / "c" / "a" / "b").mkdir(parents=True, mode=0o755)
    (tmp_path / "c" / "a" / "x.dcm").write_bytes(b"x")
    os.chmod(tmp_path / "c" / "a" / "x.dcm", 0o644)
    make_private(tmp_path / "c")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "c", *(tmp_path / "c").rglob("*")]}
    assert modes == {"c": 0o700, "a": 0o700, "b": 0o700, "x.dcm": 0o600}


def test_datastore_manifest_splits_and_skips_unlisted_images() -> None:
    ids = [f"1.2.840.{i}" for i in range(40)]
    labels = {i: {"label": "a" if k % 2 else "b"} for k, i in enumerate(ids)}
    labels["1.2.840.0"]["split"] = "val"
    labels["9.9.9"] = {"label": "a"}  # labelled, but no longer in the datastore (search filter, deleted)
    df = datastore_manifest(labels, {i: f"/cache/{i}" for i in ids})
    assert sorted(df["series_uid"]) == sorted(ids) and list(df["path"]) == [f"/cache/{i}" for i in df["series_uid"]]
    assert df.set_index("series_uid").loc["1.2.840.0", "split"] == "val"
    n_val = int((df["split"] == "val").sum())
    assert 1 <= n_val < len(ids) and abs(n_val - len(ids) / VAL_EVERY) <= len(ids) / VAL_EVERY  # ~1 in 5
    assert datastore_manifest(labels, {i: "p" for i in ids}).equals(datastore_manifest(labels, {i: "p" for i in ids}))
    # two images: one trains, one validates, whatever the hash says
    for pair in ({"x": {"label": "a", "split": "train"}, "y": {"label": "b", "split": "train"}},
                 {"x": {"label": "a", "split": "val"}, "y": {"label": "b", "split": "val"}}):
        assert sorted(datastore_manifest(pair, {"x": "p", "y": "q"})["split"]) == ["train", "val"]
    with pytest.raises(ValueError, match="tag=classification"):
        datastore_manifest({"9.9.9": {"label": "a"}}, {"1": "p"})


def test_train_args_keep_the_recorded_architecture_and_name_only_train_json_keys(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    (bundle / "models").mkdir(parents=True)
    arch = {**ARCHITECTURE_DEFAULTS, "backbone": "cbr_tiny", "in_channels": 1, "image_size": 32,
            "classes": ["z-class", "a class"]}
    (bundle / "models" / "architecture.json").write_text(json.dumps(arch))
    args = train_args(bundle, tmp_path / "m.csv", tmp_path / "run", {"max_epochs": "3", "device": "cpu", "x": 1})
    assert args["class_names"] == ["z-class", "a class"]  # the trained order: the served head stays valid
    assert (args["backbone"], args["in_channels"], args["image_size"], args["max_epochs"]) == ("cbr_tiny", 1, 32, 3)
    assert "pretrained_ckpt" not in args and args["device"] == "$torch.device('cpu')"
    (bundle / "models" / "model.pt").write_bytes(b"")
    assert train_args(bundle, "m.csv", "run")["pretrained_ckpt"] == str(bundle / "models" / "model.pt")
    config = load_bundle_config([str(BUNDLE / "configs" / "train.json")])
    assert [k for k in args if unknown_override(k, config, "train.json")] == []


def test_typicality_embeds_with_the_served_bundle_unless_the_conf_names_another_checkpoint(tmp_path: Path) -> None:
    bundle = tmp_path / "app" / "model" / "b"
    (bundle / "models").mkdir(parents=True)
    arch = {**ARCHITECTURE_DEFAULTS, "backbone": "cbr_tiny", "backbone_kwargs": {"width": 8}, "in_channels": 1,
            "image_size": 32, "classes": ["a", "b"]}
    (bundle / "models" / "architecture.json").write_text(json.dumps(arch))
    ckpt, spec, seed = embedding_settings(bundle, {}, tmp_path / "app")
    assert ckpt == bundle / "models" / "model.pt" and seed == 0
    assert spec == {"backbone": "cbr_tiny", "backbone_kwargs": {"width": 8}, "in_channels": 1, "image_size": 32}
    conf = {"embedding_checkpoint": "micle/model.pt", "embedding_backbone": "resnet18", "embedding_in_channels": "3",
            "embedding_image_size": "64", "embedding_seed": "4"}
    ckpt, spec, seed = embedding_settings(bundle, conf, tmp_path / "app")
    assert ckpt == tmp_path / "app" / "micle" / "model.pt" and seed == 4  # relative: from the app folder
    assert spec == {"backbone": "resnet18", "backbone_kwargs": {}, "in_channels": 3, "image_size": 64}
    assert embedding_settings(bundle, {"embedding_checkpoint": "/abs/m.pt"})[0] == Path("/abs/m.pt")
    with pytest.raises(ValueError, match="embedding_in_channels"):
        embedding_settings(bundle, {"embedding_in_channels": "three"})


def test_app_folder_holds_main_and_the_bundle(tmp_path: Path) -> None:
    trained = tmp_path / "t" / "finetune_classification"
    (trained / "models").mkdir(parents=True)
    (trained / "configs").mkdir()
    for name in ("train.json", "inference.json"):
        (trained / "configs" / name).write_text((BUNDLE / "configs" / name).read_text())
    (trained / "models" / "model.pt").write_bytes(b"weights")
    (trained / "output").mkdir()
    app = write_monai_label_app(tmp_path / "app", trained)
    assert (app / "main.py").read_text() == APP_SOURCE.read_text()
    assert (app / "model" / "finetune_classification" / "models" / "model.pt").read_bytes() == b"weights"
    assert not (app / "model" / "finetune_classification" / "output").exists()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_monai_label_app(app, trained)
    with pytest.raises(ValueError, match="not a fine-tune bundle"):
        write_monai_label_app(tmp_path / "app2", tmp_path / "t")
    # MONAI Label finds the app as the one MONAILabelApp subclass of main.py
    tree = ast.parse((app / "main.py").read_text())
    assert [c.name for c in tree.body if isinstance(c, ast.ClassDef)
            and any(getattr(b, "id", None) == "MONAILabelApp" for b in c.bases)] == ["MedsslApp"]
