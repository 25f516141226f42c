"""`medssl pipeline` end to end on generated sample data, tiny budget: DICOM tree -> index -> split ->
MICLe -> fine-tune -> evaluate; phases with outputs are skipped on a second run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from medssl_monai.data import check_no_leakage, read_manifest
from medssl_monai.reporting.pipeline_report import run_pipeline_and_report
from medssl_monai.sample_data import make_sample_data


def test_pipeline_end_to_end_and_skip(tmp_path: Path, capsys) -> None:
    make_sample_data(tmp_path / "sample", n_patients=12)
    cfg = {
        "_base": str(tmp_path),
        "run_dir": "@run",
        "data": {"dicom_root": "@sample/dicom", "labels": "@sample/labels.csv",
                 "split": {"train": 0.5, "val": 0.25, "test": 0.25}, "label_fractions": [0.5, 1.0]},
        "common": {"backbone": "cbr_tiny", "image_size": 32, "in_channels": 1, "num_workers": 0},
        "phases": {"phase1": None, "micle": {"preset": "chest_xray", "max_epochs": 1, "batch_size": 4},
                   "finetune": {"max_epochs": 1, "batch_size": 4}, "evaluate": {"eval_split": "test"},
                   "predict": {"split": "test"}, "embed": {}},
        "label_efficiency": {"fractions": [0.5, 1.0], "seeds": {"0.5": [0, 1], "1.0": [0]}},
    }
    roots = run_pipeline_and_report(cfg, note="Generated images: a smoke run.")
    run = tmp_path / "run"
    manifest = read_manifest(run / "data" / "manifest.csv")
    check_no_leakage(manifest)
    assert manifest["patient_id"].str.startswith("P").all()  # pseudonymised
    assert not (run / "data" / "manifest.csv").read_text().count("SMP0")  # no original id on disk
    # phase 3 started from phase 2's model, and every phase left its config, log and outputs
    ft = json.loads((run / "configs" / "finetune.json").read_text())
    assert ft["overrides"]["pretrained_ckpt"] == str(roots["micle"] / "models" / "model.pt")
    for phase in ("micle", "finetune", "evaluate"):
        assert (run / "logs" / f"{phase}.log").stat().st_size > 0
        assert (run / "configs" / f"{phase}.json").is_file()
    assert list((roots["micle"] / "output" / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((roots["evaluate"] / "output" / "eval_test" / "metrics.json").read_text())
    assert {"accuracy", "balanced_accuracy", "auc_macro"} <= set(metrics)
    cm = pd.read_csv(roots["evaluate"] / "output" / "eval_test" / "confusion_matrix.csv", index_col=0)
    test_rows = manifest[(manifest["split"] == "test") & manifest["label"].notna()]
    assert int(cm.to_numpy().sum()) == len(test_rows)
    # the report: every section, its figures, and numbers that agree with the phases' own outputs
    report = (run / "report" / "report.md").read_text()
    assert report.splitlines()[2] == "**Generated images: a smoke run.**"  # said before any number
    for phase in ("micle", "finetune", "evaluate"):  # wall time as the runner recorded it, not log timestamps
        record = json.loads((run / "logs" / f"{phase}.json").read_text())
        assert record["exit"] == 0 and f"| {phase} | {roots[phase].name} | {record['seconds']:.0f} |" in report
    for section in ("## Data", "## Phases", "## Training curves", "## Evaluation on the `test` split",
                    "## Learned embeddings", "## Subgroups", "## Label efficiency"):
        assert section in report, section
    for png in ("curves_micle.png", "curves_finetune.png", "confusion_matrix.png", "embeddings_pca.png"):
        assert (run / "report" / png).stat().st_size > 5000, png
    assert f"| {metrics['balanced_accuracy']:.3f} |" in report
    sub = pd.read_csv(run / "report" / "subgroups.csv")
    assert set(sub["subgroup"]) >= {"view_position"} and sub.groupby("subgroup")["n"].sum().max() == len(test_rows)
    assert str(manifest["patient_id"].iloc[0]) not in report or manifest["patient_id"].iloc[0].startswith("P")
    # label efficiency: the fine-tuning recipe per fraction x seed, pretrained vs random, with seed counts
    le = pd.read_csv(run / "label_efficiency" / "results.csv")
    assert sorted(zip(le["arm"], le["fraction"], le["seed"])) == sorted(
        (a, f, s) for a in ("pretrained", "random") for f, s in ((0.5, 0), (0.5, 1), (1.0, 0)))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for r in le.itertuples(index=False):  # each number is the run's own last validation AUC
        root = (roots["finetune"] if (r.arm, r.fraction, r.seed) == ("pretrained", 1.0, 0) else
                run / "label_efficiency" / f"{r.arm}_f{r.fraction:g}_s{r.seed}" / "finetune_classification")
        acc = EventAccumulator(str(root / "output" / "tensorboard"))
        acc.Reload()
        # TensorBoard stores float32: the independent reference agrees to its precision; metrics.csv exactly
        assert r.auc_macro == pytest.approx(acc.Scalars("auc_macro")[-1].value, rel=1e-6)
        assert r.auc_macro == pd.read_csv(root / "output" / "metrics.csv")["auc_macro"].iloc[-1]
        if (r.arm, r.fraction, r.seed) == ("pretrained", 1.0, 0):  # the fine-tuning phase itself: not re-run
            assert not (run / "configs" / "le_pretrained_1_s0.json").exists()
            continue
        cfg_used = json.loads((run / "configs" / f"le_{r.arm}_{r.fraction:g}_s{r.seed}.json").read_text())
        ckpt = cfg_used["overrides"]["pretrained_ckpt"]
        assert ckpt == (None if r.arm == "random" else str(roots["micle"] / "models" / "model.pt"))
    g = le[(le.arm == "pretrained") & (le.fraction == 0.5)]
    assert f"| pretrained | 50% | {g.balanced_accuracy.mean():.3f} ± {g.balanced_accuracy.std():.3f} |" in report
    assert (run / "report" / "label_efficiency.png").stat().st_size > 5000
    # a second run skips every phase whose outputs exist
    capsys.readouterr()
    run_pipeline_and_report(cfg)
    out = capsys.readouterr().out
    assert not any(f"[{p}" in out for p in ("micle", "finetune", "evaluate", "predict", "embed", "le_")), out


def test_extends_merges_sections_and_keeps_each_files_paths(tmp_path: Path) -> None:
    """A variant config names only what it changes; '@' paths keep meaning what they meant in their file."""
    import pytest

    from medssl_monai.experiments.config import load_config

    (tmp_path / "base").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "base" / "study.json").write_text(json.dumps({
        "arms": ["random"], "table": {"path": "@data/meta.csv", "label_col": "dx"},
        "finetune": {"max_epochs": 4, "lr": 0.05}, "fractions": [0.1, 1.0], "_comment": "the parent"}))
    (tmp_path / "var" / "v.json").write_text(json.dumps({
        "extends": "@../base/study.json", "finetune": {"max_epochs": 10}, "fractions": [0.2],
        "run_dir": "@runs/v"}))
    (tmp_path / "var" / "no_run_dir.json").write_text(json.dumps({"extends": "@../base/study.json"}))
    (tmp_path / "base" / "with_run_dir.json").write_text(json.dumps({"arms": [], "run_dir": "@runs/base"}))
    (tmp_path / "var" / "inherits.json").write_text(json.dumps({"extends": "@../base/with_run_dir.json"}))
    assert "run_dir" not in load_config(tmp_path / "var" / "inherits.json", required="arms")
    cfg = load_config(tmp_path / "var" / "v.json", required="arms")
    assert cfg["finetune"] == {"max_epochs": 10, "lr": 0.05}  # sections merge key by key
    assert cfg["fractions"] == [0.2]  # lists replace
    assert cfg["table"] == {"path": str(tmp_path / "base" / "data" / "meta.csv"), "label_col": "dx"}
    assert cfg["run_dir"] == "@runs/v" and cfg["_base"] == str(tmp_path / "var")  # the child's own stay relative
    assert "_comment" not in cfg and "extends" not in cfg
    (tmp_path / "base" / "study.json").write_text(json.dumps({"extends": "@../var/v.json", "arms": []}))
    with pytest.raises(ValueError, match="loops back"):
        load_config(tmp_path / "var" / "v.json", required="arms")
    (tmp_path / "var" / "w.json").write_text(json.dumps({"extends": "nowhere.json", "arms": []}))
    with pytest.raises(ValueError, match=r"nowhere\.json, which does not exist"):
        load_config(tmp_path / "var" / "w.json", required="arms")


def test_select_phase_chooses_what_the_finetune_phase_trains_on(tmp_path: Path) -> None:
    """``phases.select`` between MICLe and the fine-tune: TypiClust on MICLe's embedding picks whole patients
    of the training pool; the unchanged fine-tune bundle trains on exactly the worklist's images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medssl_monai.experiments.pipeline import run_pipeline

    make_sample_data(tmp_path / "sample", n_patients=12)
    cfg = {
        "_base": str(tmp_path),
        "run_dir": "@run",
        "data": {"dicom_root": "@sample/dicom", "labels": "@sample/labels.csv",
                 "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "common": {"backbone": "cbr_tiny", "image_size": 32, "in_channels": 1, "num_workers": 0},
        "phases": {"micle": {"preset": "chest_xray", "max_epochs": 1, "batch_size": 4},
                   "select": {"strategy": "typiclust", "budget": 3, "level": "patient", "seed": 0},
                   "finetune": {"max_epochs": 1, "batch_size": 2}},
    }
    roots = run_pipeline(cfg)
    run = tmp_path / "run"
    manifest = read_manifest(run / "data" / "manifest.csv", resolve_paths=False)
    worklist = pd.read_csv(run / "select" / "worklist.csv")
    train = manifest[manifest["split"] == "train"]
    assert worklist["patient_id"].nunique() == 3 and set(worklist["patient_id"]) <= set(train["patient_id"])
    for pid in set(worklist["patient_id"]):  # whole patients: every training image of a chosen patient
        assert set(worklist.loc[worklist["patient_id"] == pid, "sop_uid"]) == set(
            train.loc[train["patient_id"] == pid, "sop_uid"])
    ft = json.loads((run / "configs" / "finetune.json").read_text())["overrides"]
    selection = json.loads((run / "select" / "selection.json").read_text())
    assert ft["manifest"] == str(run / "select" / "manifest.csv")
    assert ft["label_fraction"] == selection["budgets"][0]["label_fraction"]
    assert selection["checkpoint_sha256"] and selection["split"] == "train"
    n_train = int(manifest.set_index("sop_uid").loc[worklist["sop_uid"], "label"].notna().sum())
    acc = EventAccumulator(str(roots["finetune"] / "output" / "tensorboard"))
    acc.Reload()
    assert len(acc.Scalars("train_loss")) == -(-n_train // 2)  # one epoch over exactly the selected images


@pytest.mark.parametrize("phases, words", [
    ({"micle": {}, "select": {"budget": 3}}, "chooses what phase 'finetune' trains on"),
    ({"micle": {}, "select": {"budget": 3, "fraction": 0.1}, "finetune": {}}, "give one of 'fraction'"),
    ({"micle": {}, "select": {"fraction": 1.5}, "finetune": {}}, "phases.select.fraction: a number in (0, 1)"),
    ({"micle": {}, "select": {"budget": 3, "strategy": "typical"}, "finetune": {}}, "'typical' is not one of"),
    ({"micle": {}, "select": {"budget": 3, "levle": "patient"}, "finetune": {}}, "unknown key 'levle'"),
    ({"finetune": {}, "select": {"budget": 3}}, "embeds with phase 'micle or phase1'"),
    ({"micle": {}, "select": {"budget": 3}, "finetune": {"label_fraction": 0.5}}, "set by phases.select"),
])
def test_select_phase_problems_are_found_before_anything_runs(tmp_path: Path, phases, words) -> None:
    from medssl_monai.experiments.pipeline import validate_pipeline

    problems = validate_pipeline({"_base": str(tmp_path), "data": {"manifest": "m.csv"}, "phases": phases})
    assert any(words in p for p in problems), problems


def test_former_phase_name_still_runs_with_a_warning_and_both_names_are_refused(tmp_path: Path, caplog) -> None:
    """Phase 1 is ``phase1`` in every config (study, transfusion, pipeline); ``simclr`` is its former
    pipeline name: accepted with a warning, and refused beside the current name."""
    import logging

    from medssl_monai.experiments.pipeline import validate_pipeline, with_current_names
    from medssl_monai.experiments.transfusion import validate_transfusion

    base = {"_base": str(tmp_path), "data": {"manifest": "m.csv"}}
    old = {**base, "phases": {"simclr": {"max_epochs": 1}, "micle": {}}}
    assert validate_pipeline(old) == validate_pipeline({**base, "phases": {"phase1": {"max_epochs": 1}, "micle": {}}})
    with caplog.at_level(logging.WARNING):
        current, problems = with_current_names(old)
    assert problems == [] and current["phases"] == {"phase1": {"max_epochs": 1}, "micle": {}}
    assert "'simclr' is now called 'phase1'" in caplog.text
    both = validate_pipeline({**base, "phases": {"simclr": {}, "phase1": {}}})
    assert "phases: 'simclr' is the former name of 'phase1'; give only 'phase1'" in both
    assert any("'pretrain' is the former name of 'phase1'" in p
               for p in validate_transfusion({"pretrain": {}, "phase1": {}, "models": ["cbr_tiny"]}, check_data=False))
    assert not any("pretrain" in p for p in validate_transfusion({"pretrain": {"max_epochs": 1},
                                                                   "models": ["cbr_tiny"]}, check_data=False))
