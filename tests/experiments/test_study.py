"""The label-efficiency study: its configs validate (CI checks them without running them in full), bad
configs are refused with reasons, and a tiny study really runs arms x fractions x seeds end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from medssl_monai.experiments.config import load_config
from medssl_monai.experiments.study import validate_study
from medssl_monai.reporting.study_summary import run_study_and_summarize

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "configs" / "experiments").glob("*.json")
                 if ("label_efficiency" in p.name or "selection" in p.name) and "h100" not in p.name
                 and "lease" not in p.name)
VARIANTS = sorted((REPO / "configs" / "experiments" / "variants").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_study_configs_are_valid(path: Path) -> None:
    from conftest import require_data

    require_data("ham10000")
    cfg = load_config(path, required="arms")
    assert validate_study(cfg) == []
    if "selection" in cfg:  # issue 20: budgets 1-10% (CPU; 20% on a larger machine) at lesion level, three
        # strategies on MICLe, the random init beside it with random selection at least
        assert set(cfg["arms"]) == {"random", "phase1_micle"} and cfg["selection"]["level"] == "patient"
        assert set(cfg["selection"]["strategies"]) == {"random", "typiclust", "kcenter"}
        per_arm = cfg["selection"].get("strategies_per_arm") or {}
        if "random_init" in path.name:  # the complement: the random init on the selections, MICLe pretrained only
            assert per_arm == {"random": ["typiclust", "kcenter"], "phase1_micle": []}
        else:
            assert "phase1_micle" not in per_arm  # every strategy on MICLe
            assert "random" in per_arm.get("random", ["random"])
        assert {0.01, 0.02, 0.05, 0.1} <= {float(f) for f in cfg["fractions"]}
        assert all(len(s) >= 3 for f, s in cfg["seeds"].items() if float(f) < 1)
        assert "blind" in cfg["predict_sets"]
        return
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


@pytest.mark.timeout(1200)  # every arm pretrains and fine-tunes end to end: minutes on a loaded 2-core machine
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


def test_every_fine_tuned_model_predicts_the_predict_sets(tmp_path: Path) -> None:
    """``predict_sets``: each fine-tune writes one CSV of the blind images (predicted, never trained on), every
    ``blind_id`` once, probabilities summing to 1; a resumed study does not predict again."""
    from conftest import require_data

    ham, blind = require_data("ham10000"), require_data("blind", "ham10000_test")
    images = pd.read_csv(blind / "images.csv", dtype=str).head(12)
    images.assign(path=[str(blind / p) for p in images["path"]]).to_csv(tmp_path / "blind12.csv", index=False)
    cfg = {
        "_base": str(tmp_path), "run_dir": "@study",
        "table": {"path": str(ham / "metadata.csv"), "group_col": "lesion_id", "label_col": "dx",
                  "instance_col": "image_id", "subset": "mini"},
        "common": {"backbone": "cbr_tiny", "image_size": 32, "in_channels": 3, "num_workers": 0},
        "finetune": {"max_epochs": 1, "batch_size": 32},
        "arms": ["random"], "fractions": [0.2, 1.0], "seeds": {"0.2": [0], "1.0": [0]}, "min_seeds": 1,
        "eval_from_validation": True, "predict_sets": {"blind": "@blind12.csv"},
    }
    assert validate_study({**cfg, "predict_sets": {"bad name": "@blind12.csv"}})
    assert validate_study({**cfg, "predict_sets": {"blind": "@absent.csv"}})
    run_study_and_summarize(cfg)
    written = sorted((tmp_path / "study" / "predict_sets" / "blind").glob("*.csv.gz"))
    assert [p.name for p in written] == ["random_f0.2_s0.csv.gz", "random_f1_s0.csv.gz"]
    for path in written:
        preds = pd.read_csv(path, dtype={"blind_id": str})
        assert sorted(preds["blind_id"]) == sorted(images["blind_id"])
        probs = preds.drop(columns="blind_id")
        assert all(c.startswith("prob_") for c in probs.columns) and len(probs.columns) >= 2
        assert probs.sum(axis=1).to_numpy() == pytest.approx(1.0, abs=1e-3)
    # the two models differ, so do their predictions (the 20% subset may lack a class the full set has)
    a, b = (pd.read_csv(p).set_index("blind_id").sort_index() for p in written)
    common = [c for c in a.columns if c in b.columns]
    assert common and not (a[common].to_numpy() == b[common].to_numpy()).all()
    stamps = [p.stat().st_mtime_ns for p in written]
    run_study_and_summarize(cfg)  # resumed: finished fine-tunes and their predictions are kept
    assert [p.stat().st_mtime_ns for p in written] == stamps
    # finished_only (a study stopped early, or still running elsewhere): nothing trains; the finished runs
    # are reported and predict what they have not predicted yet
    run = tmp_path / "study"
    removed = run / "finetune" / "random" / "f1_s0" / "finetune_classification" / "models" / "model.pt"
    removed.unlink()
    written[0].unlink()
    logs = sorted(p.name for p in (run / "logs").glob("*.json"))
    partial = run_study_and_summarize(cfg, finished_only=True)
    assert list(zip(partial["arm"], partial["fraction"])) == [("random", 0.2)]
    assert [p.name for p in sorted((run / "predict_sets" / "blind").glob("*.csv.gz"))] == [p.name for p in written]
    assert pd.read_csv(written[0])["blind_id"].nunique() == len(images)
    new_logs = sorted(set(p.name for p in (run / "logs").glob("*.json")) - set(logs))
    assert new_logs == [] or all(n.startswith("predict_blind_") for n in new_logs)  # no training, no selection
    assert not removed.exists()  # the unfinished fine-tune was not trained again (its log name already existed)
    assert (run / "results.csv").is_file() and len(pd.read_csv(run / "results.csv")) == 1
    empty = run_study_and_summarize({**cfg, "run_dir": "@nothing_yet"}, finished_only=True)
    assert empty.empty and not (tmp_path / "nothing_yet" / "finetune").exists()
    with pytest.raises(ValueError, match="finished_only"):
        run_study_and_summarize(cfg, force=True, finished_only=True)


def test_selection_study_trains_each_strategy_on_its_own_nested_budgets(tmp_path: Path) -> None:
    """``selection``: per strategy and seed the budgets are chosen on the features model's embedding of the
    training lesions (nested), each fine-tune trains on exactly its selection, 100% is trained once."""
    import torch
    from conftest import require_data

    from medssl_monai.networks import get_backbone

    ham = require_data("ham10000")
    torch.manual_seed(0)
    torch.save(get_backbone("cbr_tiny", in_channels=3).state_dict(), tmp_path / "features.pt")
    cfg = {
        "_base": str(tmp_path), "run_dir": "@study",
        "table": {"path": str(ham / "metadata.csv"), "group_col": "lesion_id", "label_col": "dx",
                  "instance_col": "image_id", "subset": "mini"},
        "common": {"backbone": "cbr_tiny", "image_size": 32, "in_channels": 3, "num_workers": 0},
        "finetune": {"max_epochs": 1, "batch_size": 32},
        "arms": ["random"], "fractions": [0.1, 0.2, 1.0], "seeds": {"0.1": [0], "0.2": [0], "1.0": [0]},
        "min_seeds": 1, "eval_from_validation": True, "pretrained": {"phase1_micle": "@features.pt"},
        "selection": {"strategies": ["random", "kcenter"], "features": "phase1_micle", "level": "patient"},
    }
    assert validate_study({**cfg, "selection": {"strategies": ["best"]}})
    assert validate_study({**cfg, "selection": {"strategies": ["random"], "features": "phase1_simclr"}})
    results = run_study_and_summarize(cfg)
    run = tmp_path / "study"
    assert sorted(zip(results["arm"], results["fraction"])) == [
        ("random", 1.0), ("random:kcenter", 0.1), ("random:kcenter", 0.2), ("random:random", 0.1),
        ("random:random", 0.2)]
    assert {c for c in results.columns if c.startswith("recall_")} and set(results["strategy"]) == {
        "all", "random", "kcenter"}
    chosen = {}
    for strategy in ("random", "kcenter"):
        m = pd.read_csv(run / "selection" / f"{strategy}_s0" / "manifest.csv", dtype=str)
        small, large = (m[c].str.lower() == "true" for c in ("labeled_10pct", "labeled_20pct"))
        assert (small <= large).all() and small.sum() < large.sum()  # nested
        assert set(m.loc[large, "split"]) == {"train"}  # only training lesions are ever selected
        lesions = m.groupby("patient_id")["labeled_10pct"].nunique()
        assert (lesions == 1).all()  # a lesion's images are selected together
        chosen[strategy] = frozenset(m.loc[small, "sop_uid"])
        # the fine-tunes trained on their selections: iterations per epoch follow the selected image counts
        for col, frac in (("labeled_10pct", "0.1"), ("labeled_20pct", "0.2")):
            n = int((m[col].str.lower() == "true").sum())
            log = (run / "logs" / f"ft_{strategy}_random_{frac}_s0.log").read_text()
            iters = int(re.search(r"Iter: \d+/(\d+)", log).group(1))
            assert iters in {n // 32, -(-n // 32)}, (strategy, frac, n, iters)
    assert chosen["random"] != chosen["kcenter"]
    # a second run re-uses the finished selections (nothing is clustered again) and every finished run
    selections = {f: f.stat().st_mtime_ns for f in (run / "selection").glob("*/selection.json")}
    again = run_study_and_summarize(cfg)
    assert {f: f.stat().st_mtime_ns for f in (run / "selection").glob("*/selection.json")} == selections
    assert again.equals(results)
    # strategies_per_arm: an arm trained on some strategies' selections only (the others' runs are not made)
    assert validate_study({**cfg, "selection": {**cfg["selection"], "strategies_per_arm": {"micle": ["random"]}}})
    assert validate_study({**cfg, "selection": {**cfg["selection"], "strategies_per_arm": {"random": ["typiclust"]}}})
    only = run_study_and_summarize({**cfg, "run_dir": "@study2", "fractions": [0.1], "seeds": {"0.1": [0]},
                                    "selection": {**cfg["selection"], "strategies_per_arm": {"random": ["kcenter"]}}})
    assert list(only["arm"]) == ["random:kcenter"]
    # an empty list: the arm is pretrained (e.g. for the features) but fine-tunes no selection
    assert not validate_study({**cfg, "selection": {**cfg["selection"], "strategies_per_arm": {"random": []}}})


def test_selection_lease_config_is_random_vs_typiclust_on_the_lease_micle() -> None:
    cfg = load_config(REPO / "configs/experiments/ham10000_selection_lease.json", required="arms")
    assert validate_study(cfg, check_data=False) == []
    assert cfg["selection"]["strategies"] == ["random", "typiclust"] and cfg["fractions"] == [0.05, 0.1]
    assert cfg["common"]["cache"] == "device" and "blind" in cfg["predict_sets"]  # the lease study's settings
    assert cfg["pretrained"]["phase1_micle"].endswith("ham10000_label_efficiency_lease/pretrain/phase1_micle/"
                                                      "micle_medical/models/model.pt")
