"""The declarative fine-tune bundle: MONAI Label's BundleTrainTask overrides, a self-describing trained bundle,
and per-group learning rates.

The images are generated PNGs (a class-specific pattern per patient) indexed by a real manifest; the bundle
runs through ``monai.bundle`` as MONAI Label 0.8.5 and a user run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medssl_monai.data import write_manifest

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "finetune_classification"
CLASSES = ["effusion", "nodule", "normal"]


def make_images(folder: Path, per_split: dict[str, int], seed: int = 0, size: int = 24) -> pd.DataFrame:
    """``per_split[split]`` grey PNGs per class: class c brightens row band c, plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in per_split.items():
        for c, name in enumerate(CLASSES):
            for i in range(n):
                img = rng.normal(80, 20, (size, size))
                img[c * size // 3:(c + 1) * size // 3] += 100
                path = folder / f"{split}_{name}_{i}.png"
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(path)
                uid = f"{split}.{c}.{i}"
                rows.append({"path": str(path), "patient_id": f"p{uid}", "study_uid": uid, "series_uid": uid,
                             "sop_uid": uid, "label": name, "split": split, "source": "image"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ftdata")
    df = make_images(tmp / "images", {"train": 6, "val": 3, "test": 3})
    write_manifest(df, tmp / "manifest.csv")
    return tmp / "manifest.csv"


def copy_bundle(dst: Path, src: Path = BUNDLE, ignore: tuple[str, ...] = ("*.pt", "output")) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*ignore))
    return dst


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, f"monai.bundle {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def monai_label_train(bundle: Path, train_ds: list[dict], val_ds: list[dict], max_epochs: int = 1) -> None:
    """What MONAI Label 0.8.5's ``BundleTrainTask.__call__`` does (single GPU / CPU path), step by step:
    read ``train.json`` alone, take its ``train#handlers``, insert a ``CheckpointLoader`` on ``@network`` when
    ``models/model.pt`` exists, then ``monai.bundle.run`` with exactly these overrides."""
    import monai.bundle
    from monai.bundle import ConfigParser
    from monai.handlers import CheckpointLoader

    config_path = bundle / "configs" / "train.json"
    bundle_config = ConfigParser()
    bundle_config.read_config(str(config_path))
    bundle_config.config.update({"bundle_root": str(bundle)})
    train_handlers = bundle_config.get("train#handlers", [])
    model_pytorch = bundle / "models" / "model.pt"
    if model_pytorch.exists():
        if not [t for t in train_handlers if t.get("_target_") == CheckpointLoader.__name__]:
            train_handlers.insert(0, {"_target_": CheckpointLoader.__name__, "load_path": str(model_pytorch),
                                      "load_dict": {"model": "$@network"}, "strict": False})
    overrides = {"bundle_root": str(bundle), "train#trainer#max_epochs": max_epochs, "train#dataset#data": train_ds,
                 "device": "cpu", "train#handlers": train_handlers, "validate#dataset#data": val_ds}
    monai.bundle.run(run_id="run", init_id=None, final_id=None, meta_file=str(bundle / "configs" / "metadata.json"),
                     config_file=str(config_path), **overrides)


def datastore_items(manifest: Path, split: str) -> list[dict]:
    """MONAI Label's datalist: ``{"image": <file>, "label": <class name>}`` only."""
    df = pd.read_csv(manifest)
    return [{"image": r.path, "label": r.label} for r in df[df["split"] == split].itertuples()]


def test_monai_label_bundle_train_task_trains_the_bundle(manifest: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bundle = copy_bundle(tmp_path / "app" / "finetune_classification")
    train_ds, val_ds = datastore_items(manifest, "train"), datastore_items(manifest, "val")
    monai_label_train(bundle, train_ds, val_ds)

    assert json.loads((bundle / "models" / "classes.json").read_text()) == CLASSES
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert state["head.fc.weight"].shape[0] == len(CLASSES)
    acc = EventAccumulator(str(bundle / "output" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("auc_macro")] == [1]  # validated once, on MONAI Label's val items
    assert len(acc.Scalars("train_loss")) == 2  # 18 training items, batch 16
    cm = pd.read_csv(bundle / "output" / "confusion_matrix.csv", index_col=0)
    assert int(cm.to_numpy().sum()) == len(val_ds)

    # the trained bundle deployed elsewhere (no output/): MONAI Label adds a CheckpointLoader on @network
    again = copy_bundle(tmp_path / "app2" / "finetune_classification", bundle, ignore=("output",))
    monai_label_train(again, train_ds[:8], val_ds)
    log = (again / "output" / "train.log").read_text()
    assert "Restored all variables from" in log and str(again / "models" / "model.pt") in log
    acc = EventAccumulator(str(again / "output" / "tensorboard"))
    acc.Reload()
    assert len(acc.Scalars("train_loss")) == 1  # the overridden train#dataset#data (8 items) was trained on


def test_copied_bundle_infers_and_evaluates_with_its_own_architecture(manifest: Path, tmp_path: Path) -> None:
    original = copy_bundle(tmp_path / "trained" / "finetune_classification")
    cli("run", "--bundle_root", str(original), "--config_file", str(original / "configs/train.json"),
        "--manifest", str(manifest), "--in_channels", "1", "--image_size", "32", "--backbone", "cbr_tiny",
        "--max_epochs", "1", "--batch_size", "8")
    arch = json.loads((original / "models" / "architecture.json").read_text())
    assert arch["in_channels"] == 1 and arch["image_size"] == 32 and arch["backbone"] == "cbr_tiny"
    assert arch["classes"] == CLASSES and arch["multi_label"] is False
    meta = json.loads((original / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]

    copy = copy_bundle(tmp_path / "elsewhere" / "finetune_classification", original, ignore=("output",))
    shutil.rmtree(original.parent.parent / "trained" / "finetune_classification" / "output" / "checkpoints")
    probs = {}
    for root in (original, copy):  # no architecture override: only the data to predict on
        cli("run", "--bundle_root", str(root), "--config_file", str(root / "configs/inference.json"),
            "--manifest", str(manifest), "--split", "test")
        probs[root] = pd.read_csv(root / "output" / "predictions.csv")
    pd.testing.assert_frame_equal(probs[original], probs[copy])
    assert len(probs[copy]) == 9 and list(probs[copy].filter(like="prob_").columns) == [f"prob_{c}" for c in CLASSES]

    # an independent reference: the classifier rebuilt by hand from the recorded architecture, on the PNGs
    from monai.transforms import Resize

    from medssl_monai.bundle import classifier_def

    net = classifier_def("cbr_tiny", in_channels=1, num_classes=3)
    net.load_state_dict(torch.load(copy / "models" / "model.pt", weights_only=True))
    net.eval()
    df = pd.read_csv(manifest).set_index("sop_uid")
    images = [torch.as_tensor(np.asarray(Image.open(df.loc[uid, "path"]), dtype=np.float32) / 255.0)[None]
              for uid in probs[copy]["sop_uid"]]
    x = torch.stack([Resize((32, 32), mode="area")(im) for im in images]).as_subclass(torch.Tensor)
    with torch.no_grad():
        expected = torch.softmax(net(x), dim=1).numpy()
    np.testing.assert_allclose(probs[copy].filter(like="prob_").to_numpy(), expected, atol=1e-4)

    # evaluate.json, merged over train.json as in the model zoo, with no architecture override either
    cli("run", "--bundle_root", str(copy), "--config_file",
        repr([str(copy / "configs/train.json"), str(copy / "configs/evaluate.json")]),
        "--manifest", str(manifest), "--eval_split", "test")
    metrics = json.loads((copy / "output" / "eval_test" / "metrics.json").read_text())
    pred = probs[copy].set_index("sop_uid").loc[df.index[df["split"] == "test"]]
    expected_acc = float((pred["pred"] == df.loc[pred.index, "label"]).mean())
    assert metrics["accuracy"] == pytest.approx(expected_acc)
    cm = pd.read_csv(copy / "output" / "eval_test" / "confusion_matrix.csv", index_col=0)
    assert list(cm.index) == CLASSES and int(cm.to_numpy().sum()) == 9


def test_per_group_learning_rates_reach_the_optimiser(manifest: Path, tmp_path: Path) -> None:
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "train.json"), workflow_type=None,
                        meta_file=str(BUNDLE / "configs" / "metadata.json"), logging_file=False,
                        bundle_root=str(BUNDLE), output_dir=str(tmp_path), manifest=str(manifest),
                        backbone="cbr_tiny", in_channels=1, lr=0.08, backbone_lr_mult=0.25, weight_decay=1e-3, device="cpu", compile=True)
    wf.parser.parse()
    network = wf.parser.get_parsed_content("network")
    optimizer = wf.parser.get_parsed_content("train#optimizer")
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    assert groups["head"]["lr"] == pytest.approx(0.08) and groups["head_no_decay"]["lr"] == pytest.approx(0.08)
    assert groups["backbone"]["lr"] == pytest.approx(0.02) and groups["backbone_no_decay"]["lr"] == pytest.approx(0.02)
    assert groups["backbone"]["weight_decay"] == 1e-3 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    # every trainable parameter exactly once, split by name and by dimension
    by_name = {id(p): n for n, p in network.named_parameters()}
    for name, g in groups.items():
        for p in g["params"]:
            assert by_name[id(p)].startswith("head.") == name.startswith("head")
            assert (p.ndim <= 1) == name.endswith("no_decay")
    assert sum(len(g["params"]) for g in groups.values()) == len(by_name)
    # the cosine schedule scales each group from its own rate: the ratio holds after a step
    scheduler = wf.parser.get_parsed_content("train#lr_scheduler")
    optimizer.step()
    scheduler.step()
    assert groups["backbone"]["lr"] / groups["head"]["lr"] == pytest.approx(0.25)
    assert groups["head"]["lr"] < 0.08
    trainer = wf.parser.get_parsed_content("train#trainer")  # compile=True reaches MONAI's engine
    assert trainer.compile and trainer.network is not network


def test_linear_probe_in_the_bundle_optimises_the_head_only(manifest: Path) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE), "manifest": str(manifest), "backbone": "cbr_tiny", "device": "cpu",
                   "linear_probe": True, "backbone_lr_mult": 0.1})
    network = parser.get_parsed_content("network")
    optimizer = parser.get_parsed_content("train#optimizer")
    assert [g["name"] for g in optimizer.param_groups] == ["head", "head_no_decay"]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in network.head.parameters()}


def test_multi_gpu_config_merges_over_the_declarative_train_config(manifest: Path, tmp_path: Path) -> None:
    """``multi_gpu_train.json`` replaces the network (DDP) and loaders (sharded) of the declared fine-tune; in
    one process the merged config builds the same trainer with its handlers, checkpoint last."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "multi_gpu_train.json")])
    parser.update({"bundle_root": str(BUNDLE), "manifest": str(manifest), "backbone": "cbr_tiny",
                   "output_dir": str(tmp_path)})
    trainer = parser.get_parsed_content("train#trainer")
    names = [type(h).__name__ for h in parser.get_parsed_content("train#handlers")]
    assert names[0] == "ValidationHandler" and names[-1] == "TrainingCheckpoint"
    assert trainer.data_loader.batch_size == 16 and len(trainer.data_loader.dataset) == 18


def test_finetune_refuses_rows_added_after_the_split(manifest: Path, tmp_path: Path) -> None:
    """A re-index after the split leaves new rows unassigned: the fine-tune neither trains on them nor
    silently drops them, it stops and says how many (issue 13, item 11)."""
    import pandas as pd
    from monai.bundle import ConfigParser

    df = pd.read_csv(manifest, keep_default_na=False, na_filter=False, dtype=str)
    df.loc[df.index[:2], "split"] = ""
    write_manifest(df, tmp_path / "reindexed.csv")
    for m in (manifest, tmp_path / "reindexed.csv"):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        parser.update({"bundle_root": str(BUNDLE), "output_dir": str(tmp_path), "manifest": str(m)})
        if m == manifest:
            assert set(parser.get_parsed_content("all_rows")["split"]) == {"train", "val"}
        else:
            with pytest.raises(Exception) as info:  # MONAI wraps the error: its cause names the rows
                parser.get_parsed_content("all_rows")
            err: BaseException | None = info.value
            messages = []
            while err is not None:
                messages.append(str(err))
                err = err.__cause__ or err.__context__
            assert any("2 row(s) have no 'split'" in m for m in messages), messages


def test_evaluation_overrides_leave_the_recorded_architecture_alone() -> None:
    """Shared driver overrides must not replace what the trained bundle recorded (issue 14's self-describing
    bundle): every architecture key evaluate/inference read from models/architecture.json is dropped."""
    import json

    from medssl_monai.bundle import ARCHITECTURE_DEFAULTS, without_architecture

    common = {"backbone": "resnet50", "image_size": 128, "in_channels": 3, "classes": ["x"], "num_workers": 2,
              "amp": "bf16", "manifest": "m.csv"}
    assert without_architecture(common) == {"num_workers": 2, "amp": "bf16", "manifest": "m.csv"}
    # the keys dropped are exactly those the shipped evaluate config takes from the architecture record
    evaluate = json.loads((BUNDLE / "configs" / "evaluate.json").read_text())
    recorded = {k for k, v in evaluate.items() if isinstance(v, str) and v.startswith("$@architecture[")}
    assert recorded == set(ARCHITECTURE_DEFAULTS) | {"classes"}


def test_min_epoch_steps_trains_whole_extra_passes_per_epoch(manifest: Path, tmp_path: Path) -> None:
    """18 training images at batch 16 are 2 steps a pass; min_epoch_steps=5 makes every epoch 3 passes (6
    steps), each image 3 times, while max_epochs and the epoch-level schedule keep their meaning."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE), "manifest": str(manifest), "backbone": "cbr_tiny", "device": "cpu",
                   "in_channels": 1, "image_size": 32, "output_dir": str(tmp_path), "progress_bar": False,
                   "max_epochs": 2, "min_epoch_steps": 5, "val_interval": 2})
    trainer = parser.get_parsed_content("train#trainer")
    seen: list[int] = []
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(len(e.state.output)))  # decollated
    trainer.run()
    assert trainer.state.epoch_length == 6 and trainer.state.iteration == 12 and trainer.state.epoch == 2
    assert sum(seen) == 2 * 3 * 18
    assert parser.get_parsed_content("train#lr_scheduler").last_epoch == 2  # stepped per epoch, not per pass
