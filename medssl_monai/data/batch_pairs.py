"""Positive pairs drawn a whole batch at a time from index arrays (for the decoded-image cache).

The same items, group ids and pair semantics as :class:`~medssl_monai.data.ContrastivePairDataset`:
MICLe items are groups, two *different* images of a group drawn uniformly (over ordered pairs), afresh
every epoch, one image twice for a single-image group; SimCLR items are images, each used twice;
``groups="multi"`` keeps only groups with 2+ images; ``group_index`` is the group's position in
``MultiInstanceIndex.group_ids`` (what the patient-aware loss compares). The draws are numpy array ops over
all items at once (CSR offsets of each group's images), so no Python runs per item; a batch is then one
gather from the cache's ``(N, C, H, W)`` uint8 array, on the device when the cache is there.

Seeding: ``set_random_state(seed)`` fixes the order and the pairs of the next epochs (same seed, same
pairs); ``ReseedEachEpoch`` reseeds per epoch as it does for the dataset. The random stream is not the
per-item dataset's (that one draws inside DataLoader workers), only its distribution is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import Randomizable

from .cache import ImageCache
from .grouping import MultiInstanceIndex

__all__ = ["CachedPairLoader", "PairIndex"]


class PairIndex(Randomizable):
    """Vectorised pair draws over a grouped manifest: ``epoch() -> (first, second, group_index)`` arrays
    of row positions (into the index's manifest), one entry per item, in a fresh random order.

    Args:
        index: the grouped manifest (the rows that are in the cache).
        pairing, groups, seed: as ``ContrastivePairDataset``.
        rank, world_size: keep the items ``rank::world_size`` (each rank its own shard of groups/images).
    """

    def __init__(self, index: MultiInstanceIndex, pairing: Literal["micle", "simclr"] = "micle",
                 groups: Literal["all", "multi"] = "all", seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if pairing not in ("micle", "simclr"):
            raise ValueError(f"pairing must be 'micle' or 'simclr', got {pairing!r}")
        if groups not in ("all", "multi"):
            raise ValueError(f"groups must be 'all' or 'multi', got {groups!r}")
        self.pairing = pairing
        code = {g: i for i, g in enumerate(index.group_ids)}
        kept = index.multi_image_groups() if groups == "multi" else index.group_ids
        if not kept:
            raise ValueError(f"no {'multi-image ' if groups == 'multi' else ''}groups in the manifest")
        members = [np.asarray(index.rows(g), dtype=np.int64) for g in kept]
        sizes = np.array([len(m) for m in members], dtype=np.int64)
        gidx = np.array([code[g] for g in kept], dtype=np.int64)
        if pairing == "simclr":  # items: every image of the kept groups, in index order
            self.members = np.concatenate(members)
            self.offsets = np.arange(len(self.members), dtype=np.int64)
            self.sizes = np.ones(len(self.members), dtype=np.int64)
            self.group_index = np.repeat(gidx, sizes)
        else:
            self.members = np.concatenate(members)
            self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            self.sizes = sizes
            self.group_index = gidx
        self.total_items = len(self.sizes)
        self.rank, self.world_size = int(rank), int(world_size)
        self.items = np.arange(self.total_items)[self.rank::self.world_size]
        self.set_random_state(seed=seed)

    def __len__(self) -> int:
        return len(self.items)

    def rows_needed(self) -> np.ndarray:
        """Row positions this shard can draw (for a device cache that holds only them)."""
        return np.unique(np.concatenate([self.members[o:o + s] for o, s in
                                         zip(self.offsets[self.items], self.sizes[self.items])]))

    def randomize(self, data: Any = None) -> None:
        pass

    def epoch(self, shuffle: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One epoch of items: two row positions and the group index each, in a random order."""
        items = self.R.permutation(self.items) if shuffle else self.items
        n = self.sizes[items]
        a = np.floor(self.R.uniform(size=len(items)) * n).astype(np.int64)
        b = np.floor(self.R.uniform(size=len(items)) * np.maximum(n - 1, 1)).astype(np.int64)
        b = np.where(n > 1, b + (b >= a), a)  # uniform over ordered pairs of two different positions
        start = self.offsets[items]
        return self.members[start + a], self.members[start + b], self.group_index[items]


class CachedPairLoader:
    """Batches ``{"view_1", "view_2", "group_index"}`` gathered from an :class:`ImageCache`.

    Views are the cached uint8 sources (``BatchViews`` turns them into augmented views on the training
    device); an epoch has ``len(items) // batch_size`` batches (the last partial batch dropped, as the
    bundles' loader does). Under ``torch.distributed`` each rank draws from its own shard of items and, with
    a device cache, holds only that shard's images; every rank runs the same number of steps.

    Args:
        cache: the decoded images of ``index.manifest``'s rows (row ``i`` at ``cache.slots[i]``).
        index: the grouped manifest of the cached rows (rows left out of the cache must be dropped first).
        batch_size: pairs per batch (per rank).
        device: where the images live for ``mode="device"`` (the whole batch is gathered there).
    """

    yields_batches = True  #: ``make_loader`` passes it through as the loader

    def __init__(self, cache: ImageCache, index: MultiInstanceIndex, batch_size: int,
                 pairing: Literal["micle", "simclr"] = "micle", groups: Literal["all", "multi"] = "all",
                 seed: int = 0, shuffle: bool = True, mode: str = "host", device: torch.device | str | None = None,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if len(cache.slots) != len(index.manifest) or (cache.slots < 0).any():
            raise ValueError("CachedPairLoader: every row of the index must be in the cache (drop failed rows)")
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            world_size = torch.distributed.get_world_size() if dist else 1
        self.pairs = PairIndex(index, pairing, groups, seed, rank, world_size)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        steps = (self.pairs.total_items // world_size) // self.batch_size  # the same on every rank
        if steps < 1:
            raise ValueError(f"{self.pairs.total_items // world_size} items per rank: fewer than one batch of "
                             f"{batch_size}")
        self.steps = steps
        if mode == "device" and device is not None:
            needed = self.pairs.rows_needed()
            self.cache = cache.take(needed, device)  # only this rank's images on its device
            local = np.full(len(cache.slots), -1, dtype=np.int64)
            local[needed] = np.arange(len(needed))
            self.row_slot = torch.as_tensor(local, device=device)
        else:
            self.cache = cache
            self.row_slot = torch.as_tensor(cache.slots, device=cache.images.device)
        self.images = self.cache.images

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None
                         ) -> CachedPairLoader:
        self.pairs.set_random_state(seed, state)
        return self

    def __len__(self) -> int:
        return self.steps

    def pair_counts(self) -> dict[str, int]:
        multi = int((self.pairs.sizes[self.pairs.items] >= 2).sum()) if self.pairs.pairing == "micle" else 0
        return {"distinct": multi, "same_image": len(self.pairs) - multi}

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        out = self.images.index_select(0, self.row_slot[rows])
        if out.device.type == "cpu" and torch.cuda.is_available():
            out = out.pin_memory()  # the step's non-blocking copy to the GPU then is asynchronous
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        first, second, groups = self.pairs.epoch(self.shuffle)
        dev = self.images.device
        first, second = torch.as_tensor(first, device=dev), torch.as_tensor(second, device=dev)
        groups = torch.as_tensor(groups)
        for s in range(self.steps):
            sl = slice(s * self.batch_size, (s + 1) * self.batch_size)
            yield {"view_1": self._gather(first[sl]), "view_2": self._gather(second[sl]), "group_index": groups[sl]}
