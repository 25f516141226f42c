"""The pipeline's run report: ``report.md`` + PNG plots from what the pipeline's phases wrote; and the
step after a pipeline's runs (:func:`finish_pipeline`: results back to the PACS, then the report).

Training curves come from the phases' TensorBoard event files, evaluation from ``evaluate.json``'s
metrics and confusion matrix, the embedding projection from the pretraining bundle's embeddings table, and
per-subgroup results from the classifier's predictions joined to the manifest on ``sop_uid`` (so the
report never needs image paths, and a pseudonymised manifest stays pseudonymised).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..data.manifest import read_manifest
from ..experiments.label_efficiency import summarize
from ..experiments.pipeline import PipelineRun, run_pipeline
from ..experiments.runner import run_seconds
from ..utils.atomic import atomic_write_text
from .dicom_sr import run_results_to_pacs
from .markdown import label_efficiency_table, md_table
from .plots import plot_curves, plot_embeddings, plot_label_efficiency

__all__ = ["DEMO_NOTE", "build_report", "finish_pipeline", "run_pipeline_and_report", "subgroup_table"]

logger = logging.getLogger(__name__)

SUBGROUP_COLUMNS = ("sex", "age_band", "localization", "modality", "view_position", "body_part", "dx_type")
#: what ``make demo``'s report says first
DEMO_NOTE = ("Smoke run on generated images (medssl_monai.sample_data: synthetic shapes in DICOM files), not "
             "evidence: these numbers show that the pipeline runs end to end, not how well a model learns "
             "from real data.")


def subgroup_table(pred: pd.DataFrame, manifest: pd.DataFrame, columns=SUBGROUP_COLUMNS) -> pd.DataFrame:
    """Accuracy, balanced accuracy and macro AUC of the predictions per subgroup value."""
    from ..metrics.classification import balanced_accuracy, roc_auc_ovr

    m = manifest.drop_duplicates("sop_uid").set_index("sop_uid")
    df = pred.copy()
    df["label"] = df["sop_uid"].map(m["label"])
    df = df[df["label"].notna()]
    if "age" in m.columns:
        age = pd.to_numeric(df["sop_uid"].map(m["age"]), errors="coerce")
        df["age_band"] = pd.cut(age, [0, 30, 45, 60, 75, 200], right=False,
                                labels=["<30", "30-44", "45-59", "60-74", "75+"]).astype("string")
    classes = [c.removeprefix("prob_") for c in df.columns if c.startswith("prob_")]
    rows = []
    for col in columns:
        if col != "age_band":
            if col not in m.columns:
                continue
            df[col] = df["sop_uid"].map(m[col]).astype("string")
        if col not in df.columns or df[col].isna().all():
            continue
        for value, g in df.groupby(col, dropna=True):
            y = [classes.index(v) for v in g["label"]]
            probs = g[[f"prob_{c}" for c in classes]].to_numpy()
            auc = float(roc_auc_ovr(y, probs)) if len(set(y)) > 1 else float("nan")
            rows.append({"subgroup": col, "value": value, "n": len(g),
                         "accuracy": float((g["pred"] == g["label"]).mean()),
                         "balanced_accuracy": balanced_accuracy(y, [classes.index(p) for p in g["pred"]]),
                         "auc_macro": auc})
    return pd.DataFrame(rows)


def build_report(run_dir: Path, roots: Mapping[str, Path], manifest_path: Path, cfg: Mapping[str, Any],
                 note: str | None = None) -> Path:
    """Write ``run_dir/report/report.md`` and its PNGs; returns the report path. ``note`` goes first, in
    bold (the demo says there that its images are generated)."""
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(manifest_path, resolve_paths=False)
    lines = ["# medssl-monai run report", ""] + ([f"**{note}**", ""] if note else []) + [f"Run folder: `{run_dir}`. Seeds: 1 (a single run: no spread "
             "to report; the label-efficiency study repeats seeds).", ""]
    per_split = manifest.groupby("split").agg(images=("sop_uid", "size"), patients=("patient_id", "nunique"))
    lines += ["## Data", "", f"{len(manifest)} images of {manifest['patient_id'].nunique()} patients "
              f"({int(manifest['label'].notna().sum())} labelled).", "", md_table(per_split.reset_index()), ""]
    lines += ["## Phases", "", "| phase | bundle | wall time (s) |", "|---|---|---|"]
    for name, root in roots.items():
        secs = run_seconds(run_dir, name)
        lines.append(f"| {name} | {root.name} | {secs:.0f} |" if secs is not None else f"| {name} | {root.name} | |")
    lines += ["", "## Training curves", ""]
    for name in ("phase1", "micle", "finetune"):
        tb = roots[name] / "output" / "tensorboard" if name in roots else None
        if tb is not None and tb.is_dir():
            tags = plot_curves(tb, out / f"curves_{name}.png", f"{name} ({roots[name].name})")
            if tags:
                lines += [f"### {name}", "", f"![{name} curves](curves_{name}.png)", "",
                          "Scalars: " + ", ".join(tags) + ".", ""]
    if "evaluate" in roots:
        split = (cfg["phases"].get("evaluate") or {}).get("eval_split", "test")
        ev = roots["evaluate"] / "output" / f"eval_{split}"
        metrics = json.loads((ev / "metrics.json").read_text())
        shutil.copy(ev / "confusion_matrix.png", out / "confusion_matrix.png")
        head = {k: v for k, v in metrics.items() if not k.startswith("auc_") or k == "auc_macro"}
        per_class = {k.removeprefix("auc_"): v for k, v in metrics.items() if k.startswith("auc_") and k != "auc_macro"}
        lines += [f"## Evaluation on the `{split}` split", "",
                  md_table(pd.DataFrame([head])), "", "Per-class one-vs-rest AUC:", "",
                  md_table(pd.DataFrame([per_class])), "", "![confusion matrix](confusion_matrix.png)", ""]
    if "embed" in roots:
        n = plot_embeddings(roots["embed"] / "output" / "embeddings.csv", manifest, out / "embeddings_pca.png")
        lines += ["## Learned embeddings", "", f"PCA of the pretrained backbone's features of {n} images, "
                  "coloured by class.", "", "![embeddings](embeddings_pca.png)", ""]
    if "predict" in roots:
        pred = pd.read_csv(roots["predict"] / "output" / "predictions.csv",
                           dtype={"sop_uid": "string", "patient_id": "string", "pred": "string"},
                           keep_default_na=False, na_values=[""])  # a class may be called "NA" or "None"
        table = subgroup_table(pred, manifest)
        table.to_csv(out / "subgroups.csv", index=False)
        lines += ["## Subgroups", "", "Predictions of the fine-tuned classifier on the images the `predict` phase "
                  "scored, per subgroup (distribution shift shows up here first).", "", md_table(table), ""]
    le = run_dir / "label_efficiency" / "results.csv"
    if le.is_file():
        summary = summarize(pd.read_csv(le))
        plot_label_efficiency(summary, out / "label_efficiency.png", "val")
        lines += ["## Label efficiency", "", "The fine-tuning recipe repeated per label fraction and seed, from the "
                  "pretrained backbone and from a random init; validation metrics after the last epoch, mean ± "
                  "standard deviation over seeds (the `labeled_<p>pct` subsets are nested).", "",
                  label_efficiency_table(summary), "", "![label efficiency](label_efficiency.png)", ""]
    else:
        lines += ["## Label efficiency", "", "Not run: add a `label_efficiency` section to the pipeline config (or "
                  "run the study under `configs/experiments/`) for the curve.", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    logger.info("report written to %s", report)
    return report


def finish_pipeline(run: PipelineRun, note: str | None = None) -> dict[str, Path]:
    """After a pipeline's runs: the ``results_to_pacs`` phase when the config names it, then the report
    (unless the config says ``"report": false``). Returns the folders it wrote, by phase name."""
    cfg, out = run.cfg, {}
    sr_phase = cfg["phases"].get("results_to_pacs")
    if sr_phase is not None and sr_phase is not False:
        out["results_to_pacs"] = run_results_to_pacs(sr_phase or {}, run.roots["predict"], run.manifest, run.run_dir,
                                                     Path(cfg["_base"]), run.force)
    if cfg.get("report", True) and run.manifest is not None and "finetune" in run.roots:
        report = build_report(run.run_dir, run.roots, run.manifest, cfg, note=note)
        print(f"report: {report}")
    return out


def run_pipeline_and_report(config: str | os.PathLike | Mapping[str, Any], run_dir: str | os.PathLike | None = None,
                            force: bool = False, note: str | None = None) -> dict[str, Path]:
    """``medssl pipeline``: :func:`~medssl_monai.experiments.pipeline.run_pipeline`, then
    :func:`finish_pipeline`."""
    return run_pipeline(config, run_dir, force, finish=lambda run: finish_pipeline(run, note))
