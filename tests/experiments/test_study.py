"""The label-efficiency study: its configs validate (CI checks them without running them in full), bad
configs are refused with reasons, and a tiny study really runs arms x fractions x seeds end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from medssl_monai.experiments.config import load_config
from medssl_monai.experiments.study import validate_study
from medssl_monai.reporting.study_summary import run_study_and_summarize

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "configs" / "experiments").glob("*label_efficiency*.json")
                 if "h100" not in p.name and "lease" not in p.name)
VARIANTS = sorted((REPO / "configs" / "experiments" / "variants").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_study_configs_are_valid(path: Path) -> None:
    from conftest import require_data

    require_data("ham10000")
    cfg = load_config(path, required="arms")
    assert validate_study(cfg) == []
    assert {"random", "phase1", "phase1_simclr", "phase1_micle"} <= set(cfg["arms"])  # the four arms of issue 5
    if "gpu" not in path.name:
        assert "supervised" in cfg["arms"]  # issue 11's fifth arm, on CPU too
    assert {0.1, 0.2, 1.0} <= {float(f) for f in cfg["fractions"]}


def test_h100_config_is_the_gpu_study_cut_to_a_lease() -> None:
    """The config run on the lent H100 reads the packed data copy (absent here: checked without data)."""
    cfg = load_config(REPO / "configs/experiments/ham10000_label_efficiency_h100.json", required="arms")
    assert validate_study(cfg, check_data=False) == []
    gpu = load_config(REPO / "configs/experiments/ham10000_label_efficiency_gpu.json", required="arms")
    assert cfg["common"]["backbone"] == gpu["common"]["backbone"] and cfg["arms"] == gpu["arms"]
    assert cfg["table"]["path"].endswith(".gpu_data/ham10000/metadata.csv")
    assert cfg["table"]["group_col"] == "lesion_id"  # inherited from the GPU config by ``extends``


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: p.name)
def test_variant_configs_change_one_thing(path: Path) -> None:
    """Each issue-5 variant validates and reuses a pretrained model of the run it varies (so only the named
    change differs); the checkpoints are run outputs, so the data check is off."""
    cfg = load_config(path, required="arms")
    assert validate_study(cfg, check_data=False) == []
    assert cfg["pretrained"]
    base = Path(cfg["_base"])
    raw = json.loads(path.read_text())
    parent = load_config(path.parent / raw["extends"].lstrip("@"), "arms")  # never the parent's folder
    assert (base / cfg["run_dir"][1:]).resolve() != (Path(parent["_base"]) / parent["run_dir"][1:]).resolve()
    assert "Issue 5 variant" in cfg["_comment"]  # each says what it changes
    for ckpt in cfg["pretrained"].values():
        p = Path(ckpt[1:]) if ckpt.startswith("@") else Path(ckpt)
        assert (base / p).resolve().parts[-6] in ("ham10000_label_efficiency", "ham10000_label_efficiency_h100")


def test_bad_study_config_is_refused(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS[0], required="arms")
    cfg.update(arms=["random", "imagenet21k"], seeds={"0.1": [0], "0.2": [0, 1, 2], "1.0": [0]},
               finetune={"learning_rate": 0.1})
    problems = validate_study(cfg, check_data=False)
    assert any("imagenet21k" in p for p in problems)
    assert any("fraction 0.1: 1 seed" in p for p in problems)
    assert any("learning_rate" in p for p in problems)


def test_tiny_study_runs(tmp_path: Path) -> None:
    from conftest import require_data

    ham, natural = require_data("ham10000"), require_data("natural")
    cfg = {
        "_base": str(tmp_path), "run_dir": "@study",
        "table": {"path": str(ham / "metadata.csv"), "group_col": "lesion_id", "label_col": "dx",
                  "instance_col": "image_id", "subset": "mini"},
        "natural_dir": str(natural),
        "common": {"backbone": "cbr_tiny", "image_size": 32, "in_channels": 3, "num_workers": 0},
        "phase1": {"max_epochs": 1, "batch_size": 4},
        "medical": {"max_epochs": 1, "batch_size": 32, "knn_interval": 0},
        "finetune": {"max_epochs": 1, "batch_size": 32},
        "arms": ["random", "phase1_micle"], "fractions": [0.2, 1.0],
        "seeds": {"0.2": [0, 1], "1.0": [0]}, "min_seeds": 2, "eval_split": "val",
    }
    results = run_study_and_summarize(cfg)
    run = tmp_path / "study"
    assert len(results) == 2 * 3 and set(results["arm"]) == {"random", "phase1_micle"}
    assert results["balanced_accuracy"].between(0, 1).all() and results["auc_macro"].between(0, 1).all()
    # the MICLe arm's fine-tunes started from its own pretraining, which started from phase 1
    log = (run / "logs" / "pretrain_phase1_micle.log").read_text()
    assert "pretrained model.pt -> backbone" in log
    ft = (run / "logs" / "ft_phase1_micle_0.2_s1.log").read_text()
    assert "pretrained model.pt -> backbone" in ft
    assert "no pretrained checkpoint" in (run / "logs" / "ft_random_0.2_s0.log").read_text()
    md = (run / "results.md").read_text()
    assert "| phase1_micle | 20% |" in md and "| 2 |" in md  # seed counts are reported
    assert (run / "label_efficiency.png").stat().st_size > 5000
    assert pd.read_csv(run / "results.csv").shape == (6, 6)
    # reading the fine-tune's own last validation pass gives the separate evaluation's numbers (same model,
    # same val images): the CPU config uses it to save one bundle run per fine-tune
    again = run_study_and_summarize({**cfg, "eval_from_validation": True})
    merged = results.merge(again, on=["arm", "fraction", "seed"], suffixes=("_eval", "_val"))
    assert len(merged) == len(results)
    for metric in ("balanced_accuracy", "auc_macro"):
        assert merged[f"{metric}_val"].to_numpy() == pytest.approx(merged[f"{metric}_eval"].to_numpy(), abs=1e-6)
    assert validate_study({**cfg, "eval_from_validation": True, "eval_split": "test"}, check_data=False)
    # another run reusing this one's pretrained models (nothing is pretrained again), two fine-tunes at a time,
    # random init only at 100%: the same seeds give the same numbers as the sequential first run
    models = {"phase1": str(run / "pretrain/phase1/simclr_natural/models/model.pt"),
              "phase1_micle": str(run / "pretrain/phase1_micle/micle_medical/models/model.pt")}
    reuse = run_study_and_summarize({**cfg, "run_dir": "@reuse", "pretrained": models, "parallel_finetunes": 2,
                       "fractions_per_arm": {"random": [1.0]}, "natural_dir": "/nonexistent"})
    assert not (tmp_path / "reuse" / "pretrain").exists()
    assert sorted(map(tuple, reuse[["arm", "fraction", "seed"]].to_numpy().tolist())) == sorted(
        [("phase1_micle", 0.2, 0), ("phase1_micle", 0.2, 1), ("phase1_micle", 1.0, 0), ("random", 1.0, 0)])
    same = reuse.merge(again, on=["arm", "fraction", "seed"], suffixes=("_reuse", "_first"))
    assert len(same) == 4
    for metric in ("balanced_accuracy", "auc_macro"):
        assert same[f"{metric}_reuse"].to_numpy() == pytest.approx(same[f"{metric}_first"].to_numpy(), abs=1e-6)


def test_repeats_and_missing_fractions_are_refused() -> None:
    cfg = load_config(CONFIGS[0], required="arms")
    problems = validate_study({**cfg, "fractions": [0.2, 0.2], "seeds": {"0.2": [0, 0, 1]}}, check_data=False)
    assert any("repeated fractions" in p for p in problems) and any("repeated seeds" in p for p in problems)
    no_fractions = {k: v for k, v in cfg.items() if k != "fractions"}
    problems = validate_study({**no_fractions, "fractions_per_arm": {"random": [1.0], "phase1": 0.2}},
                              check_data=False)
    assert any("fractions_per_arm.phase1: expected a list" in p for p in problems)
    assert any("arm 'phase1_micle' has no fractions" in p for p in problems)


def test_parallel_finetunes_stop_at_the_first_failure(tmp_path: Path) -> None:
    """A failing fine-tune ends the study with its error; queued runs are not started."""
    from conftest import require_data

    ham = require_data("ham10000")
    cfg = {"_base": str(tmp_path), "run_dir": "@study",
           "table": {"path": str(ham / "metadata.csv"), "group_col": "lesion_id", "label_col": "dx",
                     "instance_col": "image_id", "subset": "mini"},
           "common": {"backbone": "no_such_backbone", "image_size": 32, "num_workers": 0},
           "arms": ["random"], "fractions": [0.2, 1.0], "seeds": {"0.2": [0, 1, 2], "1.0": [0, 1]},
           "parallel_finetunes": 2}
    with pytest.raises(RuntimeError, match="failed"):
        run_study_and_summarize(cfg)
    assert 2 <= len(list((tmp_path / "study" / "logs").glob("ft_*.log"))) < 5


def test_study_config_keys_are_checked(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS[0], required="arms")
    problems = validate_study({**cfg, "pretrained": {"phase1_micle": str(tmp_path / "missing.pt"), "random": "x"},
                               "fractions_per_arm": {"phase1": [0.5], "unknown_arm": [1.0]},
                               "parallel_finetunes": 0}, check_data=True)
    assert any("missing.pt" in p and "not found" in p for p in problems)
    assert any("'random' is neither" in p for p in problems)
    assert any("no seeds for fraction 0.5" in p for p in problems)
    assert any("unknown_arm" in p for p in problems)
    assert any("parallel_finetunes" in p for p in problems)


def test_lease_config_is_the_whole_study_with_five_arms() -> None:
    cfg = load_config(REPO / "configs/experiments/ham10000_label_efficiency_lease.json", required="arms")
    assert validate_study(cfg, check_data=False) == []
    assert set(cfg["arms"]) == {"random", "phase1", "phase1_simclr", "phase1_micle", "supervised"}
    assert cfg["medical_per_arm"]["phase1_micle"]["max_epochs"] >= 100
    assert {float(f) for f in cfg["fractions"]} == {0.1, 0.2, 1.0} and all(len(v) == 3 for v in cfg["seeds"].values())
    assert cfg["common"]["cache"] == "device" and cfg["medical"]["views_on"] == "device"


def _class_folders(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            d = root / "train" / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = np.full((24, 24, 3), 60 + 120 * c, dtype=np.uint8)
            Image.fromarray(np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)).save(
                d / f"{i}.png")
    return root


def test_supervised_arm_trains_on_natural_labels_then_fine_tunes(tmp_path: Path) -> None:
    from conftest import require_data

    from medssl_monai.experiments.study import natural_manifest

    natural = _class_folders(tmp_path / "nat")
    m = pd.read_csv(natural_manifest(natural, tmp_path / "natural.csv", holdout_every=3))
    assert set(m["label"]) == {"class0", "class1"} and (m["split"] == "val").sum() == 4  # no val/: held out
    ham = require_data("ham10000")
    cfg = {
        "_base": str(tmp_path), "run_dir": "@study",
        "table": {"path": str(ham / "metadata.csv"), "group_col": "lesion_id", "label_col": "dx",
                  "instance_col": "image_id", "subset": "mini"},
        "natural_dir": str(natural),
        "common": {"backbone": "cbr_tiny", "image_size": 16, "in_channels": 3, "num_workers": 0, "cache": "host",
                   "source_size": [24, 32]},
        "supervised": {"max_epochs": 1, "batch_size": 4, "source_size": [24, 24]},
        "finetune": {"max_epochs": 1, "batch_size": 32},
        "arms": ["supervised"], "fractions": [1.0], "seeds": {"1.0": [0]}, "min_seeds": 1,
        "eval_from_validation": True,
    }
    assert validate_study(cfg) == []
    results = run_study_and_summarize(cfg)
    run = tmp_path / "study"
    assert list(results["arm"]) == ["supervised"]
    pre = (run / "logs" / "pretrain_supervised.log").read_text()
    assert "saved" in pre and "class0" in pre  # a classifier of the natural classes
    ft = (run / "logs" / "ft_supervised_1_s0.log").read_text()
    assert "pretrained model.pt -> backbone" in ft and "missing 0" in ft
    assert (run / "image_cache").is_dir()  # the study's one cache, shared by the runs
