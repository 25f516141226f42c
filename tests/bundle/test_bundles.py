"""The bundles through MONAI's real bundle CLI: metadata, train (tiny budget), hand-over, inference, export.

Each bundle is copied to a temporary folder (a run writes ``models/`` and ``output/`` under its
``bundle_root``) and run with ``python -m monai.bundle`` from the project root, as a user would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from medssl_monai.data import table_to_manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]
BUNDLES = ["simclr_natural", "micle_medical", "finetune_classification"]
SCHEMA = REPO.parent / "shared" / "schema" / "meta_schema_20240725.json"


def monai_bundle(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"monai.bundle {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def copy_bundle(name: str, dst: Path) -> Path:
    out = dst / name
    shutil.copytree(REPO / "bundles" / name, out, ignore=shutil.ignore_patterns("*.pt", "output"))
    return out


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_layout_and_metadata(name: str) -> None:
    from conftest import require_data

    require_data()  # the schema lives beside the data in ../shared
    root = REPO / "bundles" / name
    for rel in ("configs/metadata.json", "configs/train.json", "configs/inference.json", "configs/logging.conf",
                "configs/multi_gpu_train.json", "docs/README.md", "LICENSE", "models"):
        assert (root / rel).exists(), f"{name}: missing {rel}"
    monai_bundle("verify_metadata", "--meta_file", str(root / "configs/metadata.json"), "--filepath", str(SCHEMA))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[str, Path]:
    """Phase 1 on the natural photos, then phase 2 on HAM10000 `mini` lesions starting from phase 1."""
    from conftest import require_data

    natural = require_data("natural")
    ham = require_data("ham10000")
    tmp = tmp_path_factory.mktemp("bundles")
    p1 = copy_bundle("simclr_natural", tmp)
    monai_bundle("run", "--bundle_root", str(p1), "--config_file", str(p1 / "configs/train.json"),
                 "--dataset_dir", str(natural), "--max_epochs", "2", "--batch_size", "4", "--image_size", "32",
                 "--backbone", "resnet18", "--knn_interval", "0", "--log_interval", "1")
    m = table_to_manifest(ham / "metadata.csv", group_col="lesion_id", label_col="dx", instance_col="image_id")
    manifest = tmp / "ham_mini.csv"
    write_manifest(m[m["mini"]], manifest)
    p2 = copy_bundle("micle_medical", tmp)
    monai_bundle("run", "--bundle_root", str(p2), "--config_file", str(p2 / "configs/train.json"),
                 "--manifest", str(manifest), "--max_epochs", "1", "--batch_size", "16", "--image_size", "32",
                 "--backbone", "resnet18", "--limit", "96", "--knn_interval", "1", "--log_interval", "1",
                 "--pretrained_ckpt", str(p1 / "models/model.pt"))
    p3 = copy_bundle("finetune_classification", tmp)
    monai_bundle("run", "--bundle_root", str(p3), "--config_file", str(p3 / "configs/train.json"),
                 "--manifest", str(manifest), "--max_epochs", "2", "--batch_size", "16", "--image_size", "32",
                 "--backbone", "resnet18", "--label_fraction", "1.0",
                 "--pretrained_ckpt", str(p2 / "models/model.pt"))
    return {"p1": p1, "p2": p2, "p3": p3, "manifest": manifest}


def test_phase1_outputs(pretrained: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    p1 = pretrained["p1"]
    assert (p1 / "models/model.pt").is_file() and (p1 / "models/projection_head.pt").is_file()
    state = torch.load(p1 / "models/model.pt", weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith("projection_head") for k in state)
    events = list((p1 / "output/tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert any("loss" in t for t in tags) and any("lr" in t for t in tags), tags
    log = (p1 / "output/train.log").read_text()
    assert log.count("Epoch[") >= 2
    assert log.count("train_loss: ") >= 2  # StatsHandler logs the loss value itself


def test_phase2_starts_from_phase1(pretrained: dict[str, Path]) -> None:
    p2 = pretrained["p2"]
    log = (p2 / "output/train.log").read_text()
    assert "pretrained model.pt -> backbone: mode=full" in log and "missing 0" in log
    state = torch.load(p2 / "models/model.pt", weights_only=True)
    p1_state = torch.load(pretrained["p1"] / "models/model.pt", weights_only=True)
    assert state.keys() == p1_state.keys()
    assert not torch.equal(state["conv1.weight"], p1_state["conv1.weight"])  # it trained on from there
    # the k-NN monitor (knn_interval 1) puts its value in the trainer's metrics; MONAI's handlers log it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(p2 / "output/tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    knn = [(e.step, e.value) for e in acc.Scalars("knn_top1")]
    assert [step for step, _ in knn] == [1] and 0.0 <= knn[0][1] <= 1.0, knn
    assert "Epoch[1] Metrics -- knn_top1: " in log


def test_inference_writes_embeddings(pretrained: dict[str, Path]) -> None:
    p2 = pretrained["p2"]
    monai_bundle("run", "--bundle_root", str(p2), "--config_file", str(p2 / "configs/inference.json"),
                 "--manifest", str(pretrained["manifest"]), "--image_size", "32", "--limit", "20")
    emb = pd.read_csv(p2 / "output/embeddings.csv")
    assert len(emb) == 20 and emb.shape[1] == 2 + 512
    assert emb["sop_uid"].str.startswith("ISIC_").all()
    assert emb.filter(like="f").std().sum() > 0


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_net_in_out_and_torchscript_export(name: str, pretrained: dict[str, Path], tmp_path: Path) -> None:
    root = pretrained[{"simclr_natural": "p1", "micle_medical": "p2", "finetune_classification": "p3"}[name]]
    cfg, meta = str(root / "configs/inference.json"), str(root / "configs/metadata.json")
    monai_bundle("verify_net_in_out", "network_def", "--meta_file", meta, "--config_file", cfg,
                 "--bundle_root", str(root))
    ts = tmp_path / "model.ts"
    monai_bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(root / "models/model.pt"),
                 "--meta_file", meta, "--config_file", cfg, "--bundle_root", str(root), "--use_trace", "True",
                 "--input_shape", "[1, 3, 64, 64]")
    scripted = torch.jit.load(str(ts))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(cfg)
    parser["bundle_root"] = str(root)
    eager = parser.get_parsed_content("network_def").eval()
    eager.load_state_dict(torch.load(root / "models/model.pt", weights_only=True))
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(scripted(x), eager(x), atol=1e-4)


def test_phase3_finetunes_from_phase2(pretrained: dict[str, Path]) -> None:
    p3 = pretrained["p3"]
    log = (p3 / "output/train.log").read_text()
    assert "pretrained model.pt -> backbone: mode=full" in log and "missing 0" in log
    m = pd.read_csv(pretrained["manifest"])
    classes = sorted(m["label"].dropna().unique())
    assert json.loads((p3 / "models/classes.json").read_text()) == classes
    meta = json.loads((p3 / "configs/metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {str(i): c for i, c in enumerate(classes)}
    cm = pd.read_csv(p3 / "output/confusion_matrix.csv", index_col=0)
    assert list(cm.index) == classes and int(cm.to_numpy().sum()) == int((m["split"] == "val").sum())
    assert (p3 / "output/confusion_matrix.png").stat().st_size > 1000
    assert len(list((p3 / "output/checkpoints").glob("checkpoint_*.pt"))) >= 1  # resumable like the others
    backbone_p2 = torch.load(pretrained["p2"] / "models/model.pt", weights_only=True)
    clf = torch.load(p3 / "models/model.pt", weights_only=True)
    assert set(backbone_p2) == {k.removeprefix("backbone.") for k in clf if k.startswith("backbone.")}


def test_evaluate_and_predict(pretrained: dict[str, Path]) -> None:
    p3, manifest = pretrained["p3"], pretrained["manifest"]
    evaluate = repr([str(p3 / "configs/train.json"), str(p3 / "configs/evaluate.json")])  # merged, model zoo style
    monai_bundle("run", "--bundle_root", str(p3), "--config_file", evaluate,
                 "--manifest", str(manifest), "--eval_split", "val", "--image_size", "32")
    metrics = json.loads((p3 / "output/eval_val/metrics.json").read_text())
    assert {"accuracy", "balanced_accuracy", "auc_macro"} <= set(metrics)
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and 0.0 <= metrics["auc_macro"] <= 1.0
    monai_bundle("run", "--bundle_root", str(p3), "--config_file", str(p3 / "configs/inference.json"),
                 "--manifest", str(manifest), "--image_size", "32", "--limit", "12")
    pred = pd.read_csv(p3 / "output/predictions.csv")
    probs = pred.filter(like="prob_")
    assert len(pred) == 12 and probs.shape[1] == len(json.loads((p3 / "models/classes.json").read_text()))
    assert ((probs.sum(axis=1) - 1).abs() < 1e-4).all()
    assert (pred["pred"] == probs.idxmax(axis=1).str.removeprefix("prob_")).all()
    # the fingerprint of every predicted file, what results-to-dicom proves before it sends a result
    record = pd.read_csv(p3 / "output/predictions.sources.csv", dtype=str, keep_default_na=False)
    assert list(record["sop_uid"]) == list(pred["sop_uid"].astype(str))
    assert oct((p3 / "output/predictions.sources.csv").stat().st_mode & 0o777) == "0o600"
    files = pd.read_csv(manifest, dtype=str).drop_duplicates("sop_uid").set_index("sop_uid")["path"]
    for uid, digest in zip(record["sop_uid"], record["source_sha256"]):
        path = Path(files[uid]) if Path(files[uid]).is_absolute() else manifest.parent / files[uid]
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_monai_label_contract(pretrained: dict[str, Path], ham10000: Path) -> None:
    """Do what MONAI Label's BundleInferTask does with inference.json, on a real image file."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    p3 = pretrained["p3"]
    assert "classification" in p3.name  # MONAI Label derives the task type from the folder name
    parser = ConfigParser()
    parser.read_config(str(p3 / "configs/inference.json"))
    parser.config.update({"bundle_root": str(p3)})
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "device", "bundle_root"):
        assert key in parser.config, key
    parser.config.update({"image_size": 32})
    meta = json.loads((p3 / "configs/metadata.json").read_text())
    key_image, _ = next(iter(meta["network_data_format"]["inputs"].items()))
    key_pred, pred_meta = next(iter(meta["network_data_format"]["outputs"].items()))
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(torch.load(p3 / "models/model.pt", map_location="cpu", weights_only=True))
    network.eval()
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    post = parser.get_parsed_content("postprocessing", instantiate=True)
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    image_file = str(next((ham10000 / "images").glob("*.jpg")))
    data = Compose(list(pre.transforms))({key_image: image_file})
    with torch.no_grad():
        data[key_pred] = inferer(torch.as_tensor(data[key_image])[None], network)[0]
    data = Compose(list(post.transforms))(data)
    probs = torch.as_tensor(data[key_pred])
    assert probs.shape == (len(pred_meta["channel_def"]),)
    assert abs(float(probs.sum()) - 1) < 1e-5 and float(probs.min()) >= 0
