"""The bundles through MONAI's real bundle CLI: metadata, train (tiny budget), hand-over, inference, export.

Each bundle is copied to a temporary folder (a run writes ``models/`` and ``output/`` under its
``bundle_root``) and run with ``python -m monai.bundle`` from the project root, as a user would.
"""

from __future__ import annotations


import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from medssl_monai.data import table_to_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ["simclr_natural", "micle_medical"]
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
                 "--backbone", "resnet18", "--knn_interval", "0")
    m = table_to_manifest(ham / "metadata.csv", group_col="lesion_id", label_col="dx", instance_col="image_id")
    manifest = tmp / "ham_mini.csv"
    write_manifest(m[m["mini"]], manifest)
    p2 = copy_bundle("micle_medical", tmp)
    monai_bundle("run", "--bundle_root", str(p2), "--config_file", str(p2 / "configs/train.json"),
                 "--manifest", str(manifest), "--max_epochs", "1", "--batch_size", "16", "--image_size", "32",
                 "--backbone", "resnet18", "--limit", "96", "--knn_interval", "1",
                 "--pretrained_ckpt", str(p1 / "models/model.pt"))
    return {"p1": p1, "p2": p2, "manifest": manifest}


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
    assert (p1 / "output/train.log").read_text().count("Epoch[") >= 2


def test_phase2_starts_from_phase1(pretrained: dict[str, Path]) -> None:
    p2 = pretrained["p2"]
    log = (p2 / "output/train.log").read_text()
    assert "pretrained model.pt -> backbone: mode=full" in log and "missing 0" in log
    state = torch.load(p2 / "models/model.pt", weights_only=True)
    p1_state = torch.load(pretrained["p1"] / "models/model.pt", weights_only=True)
    assert state.keys() == p1_state.keys()
    assert not torch.equal(state["conv1.weight"], p1_state["conv1.weight"])  # it trained on from there


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
    root = pretrained["p1" if name == "simclr_natural" else "p2"]
    cfg, meta = str(root / "configs/inference.json"), str(root / "configs/metadata.json")
    monai_bundle("verify_net_in_out", "network_def", "--meta_file", meta, "--config_file", cfg)
    ts = tmp_path / "model.ts"
    monai_bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(root / "models/model.pt"),
                 "--meta_file", meta, "--config_file", cfg, "--use_trace", "True", "--input_shape", "[1, 3, 64, 64]")
    scripted = torch.jit.load(str(ts))
    from medssl_monai.networks import get_backbone

    eager = get_backbone("resnet18").eval()
    eager.load_state_dict(torch.load(root / "models/model.pt", weights_only=True))
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(scripted(x), eager(x), atol=1e-4)
