"""MONAI Label training of the fine-tune bundle: the label convention, the datastore manifest, the run's overrides.

MONAI Label 0.8.5's DICOMweb datastore keeps labels only as DICOM SEG series (its ``final`` tag) or, for other
tags, in a local record of images it converted to NIfTI; a classifier's label is neither. Our app
(:func:`write_monai_label_app`, ``medssl monai-label-app DIR``) therefore stores one class per image (Series
Instance UID) written with MONAI Label's own label request::

    PUT /datastore/label?image=<SeriesInstanceUID>&tag=classification
        multipart: label=<any small file, e.g. {"label": "effusion"}>, params={"label": "effusion"}

in ``<datastore cache>/classification_labels.json`` (0600, in MONAI Label's private cache folder), and its
train task turns them into a manifest (the series folders MONAI Label downloads) for the unchanged bundle's
``train.json``. Nothing here imports MONAI Label: the app file does (:data:`APP_SOURCE`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..utils.atomic import atomic_write_text
from .finetune import ARCHITECTURE_DEFAULTS, load_architecture

__all__ = [
    "APP_SOURCE",
    "CLASS_TAG",
    "EMBEDDINGS_FILE",
    "LABELS_FILE",
    "datastore_manifest",
    "embedding_settings",
    "make_private",
    "read_labels",
    "save_label",
    "train_args",
    "write_monai_label_app",
]

#: the MONAI Label label tag under which a class label is saved (``PUT /datastore/label?tag=classification``)
CLASS_TAG = "classification"
#: where the app keeps the labels: in the datastore's cache folder (private, as the DICOM copies)
LABELS_FILE = "classification_labels.json"
#: the ``typicality`` strategy's per-image embedding cache, beside the labels (0600)
EMBEDDINGS_FILE = "typicality_embeddings.npz"
#: the MONAI Label app, written as ``DIR/main.py`` (it imports monailabel, so only MONAI Label loads it)
APP_SOURCE = Path(__file__).with_name("monai_label_app.py")
#: every ``val_every``-th image (by a hash of its id) validates unless its label says ``split``
VAL_EVERY = 5


def embedding_settings(bundle_root: str | os.PathLike, conf: Mapping[str, str],
                       app_dir: str | os.PathLike = ".") -> tuple[Path, dict[str, Any], int]:
    """``(checkpoint, backbone_features settings, seed)`` of the ``typicality`` strategy from the app's
    ``--conf`` keys: ``embedding_checkpoint`` (default: the served bundle's ``models/model.pt``; a relative
    path is taken from the app folder), ``embedding_backbone`` / ``embedding_in_channels`` /
    ``embedding_image_size`` (default: the served bundle's architecture, :func:`load_architecture`; set them
    for a checkpoint trained otherwise, e.g. a MICLe backbone's resnet18, 3, 64), ``embedding_seed`` (0)."""
    arch = load_architecture(bundle_root)
    ckpt = conf.get("embedding_checkpoint") or str(Path(bundle_root) / "models" / "model.pt")
    checkpoint = Path(ckpt) if os.path.isabs(ckpt) else Path(app_dir) / ckpt
    try:
        spec = {"backbone": conf.get("embedding_backbone") or arch["backbone"],
                "backbone_kwargs": {} if conf.get("embedding_backbone") else dict(arch["backbone_kwargs"]),
                "in_channels": int(conf.get("embedding_in_channels") or arch["in_channels"]),
                "image_size": int(conf.get("embedding_image_size") or arch["image_size"])}
        seed = int(conf.get("embedding_seed") or 0)
    except ValueError as e:
        raise ValueError(f"--conf embedding_in_channels / embedding_image_size / embedding_seed: {e}") from None
    return checkpoint, spec, seed


def make_private(folder: str | os.PathLike) -> Path:
    """``folder`` (created) and everything in it owner-only: 0700 folders, 0600 files (PHI: DICOM copies)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod(0o700 if path.is_dir() else 0o600)
    return root


def read_labels(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{image id: {"label": class, "split"?: ..., "ts": ...}}`` from the labels file (empty when absent)."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of image id -> label record")
    return data


def label_from(info: Mapping[str, Any], label_file: str | os.PathLike | None = None) -> str:
    """The class a label request names: ``params={"label": ...}``, else the uploaded JSON file's ``label``."""
    label = info.get("label")
    if label is None and label_file is not None:
        try:
            label = json.loads(Path(label_file).read_text()).get("label")
        except (OSError, ValueError, AttributeError):
            label = None
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"a '{CLASS_TAG}' label needs params {{\"label\": \"<class>\"}} (or a JSON file with "
                         f"\"label\"); got {label!r}")
    return label.strip()


def save_label(path: str | os.PathLike, image_id: str, label: str, info: Mapping[str, Any] | None = None) -> dict:
    """Record ``label`` for ``image_id`` in the labels file (atomic, 0600); returns the stored record."""
    info = dict(info or {})
    split = info.get("split")
    if split is not None and split not in ("train", "val"):
        raise ValueError(f"label of {image_id}: split must be 'train' or 'val', got {split!r}")
    record = {"label": label, "ts": int(time.time())}
    record.update({k: info[k] for k in ("split", "user") if info.get(k) is not None})
    labels = read_labels(path)
    labels[image_id] = record
    atomic_write_text(path, json.dumps(labels, indent=1, sort_keys=True) + "\n", mode=0o600)
    return record


def _default_split(image_id: str) -> str:
    return "val" if int(hashlib.sha256(image_id.encode()).hexdigest(), 16) % VAL_EVERY == 0 else "train"


def datastore_manifest(labels: Mapping[str, Mapping[str, Any]], images: Mapping[str, str]) -> pd.DataFrame:
    """The bundle's manifest for the labelled images: ``path`` (the series folder MONAI Label downloaded),
    ``label``, ``split``, ``sop_uid``/``series_uid`` (the image id), one row per labelled image in ``images``.

    The split is the label's ``split`` or a stable hash of the id (1 in :data:`VAL_EVERY` validates); with two
    or more images at least one trains and one validates (the bundle validates every epoch).
    """
    rows = [{"path": str(images[i]), "label": str(rec["label"]), "split": rec.get("split") or _default_split(i),
             "sop_uid": i, "series_uid": i, "patient_id": i, "source": "dicom"}
            for i, rec in sorted(labels.items()) if i in images]
    if not rows:
        raise ValueError(f"no '{CLASS_TAG}' labels for images in the datastore (PUT /datastore/label?image=<id>"
                         f"&tag={CLASS_TAG} with params {{\"label\": \"<class>\"}})")
    df = pd.DataFrame(rows)
    if len(df) >= 2:
        for want, other in (("val", "train"), ("train", "val")):
            if not (df["split"] == want).any():
                free = df.index[df["split"] == other]
                df.loc[free[-1], "split"] = want
    return df


def train_args(bundle_root: str | os.PathLike, manifest: str | os.PathLike, output_dir: str | os.PathLike,
               request: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Overrides for ``python -m monai.bundle run`` on the bundle's own ``train.json``: the architecture and
    classes the bundle was trained with (so ``/infer``'s network, built at start-up, takes the new weights), its
    current weights as the starting point, a fresh ``output_dir`` (no resume of another run), and what the
    train request sets (``max_epochs``, ``batch_size``, ``lr``; ``device`` ``cpu``/``cuda``)."""
    bundle_root = Path(bundle_root)
    arch = load_architecture(bundle_root)
    args: dict[str, Any] = {k: arch[k] for k in ARCHITECTURE_DEFAULTS}
    args.update({"class_names": list(arch["classes"]), "manifest": str(manifest), "output_dir": str(output_dir),
                 "progress_bar": False})
    weights = bundle_root / "models" / "model.pt"
    if weights.is_file():
        args["pretrained_ckpt"] = str(weights)
    request = dict(request or {})
    for key, cast in (("max_epochs", int), ("batch_size", int), ("lr", float)):
        if request.get(key) is not None:
            args[key] = cast(request[key])
    device = request.get("device")
    if isinstance(device, str) and device.split(":")[0] in ("cpu", "cuda"):
        args["device"] = f"$torch.device('{device}')"
    return args


def write_monai_label_app(dest: str | os.PathLike, bundle: str | os.PathLike | None = None,
                          overwrite: bool = False) -> Path:
    """Write a MONAI Label app to ``dest``: ``main.py`` and ``model/<bundle name>`` (a copy of ``bundle``, a
    trained fine-tune bundle folder, as it is; default: the shipped ``finetune_classification`` configs).

    Start it with ``monailabel-medssl start_server --app DEST --studies <dicomweb root>`` (docs/monai_label.md).
    """
    from .export import export_bundles

    dest = Path(dest)
    if (dest / "main.py").exists() and not overwrite:
        raise FileExistsError(f"{dest / 'main.py'}: already there; --overwrite replaces the app (and its model)")
    models = dest / "model"
    if bundle is None:
        export_bundles(models, ["finetune_classification"], overwrite=True)
    else:
        src = Path(bundle)
        if not (src / "configs" / "train.json").is_file() or not (src / "configs" / "inference.json").is_file():
            raise ValueError(f"{src}: not a fine-tune bundle folder (needs configs/train.json and inference.json)")
        target = models / src.resolve().name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(src, target, ignore=shutil.ignore_patterns("output", "__pycache__"))
    atomic_write_text(dest / "main.py", APP_SOURCE.read_text())
    return dest
