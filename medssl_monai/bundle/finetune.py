"""Factories the fine-tune bundle's declarative configs call, and the same definition as a Python API.

``finetune_classification/configs/train.json`` declares the fine-tune the model zoo's way (``network_def``,
``train#dataset`` / ``#dataloader`` / ``#optimizer`` / ``#loss`` / ``#handlers`` / ``#trainer``,
``validate#dataset`` / ``#evaluator`` / ``#handlers``), so MONAI Label's ``BundleTrainTask`` can replace its
data, epochs and handlers. What a JSON value cannot say well lives here: manifest rows -> items, the key metric
split from the others, and the architecture a trained bundle records so that its own ``inference.json``
and ``evaluate.json`` rebuild the network with no override.

:func:`build_finetune` parses that same ``train.json`` around in-memory loaders: notebooks and tests get the
very trainer and evaluator the bundle runs, not a second wiring of them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..data.cache import ImageCacheSpec
from ..data.labels import LabelEncoder
from .locate import bundle_path

__all__ = [
    "ARCHITECTURE_DEFAULTS",
    "ARCHITECTURE_FILE",
    "architecture_record",
    "build_finetune",
    "classification_items",
    "finetune_bundle_dir",
    "flip_prob",
    "item_classes",
    "key_val_metric",
    "load_architecture",
    "other_metrics",
    "training_labels",
    "without_architecture",
]

logger = logging.getLogger(__name__)

ARCHITECTURE_FILE = "models/architecture.json"
# what an untrained bundle's inference.json assumes (the shipped train.json's defaults); classes then come
# from the metadata's output channel_def
ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "backbone": "resnet18", "backbone_kwargs": {}, "in_channels": 3, "image_size": 64,
    "keep_projection_layers": 0, "projection_dim": 128, "projection_layers": 3, "multi_label": False,
}


def without_architecture(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` less the keys a trained bundle records (:data:`ARCHITECTURE_DEFAULTS`, ``classes``).

    Evaluation and prediction read the architecture from ``models/architecture.json``; a driver's shared
    (``common``) values would override it on the command line and rebuild a different network than the one
    trained when a phase changed them.
    """
    return {k: v for k, v in overrides.items() if k not in ARCHITECTURE_DEFAULTS and k != "classes"}


def finetune_bundle_dir() -> Path:
    """The shipped ``finetune_classification`` bundle (package data: a checkout and an installed wheel alike)."""
    return bundle_path("finetune_classification")


def classification_items(rows: pd.DataFrame, image_cache: ImageCacheSpec | None = None,
                         phase: str = "train") -> list[dict[str, Any]]:
    """``{"image": row, "label": <label string>, "sop_uid", "patient_id"}`` per manifest row.

    Labels stay strings (as in MONAI Label's datastore); the transform chain encodes them (``EncodeLabeld``).
    Ids, not paths, are carried: a pseudonymised manifest's ids are safe to write into outputs, its paths not.
    ``image_cache`` with a mode (``host``/``device``): ``image`` is the row's decoded uint8 image from the cache
    (the bundle then disables its loader), rows that could not be decoded are left out and recorded under
    ``phase`` in the run's ``bad_images.csv``.
    """
    items = [{"image": r, "label": r.get("label"), "sop_uid": str(r.get("sop_uid") or r["path"]),
              "patient_id": str(r.get("patient_id"))} for r in rows.to_dict("records")]
    if image_cache is None or not image_cache.enabled:
        return items
    from .data import cached_items

    return cached_items(items, rows, image_cache, phase=phase)


def flip_prob(preset: str | None, flip: str) -> float:
    """Fine-tuning's flip probability (``flip``: ``"hflip"`` or ``"vflip"``): the view preset's
    ``<flip>_prob`` (``chest_xray``: none, laterality is a cue; ``dermatology``: both), without a preset
    horizontal flips with p = 0.5 and no vertical ones."""
    if flip not in ("hflip", "vflip"):
        raise ValueError(f"flip must be 'hflip' or 'vflip', got {flip!r}")
    if not preset:
        return 0.5 if flip == "hflip" else 0.0
    from ..transforms import preset_parameters

    return float(preset_parameters(str(preset)).get(f"{flip}_prob", 0.0))


def item_classes(datasets: Iterable[Iterable[Mapping[str, Any]]], class_names: Sequence[str] | None = None,
                 multi_label: bool = False) -> list[str]:
    """The class list: ``class_names`` when given (their order is the logits' order), else the sorted label
    strings of the items (``train#dataset#data`` and ``validate#dataset#data``: whatever data the bundle was
    given, a manifest's or MONAI Label's datastore's)."""
    if class_names:
        return [str(c) for c in class_names]
    labels = [d.get("label") for data in datasets for d in data]
    if any(v is not None and not isinstance(v, str) for v in labels):
        raise ValueError("the items' labels are not class names (already encoded?): set class_names")
    if not any(v is not None for v in labels):
        raise ValueError("no labels in the training/validation items: set class_names or use labelled data")
    return LabelEncoder(multi_label=multi_label).fit(labels).classes


def training_labels(data: Iterable[Mapping[str, Any]], encoder: LabelEncoder) -> torch.Tensor:
    """The encoded labels of ``train#dataset#data`` (strings encoded, indices / multi-hot vectors kept), for
    class weights, without loading an image."""
    encoded = [encoder.encode(d["label"]) if isinstance(d["label"], str) else d["label"] for d in data]
    if not encoded:
        raise ValueError("no training items to compute class weights from.")
    if isinstance(encoded[0], torch.Tensor) or encoder.multi_label:
        return torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in encoded])
    return torch.as_tensor([int(v) for v in encoded], dtype=torch.long)


def _check_key(metrics: Mapping[str, Any], key: str) -> None:
    if key not in metrics:
        raise ValueError(f"key_metric {key!r} is not one of {sorted(metrics)}.")


def key_val_metric(metrics: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``{key: metric}`` for ``SupervisedEvaluator(key_val_metric=...)`` (the one tracked as best)."""
    _check_key(metrics, key)
    return {key: metrics[key]}


def other_metrics(metrics: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Every metric but ``key``, for ``SupervisedEvaluator(additional_metrics=...)``."""
    _check_key(metrics, key)
    return {k: v for k, v in metrics.items() if k != key}


# ------------------------------------------------------------------------------------------ architecture
def architecture_record(backbone: str, in_channels: int, image_size: int, classes: Sequence[str],
                        multi_label: bool = False, backbone_kwargs: Mapping[str, Any] | None = None,
                        keep_projection_layers: int = 0, projection_dim: int = 128,
                        projection_layers: int = 3) -> dict[str, Any]:
    """What a trained classifier needs to be rebuilt and fed: written to ``models/architecture.json``."""
    return {"backbone": str(backbone), "backbone_kwargs": dict(backbone_kwargs or {}),
            "in_channels": int(in_channels), "image_size": int(image_size),
            "keep_projection_layers": int(keep_projection_layers), "projection_dim": int(projection_dim),
            "projection_layers": int(projection_layers), "classes": [str(c) for c in classes],
            "multi_label": bool(multi_label)}


def load_architecture(bundle_root: str | os.PathLike) -> dict[str, Any]:
    """The architecture a bundle's model was trained with: ``models/architecture.json`` (written by
    training), else :data:`ARCHITECTURE_DEFAULTS` with the classes of ``models/classes.json`` or the metadata."""
    from .run import bundle_classes

    path = Path(bundle_root) / ARCHITECTURE_FILE
    if path.is_file():
        arch = json.loads(path.read_text())
        missing = sorted(set(ARCHITECTURE_DEFAULTS) - set(arch))
        if missing or "classes" not in arch:
            raise ValueError(f"{path}: incomplete architecture record, missing {missing or ['classes']}")
        return arch
    return {**ARCHITECTURE_DEFAULTS, "classes": bundle_classes(bundle_root)}


# ------------------------------------------------------------------------------------------ Python API
def build_finetune(
    network: nn.Module,
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
    backbone_lr_mult: float = 1.0,
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
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress_bar: bool = False,
    compile: bool = False,
    config_file: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """The bundle's ``train#trainer`` and ``validate#evaluator``, parsed from its ``train.json`` around
    ``network`` and in-memory loaders (batches of ``{"image", "label"}``, labels encoded).

    The arguments are the bundle's keys of the same names. Class weights come from ``class_weight`` if given,
    else from ``train_labels`` (encoded), else from ``train_loader.dataset.data`` (items with encoded
    labels). ``linear_probe`` freezes the backbone, otherwise a frozen backbone is unfrozen;
    ``output_dir=None`` writes no confusion matrix, ``summary_writer=None`` no TensorBoard scalars,
    ``checkpoint_dir=None`` no checkpoints.
    """
    from monai.bundle import ConfigParser

    if val_interval < 1:
        raise ValueError(f"val_interval must be >= 1, got {val_interval}.")
    inner = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    out_features = inner.head.fc.out_features
    if out_features != num_classes:
        raise ValueError(f"network has {out_features} outputs but num_classes={num_classes}.")
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes.")
    if linear_probe:
        inner.freeze_backbone()
    elif inner.backbone_frozen:
        logger.info("build_finetune: unfreezing the backbone for full fine-tuning")
        inner.unfreeze_backbone()

    parser = ConfigParser()
    parser.read_config(str(config_file or finetune_bundle_dir() / "configs" / "train.json"))
    device = torch.device(device)
    parser.update({
        "device": device, "classes": names, "multi_label": multi_label, "class_weight_mode": class_weight_mode,
        "class_weight_beta": beta, "linear_probe": linear_probe, "lr": lr, "backbone_lr_mult": backbone_lr_mult,
        "momentum": momentum, "weight_decay": weight_decay, "max_epochs": max_epochs, "lr_schedule": lr_schedule,
        "amp": amp, "val_interval": val_interval, "key_metric": key_metric, "resume": resume,
        "progress_bar": progress_bar, "compile": compile, "summary_writer": summary_writer,
        "output_dir": None if output_dir is None else str(output_dir),
        "ckpt_dir": None if checkpoint_dir is None else str(checkpoint_dir),
        "network": network.to(device), "train#dataloader": train_loader, "validate#dataloader": val_loader,
    })
    if class_weight is not None:
        parser["train#class_weight"] = torch.as_tensor(class_weight, dtype=torch.float32)
    elif class_weight_mode == "none":
        parser["train#class_weight"] = None
    elif train_labels is not None:
        labels = train_labels
        if not isinstance(labels, torch.Tensor) and len(labels) and isinstance(labels[0], torch.Tensor):
            labels = torch.stack([torch.as_tensor(v) for v in labels])
        parser["train#labels"] = torch.as_tensor(labels)
    else:
        data = getattr(getattr(train_loader, "dataset", None), "data", None)
        usable = isinstance(data, Sequence) and len(data) > 0 and all(
            isinstance(d, Mapping) and "label" in d and not isinstance(d["label"], str) for d in data)
        if not usable:
            raise ValueError(
                f"class_weight_mode={class_weight_mode!r} needs the training labels: pass train_labels= "
                "(e.g. LabelEncoder.encode_many(train_df['label'])), class_weight=, "
                "or class_weight_mode='none'.")
        parser["train#dataset"] = {"data": list(data)}
    try:
        trainer = parser.get_parsed_content("train#trainer")
        return trainer, parser.get_parsed_content("validate#evaluator")
    except RuntimeError as err:  # the parser wraps every failure ("Failed to evaluate ..."): raise the reason
        root: BaseException = err
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, (ValueError, TypeError)):
            raise root from err
        raise
