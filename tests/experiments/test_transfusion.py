"""Transfusion experiments: the config validates, steps-to-target is read correctly from real TensorBoard
events, slimmed hybrids get exactly the first k pretrained stages, and a tiny run of all four experiments
goes end to end through the fine-tuning bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from medssl_monai.bundle import classifier_def
from medssl_monai.experiments.config import load_config
from medssl_monai.experiments.results import final_validation, read_curve, steps_to_target
from medssl_monai.experiments.transfusion import plan_runs, random_init_checkpoint, validate_transfusion
from medssl_monai.networks import get_backbone, load_pretrained
from medssl_monai.reporting.transfusion_summary import run_transfusion_and_summarize

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "experiments" / "ham10000_transfusion.json"


def test_transfusion_config_is_valid() -> None:
    from conftest import require_data

    require_data("ham10000"), require_data("imagenette")
    cfg = load_config(CONFIG, required="models")
    assert validate_transfusion(cfg) == []
    assert {"cbr_large_t", "cbr_large_w", "cbr_small", "cbr_tiny"} <= set(cfg["models"])  # the whole CBR family
    exps = {r["experiment"] for r in plan_runs(cfg)}
    assert exps == {"init", "hybrid", "mean_var"}


def test_bad_transfusion_config_is_refused() -> None:
    cfg = load_config(CONFIG, required="models")
    cfg.update(models=["resnet18", "vgg99"], hybrid={"model": "cbr_tiny", "ks": [1], "slim": {"2": {}}},
               mean_var=["cbr_small"], targets=[], finetune={"learning_rate": 1, "seed": 3, "val_interval": 2})
    problems = validate_transfusion(cfg, check_data=False)
    for needle in ("vgg99", "hybrid.model", "cbr_small", "targets", "learning_rate", "['seed']", "val_interval",
                   "k=2"):
        assert any(needle in p for p in problems), (needle, problems)


def test_plan_runs_counts() -> None:
    cfg = {"models": ["resnet18", "cbr_tiny"], "seeds": [0], "model_seeds": {"resnet18": [0, 1]},
           "hybrid": {"model": "resnet18", "ks": [1, 2, 3], "slim": {"2": {"block_inplanes": [64, 64, 128, 256]}},
                      "seeds": [5]},
           "mean_var": ["cbr_tiny"]}
    runs = pd.DataFrame(plan_runs(cfg))
    assert len(runs[runs.experiment == "init"]) == 2 * 2 + 1 * 2  # (random, phase1) x seeds per model
    hybrid = runs[runs.experiment == "hybrid"]
    assert sorted(hybrid["k"]) == [1, 2, 2, 3] and set(hybrid["seed"]) == {5}
    assert hybrid[hybrid.init == "first_k_slim"]["k"].tolist() == [2]
    assert runs[runs.experiment == "mean_var"][["model", "seed"]].values.tolist() == [["cbr_tiny", 0]]


def test_curve_and_steps_to_target_from_tensorboard(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    aucs = [0.61, 0.74, 0.79, 0.83, 0.81]
    with SummaryWriter(str(tmp_path)) as w:  # what the fine-tuning bundle logs: loss per step, lr + AUC per epoch
        for step in range(1, 5 * 7 + 1):
            w.add_scalar("train_loss", 1.0 / step, step)
        for epoch, auc in enumerate(aucs, start=1):
            w.add_scalar("lr", 0.1, epoch)
            w.add_scalar("auc_macro", auc, epoch)
        w.add_scalar("auc_macro", 0.5, 2)  # a resumed run re-logging epoch 2 before the later epochs
        w.add_scalar("auc_macro", aucs[1], 2)
    curve = read_curve(tmp_path)
    assert curve["step"].tolist() == [7, 14, 21, 28, 35]
    assert curve["auc_macro"].tolist() == pytest.approx(aucs)
    # naive reference: first epoch whose AUC reaches the target, times the steps per epoch
    for target in (0.6, 0.75, 0.8, 0.82, 0.9):
        first = next((i + 1 for i, a in enumerate(aucs) if a >= target), None)
        assert steps_to_target(curve, target) == (None if first is None else 7 * first)
    assert final_validation(tmp_path)["auc_macro"] == pytest.approx(aucs[-1])


def test_final_validation_refuses_an_unvalidated_last_epoch(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as w:  # max_epochs 8, val_interval 3: validated at 3 and 6 only
        for step in range(1, 8 * 5 + 1):
            w.add_scalar("train_loss", 1.0, step)
        for epoch in range(1, 9):
            w.add_scalar("lr", 0.1, epoch)
        for epoch in (3, 6):
            w.add_scalar("auc_macro", 0.7, epoch)
    curve = read_curve(tmp_path)
    assert curve["step"].tolist() == [15, 30]  # 5 iterations per epoch, not 40 / 6
    with pytest.raises(ValueError, match="multiple of val_interval"):
        final_validation(tmp_path)


def test_slimmed_hybrid_gets_exactly_the_first_k_stages(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pre = get_backbone("resnet18")
    ckpt = tmp_path / "pre.pt"
    torch.save({f"backbone.{k}": v for k, v in pre.state_dict().items()}, ckpt)
    net = classifier_def("resnet18", 3, 4, backbone_kwargs={"block_inplanes": [64, 128, 128, 256]})
    assert net.backbone.layer4[0].conv1.weight.shape[0] == 256 and net.backbone.feature_dim == 256
    load_pretrained(net, ckpt, mode="first_k", k=3)
    got, ref = net.backbone.state_dict(), pre.state_dict()
    for key, value in got.items():
        if key.startswith(("conv1.", "bn1.", "layer1.", "layer2.")):
            assert torch.equal(value, ref[key]), key
        elif value.is_floating_point() and value.dim() > 1:  # fresh, narrower upper stages
            assert value.shape != ref[key].shape or not torch.equal(value, ref[key]), key
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_random_init_checkpoint_is_seeded(tmp_path: Path) -> None:
    a = torch.load(random_init_checkpoint("cbr_tiny", 3, 0, tmp_path / "a.pt"), weights_only=True)
    b = torch.load(random_init_checkpoint("cbr_tiny", 3, 0, tmp_path / "b.pt"), weights_only=True)
    c = torch.load(random_init_checkpoint("cbr_tiny", 3, 1, tmp_path / "c.pt"), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["block2.cbr.conv.weight"], c["block2.cbr.conv.weight"])


@pytest.mark.timeout(1200)  # five ResNet-18 fine-tunes end to end: minutes on a loaded 2-core machine
def test_tiny_transfusion_runs(tmp_path: Path) -> None:
    from conftest import require_data

    ham, natural = require_data("ham10000"), require_data("natural")
    cfg = {
        "_base": str(tmp_path), "run_dir": "@tf",
        "table": {"path": str(ham / "metadata.csv"), "group_col": "lesion_id", "label_col": "dx",
                  "instance_col": "image_id", "subset": "mini"},
        "natural_dir": str(natural), "natural_size": 40,
        "common": {"image_size": 32, "in_channels": 3, "num_workers": 0},
        "phase1": {"max_epochs": 1, "batch_size": 4, "knn_interval": 0},
        "finetune": {"max_epochs": 2, "batch_size": 32, "label_fraction": 1.0},
        "models": ["resnet18"],
        "hybrid": {"model": "resnet18", "ks": [2], "slim": {"2": {"block_inplanes": [64, 64, 128, 256]}}},
        "mean_var": ["resnet18"],
        "targets": [0.5, 0.99],
        "similarity": {"max_examples": 300, "max_points": 64},
    }
    results = run_transfusion_and_summarize(cfg)
    run = tmp_path / "tf"
    assert sorted(results["init"]) == ["first_k", "first_k_slim", "mean_var", "phase1", "random"]
    # phase 1 ran on the shrunk copy of the image folder
    shrunk = sorted((run / "data" / "natural_40").glob("*.png"))
    assert len(shrunk) == len(list(natural.glob("*.png")) + list(natural.glob("*.jp*g")))
    from PIL import Image

    assert Image.open(shrunk[0]).size == (40, 40)
    for r in results.itertuples(index=False):
        curve = pd.read_csv(Path(r.after).parent.parent / "output" / "val_curve.csv")
        assert len(curve) == 2 and r.auc_macro == pytest.approx(curve["auc_macro"].iloc[-1])
        per_epoch = curve["step"].iloc[0] / curve["epoch"].iloc[0]
        for t in cfg["targets"]:  # naive reference: first validated epoch at or above t, in steps
            hits = [e for e, a in zip(curve["epoch"], curve["auc_macro"]) if a >= t]
            expect = round(hits[0] * per_epoch) if hits else None
            got = results.loc[results.run == r.run, f"steps_to_auc_{t:g}"].iloc[0]
            assert (pd.isna(got) and expect is None) or got == expect
    slim = results[results.init == "first_k_slim"].iloc[0]
    state = torch.load(slim["after"], weights_only=True)
    assert state["backbone.layer4.0.conv1.weight"].shape[0] == 256  # the slimmed top really was built
    log = (run / "logs" / "ft_hybrid_resnet18_first_k_slim_k2_s0.log").read_text()
    assert "mode=first_k" in log
    sim = pd.read_csv(run / "similarity_before_after.csv")
    assert set(sim["run"]) == set(results.loc[results.experiment == "init", "run"])
    assert len(sim) == 2 * 2 * 5  # 2 runs x 2 methods x 5 stages
    assert sim["similarity"].between(0, 1.0 + 1e-6).all()
    text = (run / "results.md").read_text()
    for section in ("## init", "## hybrid", "## mean_var", "similarity before vs after"):
        assert section in text
    assert (run / "curves.png").stat().st_size > 0 and (run / "similarity.png").stat().st_size > 0
    json.loads((run / "configs" / "ft_init_resnet18_random_s0.json").read_text())
