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
    CachedPairDataset,
    ContrastivePairDataset,
    ImageCache,
    ImageCacheSpec,
    LoadManifestImaged,
    MultiInstanceIndex,
    PairBatchSampler,
    cached_pair_loader,
    read_manifest,
)
from ..data.bad_images import BadImageLog, SkipUnreadable, SkipUnreadableDataset, collate_readable
from ..data.epoch_batches import EpochBatchSampler, SeededItems
from ..transforms import ContrastiveViewsd, EnsureFloatImaged, views_location
from ..utils.deprecation import renamed_arg

__all__ = [
    "IMAGE_SUFFIXES",
    "batch_loader",
    "batch_sampler",
    "check_manifest_splits",
    "contrastive_dataset",
    "eval_dataset",
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
        if split is not None:
            check_manifest_splits(df, manifest, split_col)
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


def check_manifest_splits(df: pd.DataFrame, manifest: str | os.PathLike, split_col: str = "split") -> None:
    """Refuse (one line, counts only) a manifest whose rows repeat an image or whose patients cross splits.

    The whole manifest is checked, not only the splits a phase reads: an evaluation of ``test`` is only
    honest when no ``test`` patient (or image) was in ``train``. Raises ``DuplicateInstanceError`` /
    ``LeakageError`` (both ``ValueError``).
    """
    from ..data.duplicates import check_unique_instances
    from ..data.splits import LeakageError

    check_unique_instances(df, str(manifest))
    if split_col in df.columns and "patient_id" in df.columns:
        splits = df.dropna(subset=[split_col]).groupby("patient_id")[split_col].nunique()
        crossing = splits[splits > 1]
        if len(crossing):
            pairs = df[df["patient_id"].isin(crossing.index)].groupby("patient_id")[split_col].agg(
                lambda v: "+".join(sorted(set(map(str, v)))))
            by_pair = ", ".join(f"{k}: {n}" for k, n in sorted(pairs.value_counts().items()))
            raise LeakageError(f"{manifest}: {len(crossing)} patient(s) appear in more than one split ({by_pair}): "
                               "a model would be evaluated on patients it trained on; re-split the manifest "
                               "('medssl split') instead of editing it")


def _image_cache(rows: pd.DataFrame, spec: ImageCacheSpec, device: str | torch.device | None = None,
                 num_workers: int = 0, phase: str = "train") -> ImageCache:
    """The decoded-image cache of ``rows`` (see :mod:`medssl_monai.data.cache`). Rows that could not be
    decoded are left out and recorded like any unreadable image (``bad_images.csv`` under ``phase``), so they
    count towards ``max_bad_images`` as they do without the cache."""
    images = spec.build(rows, device=device, num_workers=num_workers)
    if images.failures:
        logger.warning("image cache: %d of %d images could not be decoded and are left out", len(images.failures),
                       len(rows))
        log = BadImageLog(phase, len(rows))
        for failure in images.failures:
            log.record(str(failure["key"]), str(failure["reason"]))
    logger.info("image cache (%s): %d images at %s, %.1f MiB, %d decoded now", spec.mode, len(images.images),
                images.source_size, images.nbytes() / 2**20, images.decoded)
    return images


def cached_items(items: list[dict[str, Any]], rows: pd.DataFrame, image_cache: ImageCacheSpec,
                 phase: str = "train") -> list[dict[str, Any]]:
    """``items`` with ``image`` replaced by the row's cached uint8 ``(C, H, W)``, rows that could not be
    decoded dropped (and recorded under ``phase``). The images stay in host RAM whatever ``mode`` (no device
    is given): per-item transforms run on the CPU."""
    images = _image_cache(rows, image_cache, phase=phase)
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
    preset_overrides: dict[str, Any] | None = None,
    seed: int = 0,
    views_on: str = "host",
    image_cache: ImageCacheSpec | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> SkipUnreadableDataset | CachedPairDataset:
    """The pretraining dataset: pairs (MICLe) or single images (SimCLR), two views each.

    ``image_cache`` (default: no cache, 64 px, 3 channels) gives ``image_size``, the channels and the cache.
    Without the cache: a per-item dataset (load with :func:`batch_sampler` + :func:`batch_loader`); a pair
    with an unreadable image is replaced by the next readable item and recorded in the run's errors file
    (``bad_images``). ``views_on="host"`` (``"cpu"``: its former name): the items are the two augmented views; ``"device"``: the two source
    images resized to ``image_cache.source_shape()``, not augmented (``BatchViews`` makes the views on the
    accelerator, ``batch_views_for``, where per-item CPU work would starve it).

    ``image_cache.mode`` ``host`` / ``device`` (needs ``views_on="device"``): every image decoded once into
    the decoded-image cache (``num_workers`` decoding processes), and the dataset is a
    :class:`~medssl_monai.data.CachedPairDataset`: pairs drawn per batch by a
    :class:`~medssl_monai.data.PairBatchSampler` and gathered from RAM or ``device``.
    """
    spec = image_cache if image_cache is not None else ImageCacheSpec()
    views_on = views_location(views_on)
    if spec.enabled:
        if views_on != "device":
            raise ValueError(f"cache: {spec.mode!r} holds the uint8 sources for views made per batch: set views_on: "
                             "device (or cache: none for per-item CPU views)")
        # built in host RAM; the loader moves only this rank's shard to the device (CachedPairDataset.shard)
        images = _image_cache(rows, spec, None, num_workers)
        kept = rows[images.kept].reset_index(drop=True)
        images = images.take(np.flatnonzero(images.kept))
        return CachedPairDataset(images, MultiInstanceIndex(kept, level=level), pairing=pairing, groups=groups,
                                 mode=spec.mode, device=device)
    keys = ("image_1", "image_2")
    in_channels, image_size = spec.in_channels, spec.image_size
    if views_on == "device":
        transform = Compose([
            LoadManifestImaged(keys=keys, in_channels=in_channels),
            EnsureFloatImaged(keys=keys, in_channels=in_channels),
            Resized(keys=keys, spatial_size=spec.source_shape(), mode="area"),  # area: alias-free downscale
            CopyItemsd(keys=keys, names=["view_1", "view_2"]),
            DeleteItemsd(keys=keys),
            ToTensord(keys=("view_1", "view_2"), track_meta=False),
        ])
    else:
        transform = Compose([
            LoadManifestImaged(keys=keys, in_channels=in_channels),
            ContrastiveViewsd(keys=keys, transform=preset, spatial_size=(image_size, image_size),
                              preset_overrides=preset_overrides),
            ToTensord(keys=("view_1", "view_2"), track_meta=False),  # plain tensors: cheaper to collate
        ])
    pairs = ContrastivePairDataset(MultiInstanceIndex(rows, level=level), transform, pairing=pairing, groups=groups,
                                   seed=seed)
    return SkipUnreadableDataset(pairs, BadImageLog("train", len(rows)))


def batch_sampler(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                  seed: int = 0, rank: int = 0, world_size: int = 1,
                  min_batches: int = 0) -> EpochBatchSampler | PairBatchSampler:
    """The training batch sampler of ``dataset``: batches drawn from ``(seed, epoch)`` only, so a resumed run
    repeats the uninterrupted one; ``rank``/``world_size`` (a distributed config's override) shard them.

    A :class:`~medssl_monai.data.CachedPairDataset` gets a :class:`~medssl_monai.data.PairBatchSampler` (pairs
    drawn a batch at a time, the last partial batch dropped); any other dataset an
    :class:`~medssl_monai.data.epoch_batches.EpochBatchSampler` of ``(index, item seed)``. Refuses sizes that
    would give no usable batch. ``min_batches``: an epoch of at least that many batches (whole passes; see
    :class:`~medssl_monai.data.epoch_batches.EpochBatchSampler`), for per-item datasets.
    """
    if isinstance(dataset, CachedPairDataset):
        if min_batches:
            raise ValueError("min_batches applies to per-item datasets, not to cached pairs")
        if not drop_last:
            raise ValueError("the cached pairs are drawn in whole batches: set drop_last=True")
        return PairBatchSampler(dataset, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    n = len(dataset) // max(int(world_size), 1)
    where = "" if int(world_size) <= 1 else f" per rank (of {world_size})"
    if drop_last and n < batch_size:
        raise ValueError(f"{n} training item(s){where} is fewer than batch_size={batch_size} with drop_last: no "
                         "batch to train on; lower batch_size or add data")
    if not drop_last and n == 1 and batch_size > 1:
        raise ValueError("1 training item: BatchNorm cannot train on a batch of one; add data")
    return EpochBatchSampler(len(dataset), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, rank=rank,
                             world_size=world_size, min_batches=min_batches)


def batch_loader(dataset: torch.utils.data.Dataset, sampler: EpochBatchSampler | PairBatchSampler,
                 num_workers: int = 0) -> torch.utils.data.DataLoader:
    """The ``DataLoader`` of ``sampler``'s batches of ``dataset`` (what :func:`batch_sampler` made for it).

    Per-item datasets: read as ``(index, seed)`` (:class:`~medssl_monai.data.epoch_batches.SeededItems`,
    random transforms reseeded per item, whatever ``num_workers``), MONAI's ``worker_init_fn``, unreadable
    items dropped by ``collate_readable``. Cached pairs: gathered a batch at a time in this process
    (:func:`~medssl_monai.data.cached_pair_loader`; ``num_workers`` does not apply).
    """
    if isinstance(sampler, PairBatchSampler):
        if not isinstance(dataset, CachedPairDataset):
            raise TypeError(f"a PairBatchSampler draws from a CachedPairDataset, not {type(dataset).__name__}")
        return cached_pair_loader(dataset, sampler)
    return torch.utils.data.DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=num_workers,
                                       worker_init_fn=worker_init_fn, generator=sampler.generator,
                                       persistent_workers=num_workers > 0, collate_fn=collate_readable)


def skip_unreadable(transform: Any, phase: str, total: int) -> SkipUnreadable:
    """``transform`` whose unreadable images become ``None`` items (dropped by ``make_loader``'s collate)
    and rows of the run's errors file; for the bundles' evaluation and inference pipelines."""
    return SkipUnreadable(transform, BadImageLog(phase, total))


@renamed_arg("channels", "in_channels")
@renamed_arg("cache", "in_memory")
def eval_dataset(rows: pd.DataFrame, image_size: int = 64, in_channels: int = 3,
                 classes: Sequence[str] | None = None, in_memory: bool = False,
                 image_cache: ImageCacheSpec | None = None, phase: str = "eval", channels: int | None = None,
                 cache: bool | None = None) -> Dataset:
    """Deterministic resized images (+ integer labels when ``classes`` is given) for features/evaluation.

    ``in_memory`` decodes and resizes every image once and keeps the tensors (MONAI ``CacheDataset``): for
    monitors that read the same images every epoch. (``channels`` and ``cache`` are the former names of
    ``in_channels`` and ``in_memory``; "cache" now means only the decoded-image cache.) ``image_cache`` (mode ``host``/``device``) reads the
    decoded-image cache instead of the files (its ``source_size`` sources, resized to ``image_size``).
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
    cached = image_cache is not None and image_cache.enabled
    if cached:
        items = cached_items(items, rows, image_cache, phase=phase)
    transform = skip_unreadable(Compose([
        *([] if cached else [LoadManifestImaged(keys="image", in_channels=in_channels)]),
        EnsureFloatImaged(keys="image", in_channels=in_channels),
        Resized(keys="image", spatial_size=(image_size, image_size), mode="area"),  # area: alias-free downscale
    ]), phase, len(items))
    if in_memory:
        from monai.data import CacheDataset

        return CacheDataset(items, transform, progress=False, num_workers=0)
    return Dataset(items, transform)


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True,
                drop_last: bool = False, distributed: bool = False,
                even_divisible: bool = True, seed: int | None = None,
                min_batches: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader; under ``torch.distributed`` (``ignite.distributed``) each rank gets its own shard.

    ``seed`` (training): batches drawn from ``(seed, epoch)`` with a seed per item
    (:class:`~medssl_monai.data.epoch_batches.EpochBatchSampler`; ``ReseedEachEpoch(loader=...)`` sets the
    epoch), so a resumed run repeats the uninterrupted one exactly, whatever ``num_workers``; without
    ``drop_last`` a final batch of one item is merged into the one before (BatchNorm cannot train on one).

    ``batch_size`` is per process. MONAI's ``worker_init_fn`` seeds every worker's transforms differently.
    ``collate_readable`` drops the ``None`` items of unreadable images (a batch of only those is ``None``).
    ``even_divisible=False`` (evaluation): shards of unequal size that together hold every item exactly once
    (MONAI's ``DistributedSampler``), so gathered metrics and confusion-matrix counts are not padded with
    repeated items; training keeps equal shards (DDP needs the same number of steps on every rank).
    ``min_batches`` (with ``seed``): an epoch of at least that many batches, whole passes over the items (a
    tiny label budget otherwise takes one optimizer step per epoch).
    """
    import ignite.distributed as idist

    if min_batches and (seed is None or (distributed and idist.get_world_size() > 1)):
        raise ValueError("min_batches needs the seeded single-process loader (seed=...): its epoch sampler "
                         "makes the extra passes")

    if distributed and idist.get_world_size() > 1 and not even_divisible:
        from monai.data import DistributedSampler

        sampler = DistributedSampler(dataset, even_divisible=False, shuffle=shuffle)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                           drop_last=drop_last, worker_init_fn=worker_init_fn,
                                           persistent_workers=num_workers > 0, collate_fn=collate_readable)
    if seed is not None and not (distributed and idist.get_world_size() > 1):
        return batch_loader(dataset, batch_sampler(dataset, batch_size, shuffle, drop_last, int(seed),
                                                   min_batches=min_batches), num_workers)
    if distributed and idist.get_world_size() > 1:
        return idist.auto_dataloader(dataset, batch_size=batch_size * idist.get_world_size(), shuffle=shuffle,
                                     num_workers=num_workers, drop_last=drop_last, worker_init_fn=worker_init_fn,
                                     collate_fn=collate_readable)
    # not shuffled: a private generator, so that starting its (persistent) workers never draws from torch's
    # global generator: a resumed run starts them one epoch later than the uninterrupted run did
    generator = None if shuffle else torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                       drop_last=drop_last, worker_init_fn=worker_init_fn, generator=generator,
                                       persistent_workers=num_workers > 0, collate_fn=collate_readable)


class _NoHandler:
    """Stands in for a disabled handler in a config's handler list."""

    def attach(self, engine: Any) -> None:
        return None


def knn_monitor(network: torch.nn.Module, manifest: str | os.PathLike | None = None,
                dataset_dir: str | os.PathLike | None = None, train_split: str = "train", val_split: str = "val",
                interval: int = 1, k: int = 20, image_cache: ImageCacheSpec | None = None, batch_size: int = 64,
                num_workers: int = 0, max_images: int = 1000, device: str | torch.device = "cpu") -> Any:
    """A k-NN monitor on the labelled train/val images of the bundle's data (their ``image_size`` and channels,
    read through the decoded-image cache when ``image_cache`` has one), or a no-op when it cannot run
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
    spec = image_cache if image_cache is not None else ImageCacheSpec()
    # in memory: the monitor reads the same images every epoch (at most 2 x max_images x C x size^2 floats)
    loaders = [make_loader(eval_dataset(df, spec.image_size, spec.in_channels, classes, in_memory=True,
                                        image_cache=spec, phase="knn"), batch_size, num_workers, shuffle=False)
               for df in (train, val)]
    return KNNMonitor(network, loaders[0], loaders[1], interval=interval, k=k, device=device,
                      num_classes=len(classes))


def inference_items(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """``{"image": row, "sop_uid", "patient_id"}`` items for the bundles' ``preprocessing`` pipelines."""
    return [{"image": r, "sop_uid": str(r.get("sop_uid") or r["path"]), "patient_id": str(r.get("patient_id"))}
            for r in rows.to_dict("records")]
