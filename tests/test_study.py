"""The label-efficiency study: its configs validate (CI checks them without running them in full), bad
configs are refused with reasons, and a tiny study really runs arms x fractions x seeds end to end."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medssl_monai.pipeline import load_pipeline_config
from medssl_monai.study import run_study, validate_study

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "experiments").glob("*label_efficiency*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_study_configs_are_valid(path: Path) -> None:
    from conftest import require_data

    require_data("ham10000")
    cfg = load_pipeline_config(path, required="arms")
    assert validate_study(cfg) == []
    assert set(cfg["arms"]) == {"random", "phase1", "phase1_simclr", "phase1_micle"}  # the four arms of issue 5
    assert {0.1, 0.2, 1.0} <= {float(f) for f in cfg["fractions"]}


def test_bad_study_config_is_refused(tmp_path: Path) -> None:
    cfg = load_pipeline_config(CONFIGS[0], required="arms")
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
    results = run_study(cfg)
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
    again = run_study({**cfg, "eval_from_validation": True})
    merged = results.merge(again, on=["arm", "fraction", "seed"], suffixes=("_eval", "_val"))
    assert len(merged) == len(results)
    for metric in ("balanced_accuracy", "auc_macro"):
        assert merged[f"{metric}_val"].to_numpy() == pytest.approx(merged[f"{metric}_eval"].to_numpy(), abs=1e-6)
    assert validate_study({**cfg, "eval_from_validation": True, "eval_split": "test"}, check_data=False)
