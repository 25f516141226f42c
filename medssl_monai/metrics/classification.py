"""Classification metrics for fine-tuning: plain functions for reports, and Ignite-attachable versions.

Both share one implementation wherever possible so that a number in a TensorBoard curve and the same number
recomputed from saved predictions in a report agree:

* confusion matrix, accuracy: Ignite's ``ConfusionMatrix`` / ``Accuracy`` on the engine, a ``bincount`` here;
* balanced accuracy: mean per-class recall over the classes *present in y_true*. A class without validation
  samples has no recall; counting it as 0 (or 1) would move the score for a reason unrelated to the model,
  so it is left out (the same choice as scikit-learn's ``balanced_accuracy_score``);
* ROC AUC: MONAI's ``compute_roc_auc`` per class (one-vs-rest for softmax outputs, per label for sigmoid
  outputs). A class/label whose ``y_true`` column holds a single value has no AUC: it is reported as NaN and
  left out of the macro mean (MONAI's own macro average would turn the whole mean into NaN).

Predictions are probabilities (softmax or sigmoid) or any monotone scores, shaped ``(N, C)``; multi-class
targets are class indices ``(N,)``, multi-label targets multi-hot ``(N, C)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Accuracy, ConfusionMatrix, Metric, MetricsLambda
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import ROCAUCMetric, compute_roc_auc

__all__ = [
    "ClassAUCMetric",
    "accuracy",
    "attach_classification_metrics",
    "balanced_accuracy",
    "classification_metrics",
    "confusion_matrix",
    "ignite_pred_label",
    "metric_name",
    "multilabel_auc",
    "per_class_auc",
    "pred_label_transform",
    "roc_auc_ovr",
]

ArrayLike = torch.Tensor | np.ndarray | Sequence


# --------------------------------------------------------------------------------------------------
# plain functions
# --------------------------------------------------------------------------------------------------
def _as_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return torch.as_tensor(np.array(x))  # a copy: arrays from pandas may be read-only


def _class_indices(y: ArrayLike) -> torch.Tensor:
    """Class indices ``(N,)`` from indices, ``(N, 1)`` indices or ``(N, C)`` scores (argmax)."""
    t = _as_tensor(y)
    if t.ndim == 2 and t.shape[1] > 1:
        return t.argmax(dim=1)
    return t.reshape(-1).long()


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int | None = None) -> np.ndarray:
    """``(C, C)`` int64 counts, rows = true class, columns = predicted class.

    ``y_pred`` may be class indices or ``(N, C)`` scores (arg-maxed). ``num_classes`` defaults to the number
    of score columns, else to ``max(label) + 1``.
    """
    pred_t = _as_tensor(y_pred)
    t, p = _class_indices(y_true), _class_indices(pred_t)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred hold {t.numel()} and {p.numel()} samples.")
    if num_classes is None:
        num_classes = int(pred_t.shape[1]) if pred_t.ndim == 2 and pred_t.shape[1] > 1 else 0
        num_classes = max(num_classes, int(max(t.max(), p.max())) + 1 if t.numel() else 0)
    if t.numel() and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes}).")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).numpy().astype(np.int64)


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of correct predictions (``y_pred``: indices or ``(N, C)`` scores)."""
    t, p = _class_indices(y_true), _class_indices(y_pred)
    if t.numel() == 0:
        return float("nan")
    return float((t == p).double().mean())


def _balanced_from_cm(cm: torch.Tensor | np.ndarray) -> float:
    cm_t = torch.as_tensor(cm, dtype=torch.float64)
    support = cm_t.sum(dim=1)
    present = support > 0
    if not present.any():
        return float("nan")
    recall = cm_t.diagonal()[present] / support[present]
    return float(recall.mean())


def balanced_accuracy(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int | None = None) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (absent classes are excluded)."""
    return _balanced_from_cm(confusion_matrix(y_true, y_pred, num_classes))


def per_class_auc(y_true_onehot: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """AUC of each column of ``(N, C)`` 0/1 targets vs ``(N, C)`` scores; NaN where a column is constant.

    Each column goes through MONAI's ``compute_roc_auc``; undefined columns are skipped *before* the call,
    which avoids MONAI's per-column warning for what is, in a small validation split, an expected case.
    """
    y = _as_tensor(y_true_onehot).double()
    s = _as_tensor(scores).double()
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if y.shape != s.shape:
        raise ValueError(f"targets {tuple(y.shape)} and scores {tuple(s.shape)} must have the same shape.")
    if not torch.all((y == 0) | (y == 1)):
        raise ValueError("AUC targets must be 0/1 (one-hot or multi-hot).")
    out = np.full(y.shape[1], np.nan)
    for c in range(y.shape[1]):
        col = y[:, c]
        if col.numel() and 0 < col.sum() < col.numel():
            out[c] = float(compute_roc_auc(s[:, c], col))
    return out


def _mean_defined(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def _one_hot(y_true: ArrayLike, num_classes: int) -> torch.Tensor:
    t = _class_indices(y_true)
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes}).")
    return torch.nn.functional.one_hot(t, num_classes).double()


def roc_auc_ovr(y_true: ArrayLike, probs: ArrayLike, average: str = "macro") -> float | np.ndarray:
    """One-vs-rest ROC AUC of ``(N, C)`` class probabilities against class indices ``y_true``.

    ``average="macro"``: mean over the classes that occur in ``y_true`` and not everywhere (others have no
    AUC); ``"none"``: the per-class array, NaN for undefined classes.
    """
    p = _as_tensor(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {tuple(p.shape)}.")
    values = per_class_auc(_one_hot(y_true, p.shape[1]), p)
    return _average(values, average)


def multilabel_auc(y_true: ArrayLike, probs: ArrayLike, average: str = "macro") -> float | np.ndarray:
    """Per-label ROC AUC of ``(N, C)`` sigmoid outputs against multi-hot ``y_true``.

    ``average="macro"``: mean over the labels with both positives and negatives in ``y_true`` (single-class
    labels are skipped); ``"none"``: the per-label array, NaN for skipped labels.
    """
    return _average(per_class_auc(y_true, probs), average)


def _average(values: np.ndarray, average: str) -> float | np.ndarray:
    if average == "macro":
        return _mean_defined(values)
    if average == "none":
        return values
    raise ValueError(f"average must be 'macro' or 'none', got {average!r}.")


# --------------------------------------------------------------------------------------------------
# Ignite / MONAI engine metrics
# --------------------------------------------------------------------------------------------------
def pred_label_transform(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``engine.state.output`` -> batch-first ``(pred, label)`` tensors.

    MONAI engines decollate their output into a list of per-item dicts (``decollate=True``); ``from_engine``
    gathers the two keys and they are stacked back. A non-decollated dict output is used as it is.
    """
    if isinstance(output, dict):
        return torch.as_tensor(output["pred"]), torch.as_tensor(output["label"])
    preds, labels = from_engine(["pred", "label"])(output)
    return torch.stack([torch.as_tensor(p) for p in preds]), torch.stack([torch.as_tensor(y) for y in labels])


def ignite_pred_label(
    transform: Callable[[Any], tuple[torch.Tensor, torch.Tensor]], multi_label: bool
) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]]:
    """Wrap ``transform`` so that it returns plain tensors as Ignite's metrics expect them: float ``(N, C)``
    preds; labels long ``(N,)`` (multi-class) or float ``(N, C)`` (multi-label), on the preds' device."""

    def fn(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        pred, label = transform(output)
        pred = torch.as_tensor(pred).as_subclass(torch.Tensor).float()
        # on the same device as pred: a GPU evaluator's preds sit on the GPU, decollated labels may not
        label = torch.as_tensor(label, device=pred.device).as_subclass(torch.Tensor)
        label = label.reshape(pred.shape).float() if multi_label else label.reshape(-1).long()
        return pred, label

    return fn


class ClassAUCMetric(ROCAUCMetric):
    """MONAI ``ROCAUCMetric`` whose ``aggregate`` returns the per-class AUC vector ``(C,)`` (NaN = undefined).

    Targets may be class indices (one-vs-rest against the ``(N, C)`` predictions) or multi-hot. The result is
    cached until the next update/reset because the macro and every per-class metric read the same vector.
    """

    def __init__(self) -> None:
        super().__init__(average="none")
        self._cached: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self._cached = None

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._cached = None
        return y_pred, y

    def aggregate(self, average: str | None = None) -> torch.Tensor:  # type: ignore[override]
        if self._cached is None:
            y_pred, y = self.get_buffer()
            if not isinstance(y_pred, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise ValueError("ClassAUCMetric has no data; update it first.")
            if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1 and y_pred.shape[1] > 1):
                y = _one_hot(y, y_pred.shape[1])
            self._cached = torch.as_tensor(per_class_auc(y, y_pred))
        return self._cached


def metric_name(prefix: str, class_name: str) -> str:
    """``auc_<class>`` with characters that TensorBoard tags and CSV headers dislike replaced by ``_``."""
    return f"{prefix}_{re.sub(r'[^0-9A-Za-z_.-]+', '_', str(class_name)).strip('_') or 'class'}"


def classification_metrics(
    num_classes: int,
    multi_label: bool = False,
    class_names: Sequence[str] | None = None,
    output_transform: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] = pred_label_transform,
) -> dict[str, Metric]:
    """Ignite metrics by name, for ``SupervisedEvaluator(key_val_metric=..., additional_metrics=...)``.

    Multi-class (softmax): ``accuracy``, ``balanced_accuracy``, ``auc_macro``, ``auc_<class>``.
    Multi-label (sigmoid): ``auc_macro`` (mean over labels with both classes present), ``auc_<label>``.
    All values are scalars, so MONAI's Stats/TensorBoard handlers log every one of them.

    ``output_transform`` maps ``engine.state.output`` to batch-first ``(probabilities, labels)``.
    """
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes.")
    transform = ignite_pred_label(output_transform, multi_label)
    metrics: dict[str, Metric] = {}
    if not multi_label:
        cm = ConfusionMatrix(num_classes=num_classes, output_transform=transform)
        metrics["accuracy"] = Accuracy(output_transform=transform)
        metrics["balanced_accuracy"] = MetricsLambda(_balanced_from_cm, cm)
    auc = IgniteMetricHandler(metric_fn=ClassAUCMetric(), output_transform=transform, save_details=False)
    auc_vector = MetricsLambda(lambda v: torch.as_tensor(v, dtype=torch.float64).reshape(-1), auc)
    metrics["auc_macro"] = MetricsLambda(lambda v: _mean_defined(v.numpy()), auc_vector)
    for i, name in enumerate(names):
        key = metric_name("auc", name)
        if key in metrics:
            raise ValueError(f"class names {names} give the metric name {key!r} twice.")
        metrics[key] = MetricsLambda(lambda v, i=i: float(v[i]), auc_vector)
    return metrics


def attach_classification_metrics(
    evaluator: Engine,
    num_classes: int,
    multi_label: bool = False,
    output_transform: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] = pred_label_transform,
    class_names: Sequence[str] | None = None,
) -> dict[str, Metric]:
    """Attach :func:`classification_metrics` to an existing engine; returns them by name."""
    metrics = classification_metrics(num_classes, multi_label, class_names, output_transform)
    for name, metric in metrics.items():
        metric.attach(evaluator, name)
    return metrics
