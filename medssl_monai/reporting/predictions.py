"""A predictions CSV read for sending: checked whole against the bundle before anything is written.

Results that go into a PACS claim a model (its weights' checksum): the CSV's classes must be that bundle's
classes (``models/classes.json``, written with the weights), and every row must hold a finite probability in
[0, 1] per class, summing to 1, and a predicted class that is one of them. Any class name a clinician writes
(``COVID-19``, ``No Finding``, ``1st-degree (mild)``, ``Ödem``) is a column name here, read by name: no
cell is parsed as anything but text before it is checked (``NA`` and ``None`` are class names too).
"""

from __future__ import annotations

import csv
import json
import math
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PredictionRow", "Predictions", "check_class_names", "read_predictions", "trained_classes"]

#: how far a multi-class row's probabilities may sum from 1 (the CSV keeps 6 decimals per class)
SUM_TOLERANCE = 1e-3
#: how far the predicted class's probability may lie below the row's largest (6-decimal rounding ties)
ARGMAX_TOLERANCE = 2e-6
#: DICOM LO (a code meaning): at most 64 characters, no backslash (the value delimiter), no control character
LO_MAX = 64


@dataclass(frozen=True)
class PredictionRow:
    """One checked row: the image's id as predicted, its class probabilities (bundle order), its class."""

    sop_uid: str
    probs: dict[str, float]
    pred: str


@dataclass(frozen=True)
class Predictions:
    path: Path
    classes: list[str]
    rows: list[PredictionRow]


def trained_classes(bundle_root: str | os.PathLike) -> list[str]:
    """The classes the bundle's weights were trained with, in logit order (``models/classes.json``).

    A bundle multi-label classifier has no single finding per image, which the SR's one finding needs: refused.
    """
    root = Path(bundle_root)
    path = root / "models" / "classes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the bundle has no trained classes (training writes them with the weights)")
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes) \
            or len(set(classes)) != len(classes):
        raise ValueError(f"{path}: not a list of distinct class names")
    arch = root / "models" / "architecture.json"
    if arch.is_file() and json.loads(arch.read_text(encoding="utf-8")).get("multi_label"):
        raise ValueError(f"{arch}: a multi-label classifier: one SR finding per image cannot hold its results")
    return classes


def check_class_names(classes: list[str], where: str | os.PathLike) -> None:
    """Every class name must fit a DICOM code meaning (LO): it is the SR's finding, shown as written."""
    for c in classes:
        if len(c) > LO_MAX or "\\" in c or any(unicodedata.category(ch).startswith("C") for ch in c) \
                or c != c.strip():
            raise ValueError(f"{where}: class name {c!r} cannot be a DICOM code meaning (at most {LO_MAX} characters, "
                             "no backslash, no control character, no leading/trailing space)")


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        try:
            return next(csv.reader(fh))
        except StopIteration:
            return []


def read_predictions(path: str | os.PathLike, classes: list[str]) -> Predictions:
    """Read and check the whole of ``path`` against the bundle's ``classes``; raise one line naming the file,
    row and column of the first problem (rows count from 1 after the header; with the number of others)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions CSV not found")
    try:
        header = _header(path)
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path}: not a readable CSV ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    seen = [c for i, c in enumerate(header) if c in header[:i]]
    if seen:
        raise ValueError(f"{path}: column {seen[0]!r} appears twice")
    for need in ("sop_uid", "pred"):
        if need not in header:
            raise ValueError(f"{path}: no column {need!r}: not a predictions CSV (sop_uid, patient_id, prob_<class>..., "
                             "pred)")
    prob_cols = [c for c in header if c.startswith("prob_")]
    csv_classes = [c.removeprefix("prob_") for c in prob_cols]
    if set(csv_classes) != set(classes):
        extra, lacking = [c for c in csv_classes if c not in classes], [c for c in classes if c not in csv_classes]
        raise ValueError(f"{path}: its classes differ from the bundle's models/classes.json {classes}: "
                         + "; ".join(p for p in (f"not in the bundle: {extra}" if extra else "",
                                                  f"no column for: {lacking}" if lacking else "") if p))
    unknown = [c for c in header if c not in {"sop_uid", "patient_id", "pred", *prob_cols}]
    if unknown:
        raise ValueError(f"{path}: unknown column {unknown[0]!r} (a predictions CSV has sop_uid, patient_id, "
                         "prob_<class>..., pred)")
    if df.empty:
        raise ValueError(f"{path}: no predictions")
    problems: list[str] = []
    rows: list[PredictionRow] = []
    first_row: dict[str, int] = {}
    for n, rec in enumerate(df.to_dict("records"), start=1):
        where = f"{path}: row {n} (line {n + 1})"
        sop_uid, pred = rec["sop_uid"].strip(), rec["pred"]
        if not sop_uid:
            problems.append(f"{where} column 'sop_uid': empty")
        elif sop_uid in first_row:
            problems.append(f"{where} column 'sop_uid': the image of row {first_row[sop_uid]} again (one SR per "
                            "image needs one row per image)")
        else:
            first_row[sop_uid] = n
        probs: dict[str, float] = {}
        for c in classes:
            text = rec[f"prob_{c}"].strip()
            try:
                value = float(text)
            except ValueError:
                problems.append(f"{where} column {'prob_' + c!r}: {'empty' if not text else repr(text)}, not a "
                                "probability")
                continue
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                problems.append(f"{where} column {'prob_' + c!r}: {text} is not a probability in [0, 1]")
                continue
            probs[c] = value
        if not pred:
            problems.append(f"{where} column 'pred': empty prediction")
        elif pred not in classes:
            problems.append(f"{where} column 'pred': {pred!r} is not one of the bundle's classes")
        elif len(probs) == len(classes):
            total = sum(probs.values())
            if abs(total - 1.0) > SUM_TOLERANCE:
                problems.append(f"{where}: the probabilities sum to {total:.6f}, not 1 (a multi-class softmax)")
            elif probs[pred] < max(probs.values()) - ARGMAX_TOLERANCE:
                problems.append(f"{where} column 'pred': {pred!r} is not the most probable class")
        rows.append(PredictionRow(sop_uid, probs, pred))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)
    return Predictions(path, list(classes), rows)
