"""The run report: ``report.md`` + PNG plots from what the pipeline's phases wrote.

Training curves come from the phases' TensorBoard event files, evaluation from ``evaluate.json``'s
metrics and confusion matrix, the embedding projection from the pretraining bundle's embeddings table, and
per-subgroup results from the classifier's predictions joined to the manifest on ``sop_uid`` (so the
report never needs image paths, and a pseudonymised manifest stays pseudonymised).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data.manifest import atomic_write_text, read_manifest

__all__ = ["build_report", "subgroup_table"]

logger = logging.getLogger(__name__)

SUBGROUP_COLUMNS = ("sex", "age_band", "localization", "modality", "view_position", "body_part", "dx_type")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its file watcher chats at INFO
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_curve(tb_dir: Path) -> pd.DataFrame:
    """Per-epoch validation metrics of a fine-tuning run (from its TensorBoard events) with the training step.

    The bundle logs the loss per iteration, the learning rate at the start of every epoch and the validation
    metrics every ``val_interval`` epochs; the step of epoch ``e`` is ``e`` times the iterations per epoch
    (last loss step / epochs trained). Values are keyed by epoch, the last one kept (a resumed run may log an
    epoch twice). ``df.attrs["epochs_trained"]`` says how far training went.
    """
    s = _scalars(tb_dir)
    if "auc_macro" not in s or not s.get("train_loss"):
        raise ValueError(f"{tb_dir}: no validation 'auc_macro' or no 'train_loss' in the TensorBoard events")
    trained = max(e for e, _ in s["lr"]) if s.get("lr") else max(e for e, _ in s["auc_macro"])
    per_epoch = max(step for step, _ in s["train_loss"]) / trained
    df = pd.DataFrame({tag: pd.Series(dict(s[tag])) for tag in ("auc_macro", "balanced_accuracy", "accuracy")
                       if tag in s}).sort_index()
    df = df[df["auc_macro"].notna()].rename_axis("epoch").reset_index()
    df["step"] = (df["epoch"] * per_epoch).round().astype(int)
    df.attrs["epochs_trained"] = int(trained)
    return df


def final_validation(tb_dir: Path) -> dict[str, float]:
    """The validation metrics of the final model: the last epoch must have been validated (``max_epochs`` a
    multiple of ``val_interval``), else the numbers would describe an earlier model than ``model.pt``."""
    curve = read_curve(tb_dir)
    last = curve.iloc[-1]
    if int(last["epoch"]) != curve.attrs["epochs_trained"]:
        raise ValueError(f"{tb_dir}: last validation at epoch {int(last['epoch'])} but training ran "
                         f"{curve.attrs['epochs_trained']} epochs; make max_epochs a multiple of val_interval")
    return {k: float(v) for k, v in last.items() if k not in ("epoch", "step")}


def plot_curves(tb_dir: Path, out_png: Path, title: str) -> list[str]:
    """One panel per scalar tag of a phase; returns the tags plotted."""
    series = _scalars(tb_dir)
    if not series:
        return []
    plt = _plt()
    tags = sorted(series)
    cols = min(3, len(tags))
    rows = -(-len(tags) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, tag in zip(axes.ravel(), tags):
        steps, values = zip(*series[tag])
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(tag, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(tags):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return tags


def plot_embeddings(emb_csv: Path, manifest: pd.DataFrame, out_png: Path) -> int:
    """PCA of the backbone embeddings to 2-D, coloured by label; returns the number of points."""
    emb = pd.read_csv(emb_csv, dtype={"sop_uid": "string", "patient_id": "string"}).copy()
    labels = manifest.drop_duplicates("sop_uid").set_index("sop_uid")["label"]
    emb["label"] = emb["sop_uid"].map(labels).fillna("(unlabelled)").astype(str)
    x = emb.filter(regex=r"^f\d+$").to_numpy(dtype=np.float64)
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    xy = u[:, :2] * s[:2]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for lab in sorted(emb["label"].unique()):
        m = (emb["label"] == lab).to_numpy()
        ax.scatter(xy[m, 0], xy[m, 1], s=14, label=f"{lab} ({m.sum()})", alpha=0.8)
    var = (s[:2] ** 2 / max((s**2).sum(), 1e-12)) * 100
    ax.set_xlabel(f"PC1 ({var[0]:.0f}% var)")
    ax.set_ylabel(f"PC2 ({var[1]:.0f}% var)")
    ax.legend(fontsize=7, loc="best")
    ax.set_title("pretrained embeddings, PCA")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return len(emb)


def subgroup_table(pred: pd.DataFrame, manifest: pd.DataFrame, columns=SUBGROUP_COLUMNS) -> pd.DataFrame:
    """Accuracy, balanced accuracy and macro AUC of the predictions per subgroup value."""
    from .metrics.classification import balanced_accuracy, roc_auc_ovr

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


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_none_\n"
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in df.itertuples(index=False):
        out.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(out) + "\n"


def build_report(run_dir: Path, roots: Mapping[str, Path], manifest_path: Path, cfg: Mapping[str, Any]) -> Path:
    """Write ``run_dir/report/report.md`` and its PNGs; returns the report path."""
    from .pipeline import phase_seconds

    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(manifest_path, resolve_paths=False)
    lines = ["# medssl-monai run report", "", f"Run folder: `{run_dir}`. Seeds: 1 (a single run: no spread "
             "to report; the label-efficiency study repeats seeds).", ""]
    per_split = manifest.groupby("split").agg(images=("sop_uid", "size"), patients=("patient_id", "nunique"))
    lines += ["## Data", "", f"{len(manifest)} images of {manifest['patient_id'].nunique()} patients "
              f"({int(manifest['label'].notna().sum())} labelled).", "", _md_table(per_split.reset_index()), ""]
    lines += ["## Phases", "", "| phase | bundle | wall time (s) |", "|---|---|---|"]
    for name, root in roots.items():
        secs = phase_seconds(run_dir, name)
        lines.append(f"| {name} | {root.name} | {secs:.0f} |" if secs is not None else f"| {name} | {root.name} | |")
    lines += ["", "## Training curves", ""]
    for name in ("simclr", "micle", "finetune"):
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
                  _md_table(pd.DataFrame([head])), "", "Per-class one-vs-rest AUC:", "",
                  _md_table(pd.DataFrame([per_class])), "", "![confusion matrix](confusion_matrix.png)", ""]
    if "embed" in roots:
        n = plot_embeddings(roots["embed"] / "output" / "embeddings.csv", manifest, out / "embeddings_pca.png")
        lines += ["## Learned embeddings", "", f"PCA of the pretrained backbone's features of {n} images, "
                  "coloured by class.", "", "![embeddings](embeddings_pca.png)", ""]
    if "predict" in roots:
        pred = pd.read_csv(roots["predict"] / "output" / "predictions.csv",
                           dtype={"sop_uid": "string", "patient_id": "string", "pred": "string"})
        table = subgroup_table(pred, manifest)
        table.to_csv(out / "subgroups.csv", index=False)
        lines += ["## Subgroups", "", "Predictions of the fine-tuned classifier on the images the `predict` phase "
                  "scored, per subgroup (distribution shift shows up here first).", "", _md_table(table), ""]
    le = run_dir / "label_efficiency" / "results.csv"
    if le.is_file():
        from .study import plot_label_efficiency, summarize, summary_markdown

        summary = summarize(pd.read_csv(le))
        plot_label_efficiency(summary, out / "label_efficiency.png", "val")
        lines += ["## Label efficiency", "", "The fine-tuning recipe repeated per label fraction and seed, from the "
                  "pretrained backbone and from a random init; validation metrics after the last epoch, mean ± "
                  "standard deviation over seeds (the `labeled_<p>pct` subsets are nested).", "",
                  summary_markdown(summary), "", "![label efficiency](label_efficiency.png)", ""]
    else:
        lines += ["## Label efficiency", "", "Not run: add a `label_efficiency` section to the pipeline config (or "
                  "run the study under `configs/experiments/`) for the curve.", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    logger.info("report written to %s", report)
    return report
