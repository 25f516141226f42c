"""Backbone features of images, the way the bundles compute them, and a per-image cache of them.

:func:`backbone_features` is the one embedding path of the package: a backbone from the registry, weights from
any checkpoint :func:`~medssl_monai.networks.load_backbone_weights` reads (a pretraining bundle's backbone, a
fine-tune bundle's classifier), images through :func:`~medssl_monai.bundle.data.eval_dataset` (resized,
deterministic). ``medssl select`` (:func:`medssl_monai.experiments.select.embed_manifest`) embeds a manifest
with it; MONAI Label's ``typicality`` strategy embeds its datastore's images with :func:`cached_features`,
which keeps one row per image id so a growing datastore embeds only its new images.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..utils.atomic import atomic_write_bytes
from ..utils.checksum import file_sha256

__all__ = ["backbone_features", "cached_features"]

logger = logging.getLogger(__name__)


def backbone_features(rows: pd.DataFrame, checkpoint: str | os.PathLike, *, backbone: str = "resnet18",
                      backbone_kwargs: Mapping[str, Any] | None = None, in_channels: int = 3, image_size: int = 64,
                      batch_size: int = 64, num_workers: int = 0, device: str | None = None,
                      phase: str = "select") -> tuple[list[int], np.ndarray]:
    """``(positions, (M, D) float32)``: the features of the readable rows of ``rows`` (manifest rows with
    resolved ``path``), by their positions in ``rows``; unreadable images are left out (logged under ``phase``).
    ``backbone``/``in_channels``/``image_size`` must be those the checkpoint was trained with."""
    import torch

    from ..networks import get_backbone, load_backbone_weights
    from .data import eval_dataset, make_loader

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
    rows = rows.reset_index(drop=True).copy()
    rows["sop_uid"] = pd.array([str(i) for i in range(len(rows))], dtype="string")  # the item id: its row
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = get_backbone(backbone, in_channels=in_channels, **dict(backbone_kwargs or {}))
    report = load_backbone_weights(net, str(checkpoint), strict=True)
    logger.info("backbone %s from %s: %s", backbone, checkpoint.name, report.summary())
    net = net.to(dev).eval()
    loader = make_loader(eval_dataset(rows, image_size, in_channels, phase=phase), batch_size, num_workers,
                         shuffle=False)
    positions: list[int] = []
    feats: list[np.ndarray] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            if batch is None:  # only unreadable images in this batch
                continue
            feats.append(net(torch.as_tensor(batch["image"]).to(dev)).float().cpu().numpy())
            positions += [int(i) for i in batch["sop_uid"]]
    features = np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, 0), np.float32)
    logger.info("embedded %d of %d images (dimension %d) in %.1f s", len(positions), len(rows),
                features.shape[1], time.perf_counter() - t0)
    return positions, features


def _read_cache(cache_file: Path, stamp: str) -> dict[str, np.ndarray]:
    """``{image id: feature row}`` of ``cache_file`` when it was made by the same checkpoint and settings."""
    if not cache_file.is_file():
        return {}
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            if str(data["stamp"]) != stamp:
                logger.info("embedding cache %s: another checkpoint or settings, computed again", cache_file.name)
                return {}
            return {str(k): f for k, f in zip(data["ids"], data["features"].astype(np.float32))}
    except (OSError, ValueError, KeyError) as e:
        logger.warning("embedding cache %s unreadable (%s): computed again", cache_file.name, e)
        return {}


def cached_features(ids: Sequence[str], locate: Callable[[str], str], checkpoint: str | os.PathLike,
                    cache_file: str | os.PathLike, **spec: Any) -> tuple[list[str], np.ndarray, int]:
    """Features of the images ``ids``: ``(ids embedded, (M, D) float32, how many were not in the cache)``.

    Rows already in ``cache_file`` (an ``.npz`` written by an earlier call with the same checkpoint content,
    by SHA-256, and the same ``spec``) are read; only the other ids are located (``locate(id)`` -> a path the
    image loader reads: a file or a DICOM series folder; e.g. MONAI Label's ``get_image_uri``, which
    downloads the series) and embedded with :func:`backbone_features` (``spec``: its keyword arguments). The
    cache keeps every id it has seen (an image that leaves the datastore and returns is not embedded again)
    and is rewritten atomically, owner-only (0600): a feature vector is derived from the image. Unreadable
    images are left out of the answer and tried again next time.
    """
    cache_file = Path(cache_file)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
    stamp = json.dumps({"checkpoint_sha256": file_sha256(checkpoint), **spec}, sort_keys=True, default=str)
    known = _read_cache(cache_file, stamp)
    ids = [str(i) for i in ids]
    new = [i for i in dict.fromkeys(ids) if i not in known]
    if new:
        rows = pd.DataFrame({"path": [str(locate(i)) for i in new]})
        positions, features = backbone_features(rows, checkpoint, **spec)
        known.update({new[p]: f for p, f in zip(positions, features)})
        if positions:
            buf = io.BytesIO()
            np.savez(buf, ids=np.asarray(list(known)), features=np.stack(list(known.values())),
                     stamp=np.asarray(stamp))
            atomic_write_bytes(cache_file, buf.getvalue(), mode=0o600)
    have = [i for i in ids if i in known]
    features = np.stack([known[i] for i in have]) if have else np.zeros((0, 0), np.float32)
    return have, features.astype(np.float32), len(new)
