"""Kill a real bundle run (SIGKILL) after its first checkpoint; the restarted run resumes and ends where an
uninterrupted run ends: same epoch count, same weights (augmentations are reseeded per epoch and the RNG,
optimiser and LR schedule states are restored from the atomic epoch checkpoint)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _cmd(root: Path, natural: Path) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(root),
            "--config_file", str(root / "configs/train.json"), "--dataset_dir", str(natural),
            "--backbone", "resnet18", "--image_size", "64", "--batch_size", "2", "--max_epochs", "4",
            "--knn_interval", "0", "--num_workers", "0"]


def test_killed_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    from conftest import require_data

    natural = require_data("natural")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    roots = {}
    for name in ("reference", "killed"):
        roots[name] = tmp_path / name / "simclr_natural"
        shutil.copytree(REPO / "bundles" / "simclr_natural", roots[name], ignore=shutil.ignore_patterns("*.pt"))
    ref = subprocess.run(_cmd(roots["reference"], natural), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-4000:]

    killed = roots["killed"]
    ckpts = killed / "output" / "checkpoints"
    proc = subprocess.Popen(_cmd(killed, natural), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpts.glob("checkpoint_*.pt")):  # the first epoch is saved
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "models" / "model.pt").exists()  # it really died before finishing
    assert list(ckpts.glob("checkpoint_*.pt"))

    again = subprocess.run(_cmd(killed, natural), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    log = (killed / "output" / "train.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "epoch 0" not in resumed[0], resumed
    a = torch.load(roots["reference"] / "models/model.pt", weights_only=True)
    b = torch.load(killed / "models/model.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not list(ckpts.glob(".*.tmp")), "a temporary checkpoint file was left behind"
