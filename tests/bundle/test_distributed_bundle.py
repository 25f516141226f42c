"""The multi-process bundle (torchrun + ignite.distributed, gloo on CPU) against a single process.

Two processes with 4 images each must train exactly like one process with the same 8 images: NT-Xent
gathers every rank's views as negatives and DDP averages the gradients. Batch norm cannot be synchronised
on CPU (``SyncBatchNorm`` is GPU-only), so this run uses batch-statistics-free normalisation (instance norm
in the backbone, layer norm in the head); the exact comparison is then meaningful.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


def test_two_processes_equal_one(tmp_path: Path) -> None:
    from conftest import require_data

    natural = require_data("natural")
    preset = tmp_path / "fixed_views.json"  # deterministic views: the comparison must not depend on RNG streams
    preset.write_text(json.dumps({
        "keys": ["image"], "spatial_size": [32, 32], "in_channels": 3,
        "transforms": [
            {"_target_": "medssl_monai.transforms.EnsureFloatImaged", "keys": "@keys", "in_channels": "@in_channels"},
            {"_target_": "Resized", "keys": "@keys", "spatial_size": "@spatial_size", "mode": "area"},
        ],
    }))
    common = ["--dataset_dir", str(natural), "--preset", str(preset), "--backbone", "cbr_tiny",
              "--network_def#norm", "instance", "--projection_norm", "layer", "--image_size", "32",
              "--max_epochs", "2", "--shuffle", "False", "--knn_interval", "0", "--warmup_epochs", "0",
              "--base_lr", "100"]  # LARS steps are lr * 1e-3 * |w|: make them large enough to tell runs apart
    roots = {}
    for name in ("single", "multi", "local_negatives"):
        roots[name] = tmp_path / name / "simclr_natural"
        shutil.copytree(REPO / "bundles" / "simclr_natural", roots[name], ignore=shutil.ignore_patterns("*.pt"))
    single = roots["single"]
    _run([sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(single),
          "--config_file", str(single / "configs/train.json"), "--batch_size", "8", *common])
    multi = roots["multi"]
    configs = f"['{multi / 'configs/train.json'}','{multi / 'configs/multi_gpu_train.json'}']"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "monai.bundle", "run", "--bundle_root", str(multi), "--config_file", configs,
          "--batch_size", "4", *common])
    a = torch.load(single / "models/model.pt", weights_only=True)
    b = torch.load(multi / "models/model.pt", weights_only=True)
    assert a.keys() == b.keys()
    epoch1 = torch.load(multi / "output/checkpoints/" / sorted(os.listdir(multi / "output/checkpoints"))[0],
                        weights_only=True)["model"]
    for k in a:
        moved = float((a[k] - epoch1[f"backbone.{k}"]).abs().max())
        assert float((a[k] - b[k]).abs().max()) <= 1e-3 * moved + 1e-7, k
    # epoch 2 moved the conv weights: the runs agree on training, not on an untouched init
    assert float((a["block1.cbr.conv.weight"] - epoch1["backbone.block1.cbr.conv.weight"]).abs().max()) > 1e-4
    log = (multi / "output/train.log").read_text()
    assert "rank 0 of 2, backend gloo" in log
    # negative control: without the cross-rank gather each rank only sees its own 4 items as negatives
    local = roots["local_negatives"]
    configs = f"['{local / 'configs/train.json'}','{local / 'configs/multi_gpu_train.json'}']"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "monai.bundle", "run", "--bundle_root", str(local), "--config_file", configs,
          "--batch_size", "4", "--train#loss#gather_distributed", "False", *common])
    c = torch.load(local / "models/model.pt", weights_only=True)
    assert float((a["block1.cbr.conv.weight"] - c["block1.cbr.conv.weight"]).abs().max()) > 1e-5
