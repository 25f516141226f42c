"""Representation similarity written out: a :func:`~medssl_monai.metrics.similarity.stage_similarity` frame
as CSV and as an annotated heatmap PNG (the metric itself stays in ``metrics/``, which draws and writes
nothing)."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd

from ..utils.atomic import atomic_write_bytes

__all__ = ["save_similarity"]


def save_similarity(
    df: pd.DataFrame,
    csv_path: str | os.PathLike | None = None,
    png_path: str | os.PathLike | None = None,
    title: str | None = None,
    annotate: bool = True,
) -> None:
    """Write a :func:`stage_similarity` frame as CSV and/or an annotated heatmap PNG, each atomically.

    The heatmap uses matplotlib's Agg canvas directly (no global backend switch), a fixed [0, 1] colour
    scale so plots are comparable, rows = ``df.index`` (model A stages), columns = ``df.columns``.
    """
    if csv_path is not None:
        text = df.to_csv(float_format="%.6g")
        atomic_write_bytes(csv_path, text.encode("utf-8"))
    if png_path is None:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = df.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(1.2 + 0.9 * max(n_cols, 2), 1.0 + 0.7 * max(n_rows, 2)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(n_cols), [str(c) for c in df.columns], rotation=45, ha="right")
    ax.set_yticks(range(n_rows), [str(r) for r in df.index])
    ax.set_xlabel(str(df.columns.name or ""))
    ax.set_ylabel(str(df.index.name or ""))
    method = df.attrs.get("method")
    ax.set_title(title if title is not None else (f"{method.upper()} similarity" if method else "similarity"))
    if annotate:
        for i in range(n_rows):
            for j in range(n_cols):
                v = values[i, j]
                label = "n/a" if not np.isfinite(v) else f"{v:.2f}"
                colour = "black" if np.isfinite(v) and v > 0.6 else "white"
                ax.text(j, i, label, ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(png_path, buf.getvalue())
