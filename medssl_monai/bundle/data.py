"""Data factories that the bundles' configs call with ``_target_``/``$`` expressions.

Each bundle takes either ``dataset_dir`` (an ImageNet-style folder) or ``manifest`` (a data-layer CSV);
these functions turn either into the manifest rows, datasets and loaders the engines expect, so the three
bundles share one implementation instead of three copies of the same config blocks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.data import Dataset
from monai.data.utils import worker_init_fn
from monai.transforms import Compose, CopyItemsd, DeleteItemsd, Resized, ToTensord

from ..data import (
    CACHE_MODES,
    CachedPairLoader,
    ContrastivePairDataset,
    ImageCache,
    LoadManifestImaged,
    MultiInstanceIndex,
    build_image_cache,
    read_manifest,
)
from ..data.bad_images import BadImageLog, SkipUnreadable, SkipUnreadableDataset, collate_readable
from ..transforms import ContrastiveViewsd, EnsureFloatImaged

__all__ = [
    "IMAGE_SUFFIXES",
    "classification_dataset",
    "contrastive_dataset",
    "eval_dataset",
    "fit_classes",
    "imagefolder_manifest",
    "inference_items",
    "knn_monitor",
    "load_rows",
    "make_loader",
    "skip_unreadable",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".JPEG")


def imagefolder_manifest(dataset_dir: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """Manifest rows for an ImageNet-style folder: ``[split/]<class>/<image>``, or a flat folder of images.

    Natural images have no patients: every image is its own group. ``label`` is the class folder (``None``
    for a flat folder); ``split`` selects ``dataset_dir/<split>`` when that folder exists.
    """
    root = Path(dataset_dir)
    if split and (root / split).is_dir():
        root = root / split
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_dir {root} does not exist")
    rows = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in {s.lower() for s in IMAGE_SUFFIXES}:
            rel = p.relative_to(root)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            rows.append({"path": str(p.resolve()), "patient_id": str(rel), "label": label, "source": "image"})
    if not rows:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    df = pd.DataFrame(rows)
    df["study_uid"] = df["series_uid"] = df["sop_uid"] = df["patient_id"]
    return df


def load_rows(
    manifest: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    split: str | Sequence[str] | None = None,
    subset: str | None = None,
    split_col: str = "split",
    limit: int | None = None,
) -> pd.DataFrame:
    """The rows a bundle trains or evaluates on.

    Args:
        manifest / dataset_dir: exactly one of them (a manifest wins when both are given).
        split: keep rows whose ``split_col`` is this value (or one of these); for an image folder, the
            sub-folder of that name.
        subset: keep rows where this boolean column is true (e.g. HAM10000's ``mini``, ``labeled_10pct``).
        limit: keep the first ``limit`` rows (smoke runs).
    """
    if manifest:
        df = read_manifest(manifest)
        if split is not None and split_col in df.columns:
            unassigned = int(df[split_col].isna().sum())
            if unassigned:  # rows added by a re-index after the split: silently dropping or using them both hurt
                raise ValueError(f"{manifest}: {unassigned} row(s) have no {split_col!r} (added since the "
                                 "manifest was split): run 'medssl split' on it again")
            wanted = [split] if isinstance(split, str) else list(split)
            df = df[df[split_col].isin(wanted)]
    elif dataset_dir:
        df = imagefolder_manifest(dataset_dir, split if isinstance(split, str) else None)
    else:
        raise ValueError("set either 'manifest' (a data-layer CSV) or 'dataset_dir' (an image folder)")
    if subset:
        if subset not in df.columns:
            raise KeyError(f"subset column {subset!r} not in the manifest (columns: {list(df.columns)})")
        df = df[df[subset].astype(str).str.lower().isin(["true", "1"])]
    if limit:
        df = df.head(int(limit))
    if df.empty:
        raise ValueError(f"no rows left (manifest={manifest}, dataset_dir={dataset_dir}, split={split}, subset={subset})")
    return df.reset_index(drop=True)


def _image_cache(rows: pd.DataFrame, cache: str, source_size: int | Sequence[int] | None, image_size: int,
                 channels: int, cache_dir: str | os.PathLike | None, budget_gib: float | None,
                 device: str | torch.device | None = None, num_workers: int = 0, phase: str = "train") -> ImageCache:
    """The decoded-image cache of ``rows`` (see :mod:`medssl_monai.data.cache`). Rows that could not be
    decoded are left out and recorded like any unreadable image (``bad_images.csv`` under ``phase``), so they
    count towards ``max_bad_images`` as they do without the cache."""
    images = build_image_cache(rows, source_size, channels, mode=cache, cache_dir=cache_dir, device=device,
                               budget_gib=budget_gib, num_workers=num_workers, image_size=image_size)
    if images.failures:
        logger.warning("image cache: %d of %d images could not be decoded and are left out", len(images.failures),
                       len(rows))
        log = BadImageLog(phase, len(rows))
        for failure in images.failures:
            log.record(str(failure["key"]), str(failure["reason"]))
    logger.info("image cache (%s): %d images at %s, %.1f MiB, %d decoded now", cache, len(images.images),
                images.source_size, images.nbytes() / 2**20, images.decoded)
    return images


def cached_items(items: list[dict[str, Any]], rows: pd.DataFrame, cache: str,
                  source_size: int | Sequence[int] | None, image_size: int, channels: int,
                  cache_dir: str | os.PathLike | None, budget_gib: float | None,
                  phase: str = "train") -> list[dict[str, Any]]:
    """``items`` with ``image`` replaced by the row's cached uint8 ``(C, H, W)`` (host RAM: per-item
    transforms run on the CPU), rows that could not be decoded dropped (and recorded under ``phase``)."""
    images = _image_cache(rows, "host", source_size, image_size, channels, cache_dir, budget_gib, phase=phase)
    out = []
    for item, slot in zip(items, images.slots):
        if slot >= 0:
            out.append({**item, "image": images.images[int(slot)]})
    return out


def contrastive_dataset(
    rows: pd.DataFrame,
    pairing: str = "micle",
    groups: str = "all",
    level: str = "patient",
    preset: str = "natural",
    image_size: int = 64,
    channels: int = 3,
    preset_overrides: dict[str, Any] | None = None,
    seed: int = 0,
    views_on: str = "cpu",
    source_size: int | Sequence[int] | None = None,
    cache: str = "none",
    cache_dir: str | os.PathLike | None = None,
    cache_budget_gib: float | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> SkipUnreadableDataset | CachedPairLoader:
    """Pairs (MICLe) or single images (SimCLR) -> two augmented views of ``image_size``.

    A pair with an unreadable image is replaced by the next readable item and recorded in the run's
    errors file (``bad_images``); ``set_random_state`` and the pair dataset's attributes pass through.

    ``views_on="device"``: the items are the two source images resized to ``source_size`` (``(H, W)`` or
    a side; default twice ``image_size``), not augmented; ``BatchViews`` makes the views on the
    accelerator (``batch_views_for``), where per-item CPU work would starve it.

    ``cache="host"`` / ``"device"`` (needs ``views_on="device"``): every image decoded once into the
    decoded-image cache (``cache_dir`` on disk, shared by runs), and the result is a
    :class:`~medssl_monai.data.CachedPairLoader` of ``batch_size`` pairs, which ``make_loader`` passes
    through: pairs are drawn per batch from index arrays and gathered from RAM or the device.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if cache != "none":
        if views_on != "device":
            raise ValueError(f"cache: {cache!r} holds the uint8 sources for views made per batch: set views_on: "
                             "device (or cache: none for per-item CPU views)")
        if not batch_size:
            raise ValueError("cache: host|device needs batch_size (the pairs are drawn per batch)")
        # built in host RAM; CachedPairLoader moves only this rank's shard to the device
        images = _image_cache(rows, cache, source_size, image_size, channels, cache_dir, cache_budget_gib, None,
                              num_workers)
        kept = rows[images.kept].reset_index(drop=True)
        images = images.take(np.flatnonzero(images.kept))
        return CachedPairLoader(images, MultiInstanceIndex(kept, level=level), int(batch_size), pairing=pairing,
                                groups=groups, seed=seed, mode=cache, device=device)
    keys = ("image_1", "image_2")
    if views_on == "device":
        size = (2 * image_size,) * 2 if source_size is None else source_size
        size = (int(size),) * 2 if isinstance(size, (int, float)) else tuple(int(s) for s in size)
        transform = Compose([
            LoadManifestImaged(keys=keys, channels=channels),
            EnsureFloatImaged(keys=keys, num_channels=channels),
            Resized(keys=keys, spatial_size=size, mode="area"),  # area: alias-free downscale
            CopyItemsd(keys=keys, names=["view_1", "view_2"]),
            DeleteItemsd(keys=keys),
            ToTensord(keys=("view_1", "view_2"), track_meta=False),
        ])
    elif views_on == "cpu":
        transform = Compose([
            LoadManifestImaged(keys=keys, channels=channels),
            ContrastiveViewsd(keys=keys, transform=preset, spatial_size=(image_size, image_size),
                              preset_overrides=preset_overrides),
            ToTensord(keys=("view_1", "view_2"), track_meta=False),  # plain tensors: cheaper to collate
        ])
    else:
        raise ValueError(f"views_on must be 'cpu' or 'device', got {views_on!r}")
    pairs = ContrastivePairDataset(MultiInstanceIndex(rows, level=level), transform, pairing=pairing, groups=groups,
                                   seed=seed)
    return SkipUnreadableDataset(pairs, BadImageLog("train", len(rows)))


def skip_unreadable(transform: Any, phase: str, total: int) -> SkipUnreadable:
    """``transform`` whose unreadable images become ``None`` items (dropped by ``make_loader``'s collate)
    and rows of the run's errors file; for the bundles' evaluation and inference pipelines."""
    return SkipUnreadable(transform, BadImageLog(phase, total))


def eval_dataset(rows: pd.DataFrame, image_size: int = 64, channels: int = 3,
                 classes: Sequence[str] | None = None, cache: bool = False, image_cache: str = "none",
                 source_size: int | Sequence[int] | None = None, cache_dir: str | os.PathLike | None = None,
                 cache_budget_gib: float | None = None, phase: str = "eval") -> Dataset:
    """Deterministic resized images (+ integer labels when ``classes`` is given) for features/evaluation.

    ``cache`` decodes and resizes every image once and keeps the tensors (MONAI ``CacheDataset``): for
    monitors that read the same images every epoch. ``image_cache`` (``host``/``device``) reads the
    decoded-image cache instead of the files (``source_size`` sources, resized to ``image_size``).
    Unreadable images are ``None`` items, recorded under ``phase``; load them with :func:`make_loader`
    (or ``collate_fn=collate_readable``), which drops them.
    """
    items = []
    for r in rows.to_dict("records"):
        # ids, not paths: a pseudonymised manifest's ids are safe to write into outputs, its paths are not
        item = {"image": r, "sop_uid": str(r.get("sop_uid") or r["path"]), "patient_id": str(r.get("patient_id"))}
        if classes is not None:
            label = r.get("label")
            item["label"] = list(classes).index(label) if isinstance(label, str) and label in classes else -1
        items.append(item)
    if image_cache != "none":
        items = cached_items(items, rows, image_cache, source_size, image_size, channels, cache_dir,
                             cache_budget_gib, phase=phase)
    transform = skip_unreadable(Compose([
        *([] if image_cache != "none" else [LoadManifestImaged(keys="image", channels=channels)]),
        EnsureFloatImaged(keys="image", num_channels=channels),
        Resized(keys="image", spatial_size=(image_size, image_size), mode="area"),  # area: alias-free downscale
    ]), phase, len(items))
    if cache:
        from monai.data import CacheDataset

        return CacheDataset(items, transform, progress=False, num_workers=0)
    return Dataset(items, transform)


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True,
                drop_last: bool = False, distributed: bool = False,
                even_divisible: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader; under ``torch.distributed`` (``ignite.distributed``) each rank gets its own shard.

    ``batch_size`` is per process. MONAI's ``worker_init_fn`` seeds every worker's transforms differently.
    ``collate_readable`` drops the ``None`` items of unreadable images (a batch of only those is ``None``).
    ``even_divisible=False`` (evaluation): shards of unequal size that together hold every item exactly once
    (MONAI's ``DistributedSampler``), so gathered metrics and confusion-matrix counts are not padded with
    repeated items; training keeps equal shards (DDP needs the same number of steps on every rank).
    """
    import ignite.distributed as idist

    if getattr(dataset, "yields_batches", False):  # e.g. CachedPairLoader: already batches, sharded per rank
        return dataset
    if distributed and idist.get_world_size() > 1 and not even_divisible:
        from monai.data import DistributedSampler

        sampler = DistributedSampler(dataset, even_divisible=False, shuffle=shuffle)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                           drop_last=drop_last, worker_init_fn=worker_init_fn,
                                           persistent_workers=num_workers > 0, collate_fn=collate_readable)
    if distributed and idist.get_world_size() > 1:
        return idist.auto_dataloader(dataset, batch_size=batch_size * idist.get_world_size(), shuffle=shuffle,
                                     num_workers=num_workers, drop_last=drop_last, worker_init_fn=worker_init_fn,
                                     collate_fn=collate_readable)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                       drop_last=drop_last, worker_init_fn=worker_init_fn,
                                       persistent_workers=num_workers > 0, collate_fn=collate_readable)


def classification_dataset(rows: pd.DataFrame, classes: Sequence[str], image_size: int = 64, channels: int = 3,
                           augment: bool = False, multi_label: bool = False, preset: str | None = None,
                           cache: str = "none", source_size: int | Sequence[int] | None = None,
                           cache_dir: str | os.PathLike | None = None, cache_budget_gib: float | None = None
                           ) -> Dataset:
    """Labelled images for fine-tuning/evaluation: ``{"image", "label", "sop_uid", "patient_id"}``.

    An unreadable image is recorded in the run's errors file (phase ``train`` with ``augment``, else
    ``eval``) and skipped: replaced by the next readable item in training, dropped (``None``) otherwise.

    ``augment`` adds the light augmentation fine-tuning uses (random resized crop of 50-100% area and
    flips); without it images are resized whole, as at inference. ``preset`` (a view preset name, e.g. the
    one the backbone was pretrained with) sets the flips: its ``hflip_prob``/``vflip_prob`` (``chest_xray``:
    no flips, laterality is a cue; ``dermatology``: both); without one, horizontal flips with p = 0.5.
    ``cache`` (``host``/``device``): the images come from the decoded-image cache (``source_size``) instead
    of the files; the augmentation stays per item on the CPU, only the decoding is gone.
    """
    from ..data.labels import LabelEncoder
    from ..transforms import RandomResizedCropd

    encoder = LabelEncoder(list(classes), multi_label=multi_label)
    items = [{"image": r, "label": encoder.encode(r["label"]), "sop_uid": str(r.get("sop_uid") or r["path"]),
              "patient_id": str(r.get("patient_id"))} for r in rows.to_dict("records")]
    load = [LoadManifestImaged(keys="image", channels=channels), EnsureFloatImaged(keys="image", num_channels=channels)]
    if cache != "none":
        items = cached_items(items, rows, cache, source_size, image_size, channels, cache_dir, cache_budget_gib)
        load = load[1:]
    if augment:
        from monai.transforms import RandFlipd

        hflip, vflip = 0.5, 0.0
        if preset:
            from ..transforms import preset_parameters

            params = preset_parameters(str(preset))
            hflip, vflip = float(params.get("hflip_prob", 0.0)), float(params.get("vflip_prob", 0.0))
        spatial = [RandomResizedCropd(keys="image", spatial_size=(image_size, image_size), scale=(0.5, 1.0))]
        spatial += [RandFlipd(keys="image", prob=p, spatial_axis=axis) for p, axis in ((hflip, 1), (vflip, 0)) if p > 0]
    else:
        spatial = [Resized(keys="image", spatial_size=(image_size, image_size), mode="area")]
    transform = Compose([*load, *spatial, ToTensord(keys="image", track_meta=False)])
    if augment:
        return SkipUnreadableDataset(Dataset(items, transform), BadImageLog("train", len(items)))
    return Dataset(items, skip_unreadable(transform, "eval", len(items)))


def fit_classes(rows: pd.DataFrame, class_names: Sequence[str] | None = None, multi_label: bool = False) -> list[str]:
    """The class list: ``class_names`` when given (their order is the logits' order), else sorted labels."""
    if class_names:
        return [str(c) for c in class_names]
    from ..data.labels import LabelEncoder

    labels = rows["label"].dropna() if "label" in rows.columns else []
    if len(labels) == 0:
        raise ValueError("no labels in the manifest: set class_names or use a labelled manifest")
    return LabelEncoder(multi_label=multi_label).fit(labels).classes


class _NoHandler:
    """Stands in for a disabled handler in a config's handler list."""

    def attach(self, engine: Any) -> None:
        return None


def knn_monitor(network: torch.nn.Module, manifest: str | os.PathLike | None = None,
                dataset_dir: str | os.PathLike | None = None, train_split: str = "train", val_split: str = "val",
                interval: int = 1, k: int = 20, image_size: int = 64, channels: int = 3, batch_size: int = 64,
                num_workers: int = 0, max_images: int = 1000, device: str | torch.device = "cpu",
                cache: str = "none", source_size: int | Sequence[int] | None = None,
                cache_dir: str | os.PathLike | None = None, cache_budget_gib: float | None = None) -> Any:
    """A k-NN monitor on the labelled train/val images of the bundle's data, or a no-op when it cannot run
    (``interval <= 0``, no labels, or no validation split) or need not (ranks other than 0 under DDP: the
    monitor reads the plain backbone, no collective, and only rank 0 logs it). Its value lands in the trainer's
    ``engine.state.metrics["knn_top1"]``: list it before the Stats/TensorBoard handlers that log it."""
    from ..handlers.knn_monitor import KNNMonitor
    from .distributed import is_main

    if interval <= 0:
        return _NoHandler()
    if not is_main():
        return _NoHandler()
    try:
        train = load_rows(manifest, dataset_dir, split=train_split)
        val = load_rows(manifest, dataset_dir, split=val_split)
    except (ValueError, FileNotFoundError, KeyError) as err:
        logger.info("k-NN monitor off: %s", err)
        return _NoHandler()
    train, val = (df[df["label"].notna()] if "label" in df.columns else df.iloc[:0] for df in (train, val))
    if train.empty or val.empty:
        logger.info("k-NN monitor off: no labelled train/val images")
        return _NoHandler()
    train = train.sample(n=min(max_images, len(train)), random_state=0)
    val = val.sample(n=min(max_images, len(val)), random_state=0)
    classes = sorted(set(train["label"]) | set(val["label"]))
    # cached: the monitor reads the same images every epoch (at most 2 x max_images x C x size^2 floats)
    loaders = [make_loader(eval_dataset(df, image_size, channels, classes, cache=True, image_cache=cache,
                                        source_size=source_size, cache_dir=cache_dir,
                                        cache_budget_gib=cache_budget_gib, phase="knn"), batch_size, num_workers,
                           shuffle=False) for df in (train, val)]
    return KNNMonitor(network, loaders[0], loaders[1], interval=interval, k=k, device=device,
                      num_classes=len(classes))


def inference_items(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """``{"image": row, "sop_uid", "patient_id"}`` items for the bundles' ``preprocessing`` pipelines."""
    return [{"image": r, "sop_uid": str(r.get("sop_uid") or r["path"]), "patient_id": str(r.get("patient_id"))}
            for r in rows.to_dict("records")]
