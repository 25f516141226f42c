"""Per-epoch metrics of an engine as one CSV row per epoch (``output/metrics.csv``).

Drivers read a run's results from this table instead of scraping TensorBoard event files: a CSV is read
with the standard library, survives without TensorBoard installed, and says exactly which epoch each row
describes. Attach it to the evaluator (fine-tuning: the validation metrics of each validated epoch) or to the
trainer after the handlers that fill ``engine.state.metrics`` (pretraining: the k-NN monitor's accuracy).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from ..utils.atomic import atomic_write_text

__all__ = ["MetricsCSV", "read_metrics_csv"]


class MetricsCSV:
    """Write ``engine.state.metrics`` (numbers only) at every ``EPOCH_COMPLETED`` as a row of ``filename``.

    Each row holds ``epoch``, ``step`` (training iterations so far: ``epoch * epoch_length`` when
    ``epoch_length`` is given, as on an evaluator whose own iteration count is its validation batches, else
    the engine's iteration), ``max_epochs`` when given, and one column per metric. The file is rewritten
    atomically each epoch (a kill leaves the previous complete file); a resumed run that repeats an epoch
    adds a second row for it, and readers keep the last. Only rank 0 writes under DDP.

    Args:
        output_dir: folder of the CSV (created when needed).
        filename: the CSV's name.
        epoch_length: training iterations per epoch (``$len(@train#dataloader)``), for an evaluator.
        max_epochs: the training's planned epochs, so a reader can tell the last row is the final model's.
    """

    def __init__(self, output_dir: str | os.PathLike, filename: str = "metrics.csv", epoch_length: int | None = None,
                 max_epochs: int | None = None) -> None:
        self.path = Path(output_dir) / filename
        self.epoch_length = epoch_length
        self.max_epochs = max_epochs

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        epoch = int(engine.state.epoch)
        row: dict[str, Any] = {"epoch": epoch,
                               "step": epoch * self.epoch_length if self.epoch_length else int(engine.state.iteration)}
        if self.max_epochs is not None:
            row["max_epochs"] = int(self.max_epochs)
        for name, value in engine.state.metrics.items():
            number = _number(value)
            if number is not None:
                row[name] = number
        rows = read_metrics_csv(self.path) if self.path.is_file() else []
        rows.append(row)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, buf.getvalue())


def _number(value: Any) -> float | None:
    """A scalar metric as a float; tensors of one element count, anything else (per-class arrays) does not."""
    try:
        if hasattr(value, "numel"):
            if value.numel() != 1:
                return None
            value = value.item()
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if not isinstance(value, bool) else None


def read_metrics_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a :class:`MetricsCSV` file, whole numbers as ints, the rest as floats (empty cells: NaN)."""
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _parse(text: str | None) -> int | float:
    if text in ("", None):
        return math.nan
    try:
        return int(text)
    except ValueError:
        return float(text)
