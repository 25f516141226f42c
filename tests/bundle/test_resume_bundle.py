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


# --------------------------------------------------------------------------------------------------------
# Bit-exact resume of all three bundles on tiny generated data (no shared data needed).
#
# Each bundle runs three times (in this process, as ``monai.bundle run`` does: a fresh workflow each time):
# uninterrupted for EPOCHS epochs; killed (an exception) right after epoch KILL_AT's checkpoint; and the same
# workflow again, which resumes (the real SIGKILL of a separate process is the test above). Every training
# loss after KILL_AT, the final checkpoint (weights, BatchNorm buffers, optimiser, LR schedule, counters), the
# bundle's weights and the fine-tune's validation metrics must be equal to the bit. The training sets are
# 2 * batch + 1 items: the fine-tune's last batch of one is merged (BatchNorm cannot train on one), the
# pretraining bundles drop it (issue 19 item 6).

import math  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

EPOCHS, KILL_AT, BATCH = 3, 1, 4


class _Killed(Exception):
    """Stands in for a kill right after an epoch's checkpoint."""


class _Recorder:
    """Every training loss (exact float) by iteration; raises :class:`_Killed` after epoch ``kill_at``."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at, self.losses = kill_at, {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        def loss(out) -> float:  # contrastive: a dict; supervised: decollated items
            return float(out["loss"] if isinstance(out, dict) else out[0]["loss"])

        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.losses.__setitem__(
            e.state.iteration, loss(e.state.output)))
        if self.kill_at is not None:  # added last: after every EPOCH_COMPLETED handler, the checkpoint's included
            engine.add_event_handler(Events.EPOCH_COMPLETED(once=self.kill_at), self._kill)

    def _kill(self, engine) -> None:
        raise _Killed()

def _png(path: Path, rng: np.random.Generator, band: int, size: int = 20) -> None:
    img = rng.normal(90, 25, (size, size, 3))
    img[band * size // 3:(band + 1) * size // 3] += 80
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def _manifest(folder: Path, per_split: dict[str, int], images_per_patient: int = 1) -> Path:
    """PNG images of 3 classes; ``per_split[split]`` patients, ``images_per_patient`` images each."""
    from medssl_monai.data import write_manifest

    rng = np.random.default_rng(0)
    rows = []
    for split, n in per_split.items():
        for p in range(n):
            c = p % 3
            for i in range(images_per_patient):
                uid = f"{split}.{p}.{i}"
                path = folder / f"{uid}.png"
                _png(path, rng, c)
                rows.append({"path": str(path), "patient_id": f"p.{split}.{p}", "study_uid": f"{split}.{p}",
                             "series_uid": f"{split}.{p}", "sop_uid": uid, "label": f"c{c}", "split": split,
                             "source": "image"})
    write_manifest(pd.DataFrame(rows), folder / "manifest.csv")
    return folder / "manifest.csv"


def _image_folder(folder: Path, per_split: dict[str, int]) -> Path:
    rng = np.random.default_rng(1)
    for split, n in per_split.items():
        for i in range(n):
            _png(folder / split / f"c{i % 3}" / f"{i}.png", rng, i % 3)
    return folder


def _run(root: Path, overrides: dict, kill_at: int | None = None) -> dict[int, float]:
    """Run the bundle in ``root`` (as ``monai.bundle run`` does: initialize, run, finalize); its losses."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=str(root / "configs" / "train.json"), workflow_type=None,
                        meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                        bundle_root=str(root), device="cpu", **overrides)
    wf.initialize()
    recorder = _Recorder(kill_at)
    recorder.attach(wf.parser.get_parsed_content("train#trainer"))
    try:
        wf.run()
    except RuntimeError as err:  # MONAI wraps what the run expression raised
        if not isinstance(err.__cause__, _Killed):
            raise
        assert kill_at is not None
        return recorder.losses
    wf.finalize()
    assert kill_at is None, "the run finished before it was killed"
    return recorder.losses


def _assert_equal(a: object, b: object, where: str) -> None:
    """Nested state dicts equal to the bit (tensors with ``torch.equal``, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def _resume_is_exact(tmp_path: Path, bundle: str, overrides: dict, metrics: bool) -> None:
    roots = {}
    for name in ("reference", "killed"):
        roots[name] = tmp_path / name / bundle
        shutil.copytree(REPO / "bundles" / bundle, roots[name], ignore=shutil.ignore_patterns("*.pt", "output"))
    overrides = {**overrides, "max_epochs": EPOCHS, "batch_size": BATCH, "image_size": 16, "backbone": "cbr_tiny"}
    if bundle == "finetune_classification":
        overrides["progress_bar"] = False
    ref = _run(roots["reference"], overrides)
    killed = roots["killed"]
    first = _run(killed, overrides, kill_at=KILL_AT)
    assert not (killed / "models" / "model.pt").exists()
    again = _run(killed, overrides)

    log = (killed / "output" / "train.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and f"epoch {KILL_AT}," in resumed[0], resumed
    per_epoch = len(ref) // EPOCHS
    assert per_epoch == 2 and len(ref) == EPOCHS * per_epoch  # 2 batches: the single item merged/dropped
    assert sorted(first) == list(range(1, KILL_AT * per_epoch + 1))
    assert sorted(again) == list(range(KILL_AT * per_epoch + 1, EPOCHS * per_epoch + 1))
    assert {**first, **again} == ref  # every loss, to the bit

    name = f"checkpoint_{EPOCHS * per_epoch}.pt"
    a = torch.load(roots["reference"] / "output" / "checkpoints" / name, weights_only=True)
    b = torch.load(killed / "output" / "checkpoints" / name, weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "rng"} <= set(a)
    assert any("running_var" in k for k in a["model"]) and a["optimizer"]["state"]  # BN buffers, momenta
    _assert_equal(a, b, "checkpoint")
    _assert_equal(torch.load(roots["reference"] / "models" / "model.pt", weights_only=True),
                  torch.load(killed / "models" / "model.pt", weights_only=True), "model.pt")
    if metrics:
        from medssl_monai.handlers import read_metrics_csv

        rows = [read_metrics_csv(root / "output" / "metrics.csv") for root in (roots["reference"], killed)]
        later = [[r for r in rs if r["epoch"] > KILL_AT] for rs in rows]
        assert len(later[0]) == EPOCHS - KILL_AT and "auc_macro" in later[0][0]
        _assert_equal(later[0], later[1], "metrics.csv")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_finetune_resume_is_bit_identical(tmp_path: Path, num_workers: int) -> None:
    # 9 training images = 2 * BATCH + 1
    manifest = _manifest(tmp_path / "data", {"train": 2 * BATCH + 1, "val": 6})
    _resume_is_exact(tmp_path, "finetune_classification",
                     {"manifest": str(manifest), "num_workers": num_workers, "in_channels": 3}, metrics=True)


def test_micle_resume_is_bit_identical(tmp_path: Path) -> None:
    # 9 patients of 2 images: 9 MICLe items = 2 * BATCH + 1
    manifest = _manifest(tmp_path / "data", {"train": 2 * BATCH + 1}, images_per_patient=2)
    _resume_is_exact(tmp_path, "micle_medical", {"manifest": str(manifest), "num_workers": 0, "knn_interval": 0},
                     metrics=False)


def test_simclr_resume_is_bit_identical(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "natural", {"train": 2 * BATCH + 1})
    _resume_is_exact(tmp_path, "simclr_natural", {"dataset_dir": str(folder), "num_workers": 0, "knn_interval": 0},
                     metrics=False)
