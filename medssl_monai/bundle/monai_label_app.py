"""medssl-monai's MONAI Label app (0.8.5): serve and train the fine-tune classifier bundle from a DICOMweb PACS.

Written as ``DIR/main.py`` by ``medssl monai-label-app DIR`` (only MONAI Label imports it: it needs monailabel).
Each folder under ``DIR/model/`` with ``configs/inference.json`` is a model: ``/infer/<name>`` runs it through
MONAI Label's ``BundleInferTask``; ``/train/<name>`` runs the bundle's own ``configs/train.json`` unchanged
(``monai.bundle.run``, as ``python -m monai.bundle run`` does) on the images labelled with
``PUT /datastore/label?tag=classification`` (``params={"label": "<class>"}``), then writes the new weights into
the bundle, which the next ``/infer`` loads.
``POST /activelearning/typicality`` answers the next image to label: TypiClust's choice on the backbone
embedding of the datastore's images, the images with a ``classification`` label covering their clusters
(:func:`medssl_monai.selection.next_to_label`; embeddings cached per image in the datastore's cache folder).
Everything the server writes (its DICOM cache, the labels, the new weights) is owner-only: umask 077, and the
cache folder is made 0700/0600 at start-up. See docs/monai_label.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import monai.bundle
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask

from medssl_monai.bundle.embed import cached_features
from medssl_monai.bundle.monai_label import (
    CLASS_TAG,
    EMBEDDINGS_FILE,
    LABELS_FILE,
    datastore_manifest,
    embedding_settings,
    label_from,
    make_private,
    read_labels,
    save_label,
    train_args,
)
from medssl_monai.data import write_manifest
from medssl_monai.networks import WeightTransferError
from medssl_monai.selection import next_to_label
from medssl_monai.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

os.umask(0o077)  # the server and its train processes write PHI (DICOM copies) and labels: owner-only


class ClassLabelDICOMWebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore, plus one class label per image (Series Instance UID) under the tag
    ``classification``, kept in the datastore's cache folder (MONAI Label's own labels are DICOM SEG only)."""

    @property
    def labels_path(self) -> Path:
        return Path(self._datastore_path) / LABELS_FILE

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        if label_tag != CLASS_TAG:
            return super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        # HTTP 400 with the reason (a MONAILabelException would be a bare HTTP 500 for the client)
        if image_id not in self.list_images():
            raise HTTPException(400, f"image {image_id} is not in the datastore ({self.name()}, its search filter)")
        try:
            label = label_from(label_info, label_filename)
            save_label(self.labels_path, image_id, label, label_info)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        logger.info(f"saved '{CLASS_TAG}' label of {image_id}: {label}")
        return image_id

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        if label_tag == CLASS_TAG:
            return read_labels(self.labels_path).get(label_id, {})
        return super().get_label_info(label_id, label_tag)

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        labels = super().get_labels_by_image_id(image_id)
        if image_id in read_labels(self.labels_path):
            labels[CLASS_TAG] = image_id
        return labels


class Typicality(Strategy):
    """``/activelearning/typicality``: the most typical image of the largest cluster with no ``classification``
    label, on the embedding of ``checkpoint`` (TypiClust's step with budget = labelled + 1). The request may
    set ``seed``; an empty answer (``{}``) when every image is labelled, as MONAI Label's own strategies."""

    def __init__(self, checkpoint: Path, spec: dict[str, Any], seed: int = 0):
        super().__init__(f"TypiClust on the embedding of {checkpoint.name}: the most typical image of the largest "
                         f"cluster without a '{CLASS_TAG}' label")
        self.checkpoint, self.spec, self.seed = checkpoint, spec, seed

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        labels_path = getattr(datastore, "labels_path", None)
        if labels_path is None:
            raise HTTPException(400, "typicality needs a DICOMweb datastore (--studies http(s)://.../dicom-web): "
                                     f"it reads the '{CLASS_TAG}' labels")
        t0 = time.monotonic()
        images = sorted(datastore.list_images())
        labelled = set(read_labels(labels_path)) & set(images)
        if len(labelled) == len(images):
            logger.info(f"typicality: all {len(images)} images have a '{CLASS_TAG}' label")
            return None
        if not self.checkpoint.is_file():
            raise HTTPException(409, f"typicality: no embedding checkpoint {self.checkpoint} (train the model "
                                     "first, or --conf embedding_checkpoint PATH)")
        try:
            seed = int(request.get("seed", self.seed))
        except (TypeError, ValueError):
            raise HTTPException(400, f"typicality: seed must be a whole number, got {request.get('seed')!r}") from None
        try:
            ids, features, new = cached_features(images, datastore.get_image_uri, self.checkpoint,
                                                 Path(labels_path).with_name(EMBEDDINGS_FILE), **self.spec)
        except WeightTransferError as e:  # the checkpoint does not fit the backbone settings
            raise HTTPException(409, f"typicality: {self.checkpoint}: {e} (--conf embedding_backbone / "
                                     "embedding_in_channels / embedding_image_size)") from None
        choice = next_to_label(features, ids, labelled, seed) if ids else None
        logger.info(f"typicality: {choice} of {len(images)} images ({len(labelled)} labelled, {new} embedded now, "
                    f"seed {seed}) in {time.monotonic() - t0:.2f} s")
        return {"id": choice} if choice is not None else None


class BundleFineTuneTask(TrainTask):
    """``/train/<model>``: the bundle's ``train.json`` on the datastore's ``classification`` labels."""

    def __init__(self, name: str, path: str | os.PathLike):
        super().__init__(f"fine-tune {name} (its configs/train.json) on the datastore's '{CLASS_TAG}' labels")
        self.name, self.path = name, Path(path)

    def config(self) -> dict[str, Any]:
        return {"max_epochs": 5, "batch_size": 16}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        labels_path = getattr(datastore, "labels_path", None)
        if labels_path is None:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT,
                                      "training needs a DICOMweb datastore (--studies http(s)://.../dicom-web)")
        labels = read_labels(labels_path)
        listed = set(datastore.list_images())
        t0 = time.monotonic()
        images = {i: datastore.get_image_uri(i) for i in sorted(labels) if i in listed}  # downloads the series
        df = datastore_manifest(labels, images)
        fetched_s = time.monotonic() - t0
        run_dir = make_private(self.path / "output" / "monailabel" / time.strftime("%Y%m%d-%H%M%S"))
        manifest = run_dir / "manifest.csv"
        write_manifest(df, manifest)
        args_file = run_dir / "train_args.json"
        atomic_write_text(args_file, json.dumps(train_args(self.path, manifest, run_dir, request), indent=1) + "\n")
        logger.info(f"training {self.name}: {len(df)} labelled images "
                    f"({int((df['split'] == 'train').sum())} train, {int((df['split'] == 'val').sum())} val)")
        t1 = time.monotonic()
        # `python -m monai.bundle run --bundle_root B --config_file B/configs/train.json --args_file A`, in
        # this process (MONAI Label's own train subprocess, torch and MONAI already imported)
        try:
            monai.bundle.run(config_file=str(self.path / "configs" / "train.json"), bundle_root=str(self.path),
                             args_file=str(args_file))
        except Exception as e:
            raise MONAILabelException(MONAILabelError.APP_TRAIN_FAILED,
                                      f"{self.name}: the bundle's train.json failed ({type(e).__name__}: {e}); "
                                      f"run folder {run_dir}") from e
        return {"model": self.name, "images": len(df), "train": int((df["split"] == "train").sum()),
                "val": int((df["split"] == "val").sum()), "fetch_s": round(fetched_s, 2),
                "train_s": round(time.monotonic() - t1, 2), "output_dir": str(run_dir)}


def _version() -> str:
    try:
        return version("medssl-monai")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0"


class MedsslApp(MONAILabelApp):
    """The fine-tune bundles under ``model/``: infer and train each; DICOMweb labels as described above."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        wanted = [m.strip() for m in conf.get("models", "").split(",") if m.strip()]
        model_dir = Path(app_dir) / "model"
        self.models = {p.name: p for p in sorted(model_dir.iterdir())
                       if (p / "configs" / "inference.json").is_file() and (not wanted or p.name in wanted)}
        if not self.models:
            raise ValueError(f"{model_dir}: no bundle folder with configs/inference.json"
                             + (f" named {', '.join(wanted)}" if wanted else ""))
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="medssl-monai classifier",
                         description="medssl-monai fine-tune bundles: infer and train from a DICOMweb datastore",
                         version=_version())

    def init_remote_datastore(self) -> Datastore:
        ds = super().init_remote_datastore()
        if isinstance(ds, DICOMWebDatastore):
            ds.__class__ = ClassLabelDICOMWebDatastore  # MONAI Label built it; only methods are added
            make_private(Path(ds._datastore_path).parent)  # the DICOM cache (an earlier run's files too)
        return ds

    def init_infers(self) -> dict[str, Any]:
        return {n: BundleInferTask(str(p), self.conf) for n, p in self.models.items()}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {n: BundleFineTuneTask(n, p) for n, p in self.models.items()}

    def init_strategies(self) -> dict[str, Any]:
        """``first``, ``random`` (MONAI Label's) and ``typicality`` on the embedding of the first served model's
        weights, or ``--conf embedding_checkpoint`` (:func:`~medssl_monai.bundle.monai_label.embedding_settings`)."""
        name = self.conf.get("embedding_model") or next(iter(self.models))
        if name not in self.models:
            raise ValueError(f"--conf embedding_model {name}: not a served model ({', '.join(self.models)})")
        bundle = self.models[name]
        checkpoint, spec, seed = embedding_settings(bundle, self.conf, self.app_dir)
        return {"first": First(), "random": Random(), "typicality": Typicality(checkpoint, spec, seed)}
