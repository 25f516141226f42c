"""What a finished bundle run measured: its per-epoch metrics table, final validation, steps to a target.

The bundles write ``output/metrics.csv`` (:class:`~medssl_monai.handlers.metrics_csv.MetricsCSV`: one row
per validated epoch with the training step). Runs made before that handler existed are read from their
TensorBoard event files instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

__all__ = ["final_validation", "read_curve", "steps_to_target"]

logger = logging.getLogger(__name__)

#: validation metrics a curve keeps
CURVE_METRICS = ("auc_macro", "balanced_accuracy", "accuracy")


def read_curve(output_dir: Path) -> pd.DataFrame:
    """Per-epoch validation metrics of a fine-tuning run with the training step, from its bundle's
    ``output/`` folder (``metrics.csv``; else, for older runs, ``tensorboard/`` or the folder itself holding
    TensorBoard events).

    Values are keyed by epoch, the last one kept (a resumed run may log an epoch twice).
    ``df.attrs["epochs_trained"]`` says how far training went.
    """
    output_dir = Path(output_dir)
    table = output_dir / "metrics.csv"
    if table.is_file():
        return _curve_from_csv(table)
    tb = output_dir / "tensorboard" if (output_dir / "tensorboard").is_dir() else output_dir
    return _curve_from_tensorboard(tb)


def _curve_from_csv(table: Path) -> pd.DataFrame:
    from ..handlers.metrics_csv import read_metrics_csv

    rows = pd.DataFrame(read_metrics_csv(table))
    if rows.empty or "auc_macro" not in rows.columns:
        raise ValueError(f"{table}: no validation 'auc_macro' column")
    df = rows.drop_duplicates("epoch", keep="last").sort_values("epoch")
    df = df[df["auc_macro"].notna()]
    trained = int(df["max_epochs"].iloc[-1]) if "max_epochs" in df.columns else int(df["epoch"].max())
    df = df[["epoch", *[c for c in CURVE_METRICS if c in df.columns], "step"]].reset_index(drop=True)
    df["epoch"] = df["epoch"].astype(int)
    df["step"] = df["step"].astype(int)
    df.attrs["epochs_trained"] = trained
    return df


def _curve_from_tensorboard(tb_dir: Path) -> pd.DataFrame:
    """The same curve from TensorBoard events (runs made before ``metrics.csv``): the step of epoch ``e`` is
    ``e`` times the iterations per epoch (last loss step / epochs trained)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its file watcher chats at INFO
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    s = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    if "auc_macro" not in s or not s.get("train_loss"):
        raise ValueError(f"{tb_dir}: no metrics.csv, and no validation 'auc_macro' or no 'train_loss' in the "
                         "TensorBoard events")
    trained = max(e for e, _ in s["lr"]) if s.get("lr") else max(e for e, _ in s["auc_macro"])
    per_epoch = max(step for step, _ in s["train_loss"]) / trained
    df = pd.DataFrame({tag: pd.Series(dict(s[tag])) for tag in CURVE_METRICS if tag in s}).sort_index()
    df = df[df["auc_macro"].notna()].rename_axis("epoch").reset_index()
    df["step"] = (df["epoch"] * per_epoch).round().astype(int)
    df.attrs["epochs_trained"] = int(trained)
    return df


def final_validation(output_dir: Path) -> dict[str, float]:
    """The validation metrics of the final model: the last epoch must have been validated (``max_epochs`` a
    multiple of ``val_interval``), else the numbers would describe an earlier model than ``model.pt``."""
    curve = read_curve(output_dir)
    last = curve.iloc[-1]
    if int(last["epoch"]) != curve.attrs["epochs_trained"]:
        raise ValueError(f"{output_dir}: last validation at epoch {int(last['epoch'])} but training ran "
                         f"{curve.attrs['epochs_trained']} epochs; make max_epochs a multiple of val_interval")
    return {k: float(v) for k, v in last.items() if k not in ("epoch", "step")}


def steps_to_target(curve: pd.DataFrame, target: float) -> int | None:
    """Training steps until the validation AUC first reaches ``target`` (``None``: never reached)."""
    hit = curve[curve["auc_macro"] >= target]
    return int(hit["step"].iloc[0]) if len(hit) else None
