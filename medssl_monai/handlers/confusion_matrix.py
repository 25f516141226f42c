"""Write the validation confusion matrix as ``confusion_matrix.csv`` and ``confusion_matrix.png`` at every evaluation.

A ``(C, C)`` matrix is a file to open, not a scalar to plot: it is kept out of ``engine.state.metrics``
(``StatsHandler`` would print it as text) and written beside the bundle's other outputs instead.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import ConfusionMatrix

from ..metrics.classification import ignite_pred_label, pred_label_transform
from ..utils.atomic import atomic_write_bytes

__all__ = ["ConfusionMatrixWriter", "confusion_matrix_csv", "confusion_matrix_png"]

logger = logging.getLogger(__name__)


def confusion_matrix_csv(cm: np.ndarray, class_names: Sequence[str]) -> str:
    """CSV text: header ``true\\predicted,<classes>``, one row per true class."""
    import pandas as pd

    df = pd.DataFrame(np.asarray(cm, dtype=np.int64), index=list(class_names), columns=list(class_names))
    df.index.name = "true\\predicted"
    return df.to_csv()


def confusion_matrix_png(cm: np.ndarray, class_names: Sequence[str], title: str = "") -> bytes:
    """PNG bytes: counts written in the cells, colours normalised per row (per-class recall).

    Row normalisation keeps a rare class readable next to a frequent one. Uses an Agg canvas on a bare
    ``Figure`` (not ``pyplot``), so neither a display nor the process's global backend is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.int64)
    n = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = max(3.5, 0.6 * n + 2.0)
    fig = Figure(figsize=(size + 1.0, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class ConfusionMatrixWriter:
    """Handler writing ``confusion_matrix.csv`` and ``confusion_matrix.png`` when an evaluation completes.

    It keeps its own Ignite ``ConfusionMatrix`` (not registered in ``engine.state.metrics``), because a
    ``(C, C)`` tensor there would be printed as text by ``StatsHandler``. Files are replaced atomically on
    every evaluation, so they always show the latest one; only rank 0 writes. The last matrix is also kept
    in :attr:`matrix`.

    Args:
        output_dir: folder of the two files.
        class_names: class order of the model's outputs (rows/columns of the matrix).
        output_transform: ``engine.state.output`` -> batch-first ``(probabilities or logits, class indices)``.
        prefix: file name stem.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        output_transform: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] = pred_label_transform,
        prefix: str = "confusion_matrix",
    ) -> None:
        if len(class_names) < 2:
            raise ValueError("a confusion matrix needs at least two classes.")
        self.output_dir = Path(output_dir)
        self.class_names = [str(c) for c in class_names]
        self.prefix = prefix
        self._metric = ConfusionMatrix(
            num_classes=len(self.class_names), output_transform=ignite_pred_label(output_transform, False)
        )
        self.matrix: np.ndarray | None = None

    @property
    def csv_path(self) -> Path:
        return self.output_dir / f"{self.prefix}.csv"

    @property
    def png_path(self) -> Path:
        return self.output_dir / f"{self.prefix}.png"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._metric.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._metric.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.matrix = self._metric.compute().cpu().numpy().astype(np.int64)
        if idist.get_rank() != 0:
            return
        epoch = getattr(engine.state, "epoch", None)
        title = f"epoch {epoch}" if epoch is not None else ""
        atomic_write_bytes(self.csv_path, confusion_matrix_csv(self.matrix, self.class_names).encode())
        atomic_write_bytes(self.png_path, confusion_matrix_png(self.matrix, self.class_names, title))
        logger.debug("wrote %s and %s", self.csv_path, self.png_path)
