"""Show the two augmented views of a few training pairs in TensorBoard.

Contrastive pretraining fails silently when the augmentation is wrong (a crop that misses the anatomy, a
colour jitter that turns an X-ray into noise, MICLe pairs that are not the same patient): the loss still
goes down. Looking at the views the network is actually trained on, once an epoch, is the cheapest check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch.nn import functional as F

__all__ = ["ViewPairsImageHandler", "view_pairs_grid"]

logger = logging.getLogger(__name__)

_GAP = 2  # pixels of white between views and between pairs


def _to_display(image: torch.Tensor) -> torch.Tensor:
    """One item ``(C, H, W)`` or ``(C, H, W, D)`` -> ``(1 or 3, H, W)`` float (a 3D volume shows its middle slice)."""
    image = image.detach().as_subclass(torch.Tensor)
    # uint8 sources (the decoded-image cache's batches, before BatchViews) are shown in [0, 1] like floats
    image = image.float().div(255.0).cpu() if image.dtype == torch.uint8 else image.float().cpu()
    if image.ndim == 2:
        image = image[None]
    if image.ndim == 4:
        image = image[..., image.shape[-1] // 2]
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) or (C, H, W, D) view, got shape {tuple(image.shape)}")
    if image.shape[0] not in (1, 3):
        image = image[:1]  # e.g. 2-channel inputs: show the first channel in grey
    return image


def _pad_to(image: torch.Tensor, height: int, width: int, channels: int) -> torch.Tensor:
    if image.shape[0] != channels:
        image = image.expand(channels, -1, -1)
    return F.pad(image, (0, width - image.shape[2], 0, height - image.shape[1]), value=0.0)


def view_pairs_grid(view_1: torch.Tensor, view_2: torch.Tensor, max_pairs: int = 8) -> torch.Tensor:
    """``(C, H, W)`` image in [0, 1]: one row per pair, ``view_1 | view_2`` side by side, white gaps between.

    Each pair is min-max scaled *jointly*, so an intensity augmentation applied to one view (brightness,
    contrast, gamma) stays visible as a difference between the two; per-image scaling would hide it.
    Grey (1-channel) images stay 1-channel unless some view is RGB.
    """
    n = min(max_pairs, view_1.shape[0], view_2.shape[0])
    if n < 1:
        raise ValueError("no pairs to show")
    pairs = [(_to_display(view_1[i]), _to_display(view_2[i])) for i in range(n)]
    channels = max(im.shape[0] for pair in pairs for im in pair)
    height = max(im.shape[1] for pair in pairs for im in pair)
    width = max(im.shape[2] for pair in pairs for im in pair)
    rows = []
    for a, b in pairs:
        lo = torch.minimum(a.min(), b.min())
        hi = torch.maximum(a.max(), b.max())
        scale = (hi - lo) if hi > lo else torch.ones(())
        a, b = ((im - lo) / scale for im in (a, b))
        gap = torch.ones(channels, height, _GAP)
        rows.append(torch.cat([_pad_to(a, height, width, channels), gap, _pad_to(b, height, width, channels)], 2))
    row_gap = torch.ones(channels, _GAP, rows[0].shape[2])
    out = [rows[0]]
    for row in rows[1:]:
        out += [row_gap, row]
    return torch.cat(out, 1).clamp_(0.0, 1.0)


class ViewPairsImageHandler:
    """Ignite handler: at the first iteration of every ``interval_epochs``-th epoch, log a grid of view pairs.

    Reads ``engine.state.batch`` (a dict with ``view_keys``) at ``ITERATION_STARTED``, i.e. the batch exactly
    as the step receives it, and writes ``summary_writer.add_image(tag, grid, epoch)`` (see
    :func:`view_pairs_grid`). A batch without the view keys is skipped with a warning, never an error: a
    display handler must not stop a training run.
    """

    def __init__(
        self,
        summary_writer: Any,
        view_keys: tuple[str, str] = ("view_1", "view_2"),
        max_pairs: int = 8,
        interval_epochs: int = 1,
        tag: str = "views",
    ) -> None:
        if interval_epochs < 1 or max_pairs < 1:
            raise ValueError(f"interval_epochs and max_pairs must be >= 1, got {interval_epochs}, {max_pairs}")
        self.summary_writer = summary_writer
        self.view_keys = tuple(view_keys)
        self.max_pairs = max_pairs
        self.interval_epochs = interval_epochs
        self.tag = tag
        self._pending = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def _epoch_started(self, engine: Engine) -> None:
        # a flag rather than an iteration filter: epoch_length is unknown during the first epoch of an iterator,
        # and after a mid-epoch resume the epoch's first iteration is not a multiple of it
        self._pending = (engine.state.epoch - 1) % self.interval_epochs == 0

    def __call__(self, engine: Engine) -> None:
        if not self._pending:
            return
        self._pending = False
        batch = engine.state.batch
        if not isinstance(batch, Mapping) or any(k not in batch for k in self.view_keys):
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            logger.warning("%s: batch has no %s (got %s); no images written", self.tag, self.view_keys, keys)
            return
        grid = view_pairs_grid(torch.as_tensor(batch[self.view_keys[0]]),
                               torch.as_tensor(batch[self.view_keys[1]]), self.max_pairs)
        self.summary_writer.add_image(self.tag, grid, engine.state.epoch, dataformats="CHW")
