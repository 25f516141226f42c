"""Phase 3: label-efficient fine-tuning (or linear probing) of a pretrained backbone on MONAI engines.

The pieces are independent so that a CLI, a bundle config or a notebook can use any of them:

* :class:`LabelEncoder` / :class:`EncodeLabeld`: manifest label strings -> class index or multi-hot vector,
  with a class order that is saved with the model (a checkpoint without it cannot be interpreted);
* :func:`class_weights`: inverse-frequency or "effective number" (Cui et al. 2019) weights for
  ``CrossEntropyLoss``, or ``pos_weight`` for ``BCEWithLogitsLoss``;
* :func:`select_labelled`: the labelled training rows for a label fraction (1%, 10%, ...), nested across
  fractions so that results for 1% and 10% differ only by the extra labels;
* :func:`build_finetune`: a MONAI ``SupervisedTrainer`` + ``SupervisedEvaluator`` pair with the metrics of
  :mod:`medssl_monai.engines.metrics`.

Optimiser: SGD with Nesterov momentum 0.9 and a cosine learning-rate decay, as in SimCLR's fine-tuning and
linear evaluation (Chen et al. 2020) and MICLe's fine-tuning (Azizi et al. 2021). Weight decay skips
one-dimensional parameters (BatchNorm scales/shifts, biases), whose decay only fights the normalisation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from ignite.engine import Events
from monai.config import KeysCollection
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (
    LrScheduleHandler,
    StatsHandler,
    TensorBoardStatsHandler,
    ValidationHandler,
    from_engine,
)
from monai.transforms import Activationsd, MapTransform

from ..data.splits import fraction_column, nested_label_fractions
from ..networks.heads import Classifier
from .metrics import ConfusionMatrixWriter, classification_metrics

__all__ = [
    "CLASS_WEIGHT_MODES",
    "EncodeLabeld",
    "IndexCrossEntropyLoss",
    "LabelEncoder",
    "MultiHotBCEWithLogitsLoss",
    "build_finetune",
    "class_weights",
    "select_labelled",
]

logger = logging.getLogger(__name__)

CLASS_WEIGHT_MODES = ("inverse", "effective", "none")


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # array-likes
        return False


# --------------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------------
class LabelEncoder:
    """Label strings -> class index (multi-class) or multi-hot float vector (multi-label, ``sep``-joined).

    ``fit`` sorts the classes (as strings), so the order depends only on the set of labels, not on row
    order; pass ``classes`` to impose an order (e.g. a pretrained head's). Keep :meth:`state_dict` with
    the checkpoint.

    An empty multi-label string (after stripping) encodes to all zeros, i.e. "none of the labels".
    """

    def __init__(
        self, classes: Sequence[str] | None = None, multi_label: bool = False, sep: str = "|"
    ) -> None:
        self.multi_label = multi_label
        self.sep = sep
        self._classes: list[str] | None = None
        self._index: dict[str, int] = {}
        if classes is not None:
            self._set_classes([str(c) for c in classes])

    def _set_classes(self, classes: list[str]) -> None:
        dupes = sorted({c for c in classes if classes.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate class names: {dupes}")
        if not classes:
            raise ValueError("a LabelEncoder needs at least one class.")
        self._classes = classes
        self._index = {c: i for i, c in enumerate(classes)}

    def _tokens(self, label: Any) -> list[str]:
        if _is_missing(label):
            raise ValueError("missing label (NaN/None): drop unlabelled rows first (see select_labelled).")
        text = str(label).strip()
        if not self.multi_label:
            return [text]
        return [t.strip() for t in text.split(self.sep) if t.strip()]

    def fit(self, labels: Iterable[Any]) -> LabelEncoder:
        """Learn the (sorted) classes; with fixed ``classes``, check that every label is one of them."""
        seen: set[str] = set()
        for label in labels:
            if not _is_missing(label):
                seen.update(self._tokens(label))
        if self._classes is None:
            self._set_classes(sorted(seen))
        else:
            unknown = sorted(seen - set(self._classes))
            if unknown:
                raise ValueError(f"labels {unknown} are not among the classes {self._classes}.")
        return self

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            raise RuntimeError("LabelEncoder is not fitted: call fit(labels) or pass classes=.")
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_classes

    def encode(self, label: Any) -> int | torch.Tensor:
        """Class index (multi-class) or ``(C,)`` float32 multi-hot vector (multi-label)."""
        classes = self.classes
        tokens = self._tokens(label)
        unknown = [t for t in tokens if t not in self._index]
        if unknown:
            raise ValueError(f"unknown label {unknown[0]!r} (in {label!r}); known classes: {classes}.")
        if not self.multi_label:
            return self._index[tokens[0]]
        out = torch.zeros(len(classes), dtype=torch.float32)
        for t in tokens:
            out[self._index[t]] = 1.0
        return out

    __call__ = encode

    def encode_many(self, labels: Iterable[Any]) -> torch.Tensor:
        """``(N,)`` int64 indices or ``(N, C)`` float32 multi-hot rows, e.g. for :func:`class_weights`."""
        encoded = [self.encode(label) for label in labels]
        if self.multi_label:
            return torch.stack(encoded) if encoded else torch.zeros(0, self.num_classes)
        return torch.as_tensor(encoded, dtype=torch.long)

    def decode(self, value: int | torch.Tensor | Sequence[float]) -> str | list[str]:
        """Index -> class name; multi-hot (values > 0.5) -> list of class names."""
        classes = self.classes
        if not self.multi_label:
            return classes[int(value)]  # type: ignore[arg-type]
        v = torch.as_tensor(value).reshape(-1)
        return [classes[i] for i in torch.nonzero(v > 0.5).reshape(-1).tolist()]

    def state_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "multi_label": self.multi_label, "sep": self.sep}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> LabelEncoder:
        return cls(list(state["classes"]), multi_label=bool(state.get("multi_label", False)),
                   sep=str(state.get("sep", "|")))

    def __repr__(self) -> str:
        classes = self._classes if self._classes is not None else "<unfitted>"
        return f"LabelEncoder(classes={classes}, multi_label={self.multi_label})"


class EncodeLabeld(MapTransform):
    """Dictionary transform applying a fitted :class:`LabelEncoder` to ``d[key]`` (e.g. a manifest row)."""

    def __init__(self, keys: KeysCollection, encoder: LabelEncoder, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.encoder = encoder

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.encoder.encode(d[key])
        return d


# --------------------------------------------------------------------------------------------------
# class weights
# --------------------------------------------------------------------------------------------------
def _effective_number(n: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al. 2019: E_n = (1 - beta^n) / (1 - beta), the expected number of distinct samples."""
    return (1.0 - torch.pow(beta, n)) / (1.0 - beta)


def class_weights(
    labels: torch.Tensor | np.ndarray | Sequence,
    num_classes: int,
    mode: str = "inverse",
    beta: float = 0.999,
    multi_label: bool | None = None,
) -> torch.Tensor:
    """Loss weights from training labels, float32 ``(num_classes,)``.

    Multi-class (labels = class indices): ``CrossEntropyLoss(weight=...)`` weights.
        ``inverse``: ``1 / n_c``; ``effective``: ``1 / E_{n_c}`` (Cui et al. 2019, ``beta`` -> 1 approaches
        ``inverse``, ``beta = 0`` gives no re-weighting); ``none``: ones. Weights are scaled to mean 1 over
        the classes present, so the loss keeps its scale (and the learning rate its meaning). A class absent
        from ``labels`` gets weight 0: it is never a target, and a huge weight would only mislead.
    Multi-label (labels = ``(N, C)`` multi-hot): ``BCEWithLogitsLoss(pos_weight=...)``.
        ``inverse``: ``n_neg / n_pos`` (PyTorch's recommendation); ``effective``: ``E_{n_neg} / E_{n_pos}``;
        ``none``: ones. A label with no positives or no negatives gets 1 (no information to balance).

    ``multi_label=None`` infers the case: 2-D labels with ``num_classes`` columns are multi-hot.
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(f"mode must be one of {CLASS_WEIGHT_MODES}, got {mode!r}.")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}.")
    y = labels.detach().cpu() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if multi_label is None:
        multi_label = y.ndim == 2 and y.shape[1] == num_classes and not (num_classes > 1 and y.shape[1] == 1)
    if mode == "none":
        return torch.ones(num_classes, dtype=torch.float32)
    if multi_label:
        if y.ndim != 2 or y.shape[1] != num_classes:
            raise ValueError(f"multi-label labels must be (N, {num_classes}), got {tuple(y.shape)}.")
        pos = (y > 0.5).sum(dim=0).double()
        neg = y.shape[0] - pos
        if mode == "inverse":
            ratio = neg / pos
        else:
            ratio = _effective_number(neg, beta) / _effective_number(pos, beta)
        return torch.where((pos > 0) & (neg > 0), ratio, torch.ones_like(ratio)).float()
    idx = y.reshape(-1).long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes}).")
    counts = torch.bincount(idx, minlength=num_classes).double()
    present = counts > 0
    if not present.any():
        raise ValueError("no labels to compute class weights from.")
    raw = torch.zeros(num_classes, dtype=torch.float64)
    if mode == "inverse":
        raw[present] = 1.0 / counts[present]
    else:
        raw[present] = 1.0 / _effective_number(counts[present], beta)
    if (~present).any():
        logger.warning("classes %s have no training labels; their loss weight is 0",
                       torch.nonzero(~present).reshape(-1).tolist())
    return (raw * present.sum() / raw.sum()).float()


# --------------------------------------------------------------------------------------------------
# label fractions
# --------------------------------------------------------------------------------------------------
def _as_bool(s: pd.Series) -> pd.Series:
    """Flag column as booleans; a CSV read as text gives ``"True"``/``"False"`` strings."""
    if pd.api.types.is_bool_dtype(s):
        return s.fillna(False).astype(bool)
    if pd.api.types.is_numeric_dtype(s):
        return s.fillna(0).astype(float) != 0
    return s.astype("string").str.strip().str.lower().isin(["true", "1", "yes", "y", "t"]).fillna(False)


def select_labelled(
    df: pd.DataFrame,
    label_fraction: float,
    split_col: str = "split",
    train_value: str = "train",
    seed: int = 0,
    *,
    label_col: str = "label",
    group_col: str = "patient_id",
) -> pd.DataFrame:
    """The labelled training rows for ``label_fraction`` (a copy, original index kept).

    * ``1.0``: every training row;
    * a shipped flag column ``labeled_<p>pct`` (:func:`~medssl_monai.data.fraction_column`, e.g. HAM10000's
      ``labeled_10pct``) is used as it is, so published subsets are reproduced exactly;
    * otherwise groups are drawn with :func:`~medssl_monai.data.nested_label_fractions` (whole patients,
      stratified, nested across fractions for a given ``seed``) among the labelled training rows.

    Rows without a label are dropped (and their number logged): they can serve pretraining, not fine-tuning.
    """
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}.")
    for col in (split_col, label_col):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not found; columns are {list(df.columns)}.")
    train = df[(df[split_col].astype("string") == train_value).fillna(False)]
    if train.empty:
        raise ValueError(f"no training rows ({split_col} == {train_value!r}).")
    column = fraction_column(label_fraction)
    if label_fraction >= 1.0:
        chosen = train
    elif column in df.columns:
        chosen = train[_as_bool(train[column])]
        logger.info("label fraction %g: using the shipped column %r", label_fraction, column)
    else:
        labelled = train[train[label_col].notna()]
        if labelled.empty:
            raise ValueError("no labelled training rows.")
        marked = nested_label_fractions(labelled, (label_fraction,), group_col=group_col, label_col=label_col,
                                        split_col=None, seed=seed)
        chosen = labelled[marked[column].to_numpy(dtype=bool)]
        logger.info("label fraction %g: drew %d groups (seed %d)", label_fraction,
                    chosen[group_col].nunique(), seed)
    missing = chosen[label_col].isna()
    if missing.any():
        logger.info("select_labelled: dropped %d training row(s) without a label", int(missing.sum()))
    return chosen[~missing].copy()


# --------------------------------------------------------------------------------------------------
# engines
# --------------------------------------------------------------------------------------------------
def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else torch.as_tensor(t)


class IndexCrossEntropyLoss(nn.CrossEntropyLoss):
    """``CrossEntropyLoss`` that also takes ``(N, 1)`` or float-valued class-index targets.

    Data pipelines often yield labels as ``(1,)`` channel-first tensors or floats; PyTorch would read a float
    ``(N,)`` target as probabilities and fail. Anything else is passed through unchanged.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = _plain(input), _plain(target)
        if target.ndim == input.ndim and target.shape[1] == 1 and input.shape[1] > 1:
            target = target[:, 0]
        if target.ndim == input.ndim - 1 and target.is_floating_point():
            target = target.long()
        return super().forward(input, target)


class MultiHotBCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """``BCEWithLogitsLoss`` casting multi-hot targets to the logits' dtype (integer ones fail otherwise)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = _plain(input), _plain(target)
        return super().forward(input, target.reshape(input.shape).to(input.dtype))


def _dataset_labels(loader: Iterable) -> list[Any]:
    """Encoded labels from a MONAI ``Dataset``'s ``data`` (without loading images); ``[]`` if unavailable."""
    data = getattr(getattr(loader, "dataset", None), "data", None)
    if not isinstance(data, Sequence) or not data:
        return []
    if not all(isinstance(d, Mapping) and "label" in d for d in data):
        return []
    labels = [d["label"] for d in data]
    if any(isinstance(v, str) for v in labels):
        return []
    return labels


def _param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _amp_dtype(amp: bool | str | None) -> torch.dtype | None:
    """``amp`` setting -> autocast dtype (``None``: off). A string such as ``"none"`` must not read as true."""
    if amp is None or amp is False:
        return None
    if amp is True:
        return torch.float16
    if isinstance(amp, str):
        key = amp.strip().lower()
        if key in ("none", "false", "off", ""):
            return None
        if key in _AMP_DTYPES:
            return _AMP_DTYPES[key]
    raise ValueError(f"amp must be None/False/'none', True/'fp16' or 'bf16', got {amp!r}.")


class EvaluatorBest:
    """The evaluator's best key metric as a checkpointable object.

    Ignite's engine state holds only epoch/iteration; without this a resumed fine-tune would compare its
    next validation against -1 and report a "best" that is not. Optional on load: checkpoints written before
    it existed still resume.
    """

    optional = True

    def __init__(self, evaluator: Any) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, Any]:
        s = self.evaluator.state
        return {"best_metric": float(s.best_metric), "best_metric_epoch": int(s.best_metric_epoch)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])


def build_finetune(
    network: Classifier,
    train_loader: Iterable,
    val_loader: Iterable,
    num_classes: int,
    *,
    multi_label: bool = False,
    class_weight_mode: str = "inverse",
    train_labels: torch.Tensor | Sequence | None = None,
    class_weight: torch.Tensor | None = None,
    beta: float = 0.999,
    linear_probe: bool = False,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    max_epochs: int = 10,
    lr_schedule: str = "cosine",
    device: str | torch.device = "cpu",
    amp: bool | str | None = False,
    output_dir: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    summary_writer: Any = None,
    val_interval: int = 1,
    key_metric: str = "auc_macro",
    train_handlers: Sequence[Any] = (),
    val_handlers: Sequence[Any] = (),
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress_bar: bool = True,
) -> tuple[SupervisedTrainer, SupervisedEvaluator]:
    """A MONAI ``SupervisedTrainer`` and the ``SupervisedEvaluator`` it runs every ``val_interval`` epochs.

    Batches are dicts with ``image`` ``(N, C, H, W)`` and ``label`` (class index, or multi-hot float for
    ``multi_label``), read by MONAI's ``default_prepare_batch``.

    Args:
        network: the :class:`Classifier` (logits out). It is moved to ``device``.
        num_classes: number of logits / classes (checked against the network's head).
        multi_label: sigmoid + ``BCEWithLogitsLoss(pos_weight)`` instead of softmax + ``CrossEntropyLoss``.
        class_weight_mode: see :func:`class_weights`; weights come from ``class_weight`` if given, else from
            ``train_labels`` (encoded), else from ``train_loader.dataset.data`` (a MONAI ``Dataset`` whose
            items already hold encoded labels).
        linear_probe: freeze the backbone (:meth:`Classifier.freeze_backbone`) and optimise only ``head``;
            otherwise a frozen backbone is unfrozen for full fine-tuning.
        lr, momentum, weight_decay: SGD (Nesterov) settings; no decay on 1-D parameters.
        lr_schedule: ``"cosine"`` (per epoch, to 0 at ``max_epochs``) or ``"constant"``.
        amp: ``"fp16"`` (or ``True``) / ``"bf16"`` autocast (+ grad scaling), ``None``/``False``/``"none"``
            off: the same values as the pretraining bundles' ``amp``. MONAI's engines autocast on CUDA only,
            so it is ignored elsewhere.
        output_dir: where :class:`ConfusionMatrixWriter` writes (multi-class only); ``None``: no files.
        class_names: names for metrics (``auc_<name>``) and the confusion matrix; default ``"0"``, ``"1"``...
        summary_writer: a TensorBoard ``SummaryWriter``; training loss and validation metrics go there.
        key_metric: the evaluator's key metric (tracked as ``best_metric``); any name the metrics register.
        train_handlers, val_handlers: extra MONAI/Ignite handlers.
        checkpoint_dir: atomic epoch checkpoints (model, optimiser, LR schedule, trainer and RNG state) go
            there; with ``resume`` a killed run continues from the latest one.
        progress_bar: an Ignite progress bar over each training epoch.
    """
    device = torch.device(device)
    if val_interval < 1:
        raise ValueError(f"val_interval must be >= 1, got {val_interval}.")
    if lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}.")
    # a DistributedDataParallel wrapper trains; the Classifier inside it answers attribute lookups
    inner = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    out_features = inner.head.fc.out_features
    if out_features != num_classes:
        raise ValueError(f"network has {out_features} outputs but num_classes={num_classes}.")
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes.")

    if linear_probe:
        inner.freeze_backbone()
        params: Iterable[nn.Parameter] = inner.head.parameters()
    else:
        if inner.backbone_frozen:
            logger.info("build_finetune: unfreezing the backbone for full fine-tuning")
            inner.unfreeze_backbone()
        params = inner.parameters()
    network.to(device)

    # loss
    weight = class_weight
    if weight is None and class_weight_mode != "none":
        labels = train_labels if train_labels is not None else _dataset_labels(train_loader)
        if labels is None or len(labels) == 0:
            raise ValueError(
                f"class_weight_mode={class_weight_mode!r} needs the training labels: pass train_labels= "
                "(e.g. LabelEncoder.encode_many(train_df['label'])), class_weight=, "
                "or class_weight_mode='none'."
            )
        if not isinstance(labels, torch.Tensor) and len(labels) and isinstance(labels[0], torch.Tensor):
            labels = torch.stack([torch.as_tensor(v) for v in labels])
        weight = class_weights(labels, num_classes, class_weight_mode, beta, multi_label=multi_label)
    if weight is not None:
        weight = torch.as_tensor(weight, dtype=torch.float32, device=device)
        logger.info("class weights (%s): %s", class_weight_mode, [round(float(w), 4) for w in weight])
    loss: nn.Module = (
        MultiHotBCEWithLogitsLoss(pos_weight=weight) if multi_label else IndexCrossEntropyLoss(weight=weight)
    )
    loss.to(device)

    optimizer = torch.optim.SGD(_param_groups(params, weight_decay), lr=lr, momentum=momentum, nesterov=True)

    amp_dtype = _amp_dtype(amp)
    use_amp = amp_dtype is not None and device.type == "cuda"
    if amp_dtype is not None and not use_amp:
        logger.warning("amp=%s is ignored on %s: MONAI's engines autocast on CUDA only", amp, device)
    amp_kwargs = {"dtype": amp_dtype} if use_amp else None

    # evaluator
    metrics = classification_metrics(num_classes, multi_label, names)
    if key_metric not in metrics:
        raise ValueError(f"key_metric {key_metric!r} is not one of {sorted(metrics)}.")
    key_val_metric = {key_metric: metrics.pop(key_metric)}

    trainer: SupervisedTrainer | None = None

    def _trainer_epoch(_: int) -> int:
        return trainer.state.epoch if trainer is not None else 0

    evaluator_handlers: list[Any] = [
        StatsHandler(
            name=None, iteration_log=False, output_transform=lambda x: None, global_epoch_transform=_trainer_epoch
        )
    ]
    if summary_writer is not None:
        evaluator_handlers.append(TensorBoardStatsHandler(
            summary_writer=summary_writer, iteration_log=False, output_transform=lambda x: None,
            global_epoch_transform=_trainer_epoch))
    if output_dir is not None and not multi_label:
        evaluator_handlers.append(ConfusionMatrixWriter(output_dir, names))
    evaluator_handlers.extend(val_handlers)
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=val_loader,
        network=network,
        postprocessing=Activationsd(keys="pred", softmax=not multi_label, sigmoid=multi_label),
        key_val_metric=key_val_metric,
        additional_metrics=metrics,
        val_handlers=evaluator_handlers,
        amp=use_amp,
        amp_kwargs=amp_kwargs,
    )

    # trainer
    handlers: list[Any] = [
        ValidationHandler(interval=val_interval, validator=evaluator, epoch_level=True),
        StatsHandler(name=None, tag_name="train_loss", output_transform=from_engine(["loss"], first=True)),
    ]
    scheduler = None
    if lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs))
        handlers.append(LrScheduleHandler(scheduler, print_lr=False, epoch_level=True))
    if summary_writer is not None:
        handlers.append(TensorBoardStatsHandler(
            summary_writer=summary_writer, tag_name="train_loss", epoch_log=False,
            output_transform=from_engine(["loss"], first=True)))
    if progress_bar:
        from ignite.handlers import ProgressBar

        handlers.append(ProgressBar(persist=False))
    handlers.extend(train_handlers)
    if checkpoint_dir is not None:  # last: it must save the state the epoch-end handlers above leave behind
        from .checkpoint import TrainingCheckpoint

        objects: dict[str, Any] = {"model": inner, "optimizer": optimizer, "evaluator_best": EvaluatorBest(evaluator)}
        if scheduler is not None:
            objects["lr_scheduler"] = scheduler
        handlers.append(TrainingCheckpoint(checkpoint_dir, objects, n_saved=2, resume=resume))
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        loss_function=loss,
        train_handlers=handlers,
        amp=use_amp,
        amp_kwargs=amp_kwargs,
    )
    if summary_writer is not None:  # the learning rate each epoch trains with, beside the loss

        def _log_lr(engine: SupervisedTrainer) -> None:
            summary_writer.add_scalar("lr", optimizer.param_groups[0]["lr"], engine.state.epoch)

        trainer.add_event_handler(Events.EPOCH_STARTED, _log_lr)
    return trainer, evaluator

