"""The figures of the reports: training curves, embeddings, label-efficiency curves (PNG, matplotlib Agg)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["plot_curves", "plot_embeddings", "plot_label_efficiency", "pyplot"]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard folder (the figures show what a run logged, whatever it is)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its file watcher chats at INFO
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def plot_curves(tb_dir: Path, out_png: Path, title: str) -> list[str]:
    """One panel per scalar tag of a phase; returns the tags plotted."""
    series = _scalars(tb_dir)
    if not series:
        return []
    plt = pyplot()
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
    plt = pyplot()
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


def plot_label_efficiency(summary: pd.DataFrame, png: Path, eval_split: str) -> list[str]:
    """Balanced accuracy and macro AUC against the % of labels, one line per arm, error bars = seed std;
    returns the x axis' tick labels."""
    from matplotlib.ticker import FixedLocator, NullLocator

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("balanced_accuracy", "auc_macro")):
        for arm, g in summary.groupby("arm", sort=False):
            ax.errorbar(g["fraction"] * 100, g[f"{metric}_mean"], yerr=g[f"{metric}_std"].fillna(0), marker="o",
                        capsize=3, label=arm)
        ax.set_xscale("log")
        percents = sorted(set(summary["fraction"] * 100))
        ax.xaxis.set_major_locator(FixedLocator(percents))  # the fractions run, read as 10%, 20%, 100%
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{p:g}%" for p in percents])
        ax.set_xlabel("training labels used")
        ax.set_ylabel(f"{metric} ({eval_split})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    ticks = [t.get_text() for t in axes[0].get_xticklabels()]
    plt.close(fig)
    return ticks
