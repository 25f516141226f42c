"""Positive pairs drawn a whole batch at a time from index arrays (for the decoded-image cache).

The same items, group ids and pair semantics as :class:`~medssl_monai.data.ContrastivePairDataset`:
MICLe items are groups, two *different* images of a group drawn uniformly (over ordered pairs), afresh
every epoch, one image twice for a single-image group; SimCLR items are images, each used twice;
``groups="multi"`` keeps only groups with 2+ images; ``group_index`` is the group's position in
``MultiInstanceIndex.group_ids`` (what the patient-aware loss compares). The draws are numpy array ops over
all items at once (CSR offsets of each group's images), so no Python runs per item; a batch is then one
gather from the cache's ``(N, C, H, W)`` uint8 array, on the device when the cache is there.

Three components, composed by the bundle config as MONAI composes a dataset, a sampler and a loader:
:class:`CachedPairDataset` (the cached images and the grouped manifest; indexed by a whole batch of draws),
:class:`PairBatchSampler` (the draws: which items, which pairs, which rank's shard) and a
``torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None)`` (:func:`cached_pair_loader`), so
a distributed config replaces the sampler (``rank``/``world_size``) like any other component.

Seeding: the sampler's ``set_epoch(epoch)`` (``ReseedEachEpoch``) reseeds the draws from
``seed + 1000003 * epoch``; ``set_random_state(seed)`` fixes the order and the pairs of the next epochs
(same seed, same pairs). The random stream is not the per-item dataset's (that one draws inside DataLoader
workers), only its distribution is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import Randomizable
from torch.utils.data import DataLoader, Dataset, Sampler

from .cache import ImageCache
from .grouping import MultiInstanceIndex

__all__ = ["CachedPairDataset", "PairBatchSampler", "PairIndex", "cached_pair_loader"]


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


#: one batch of draws: row positions of the first and second views and the items' group indices
PairDraws = tuple[np.ndarray, np.ndarray, np.ndarray]


class CachedPairDataset(Dataset):
    """The decoded images of a grouped manifest, indexed by a whole batch of pair draws.

    ``dataset[(first, second, group_index)]`` (what :class:`PairBatchSampler` yields) is the batch
    ``{"view_1", "view_2", "group_index"}``: one gather per view from the cache's ``(N, C, H, W)`` uint8 array
    (``BatchViews`` then makes the augmented views on the training device). ``len()`` is the number of items
    (groups for MICLe, images for SimCLR).

    Args:
        cache: the decoded images of ``index.manifest``'s rows (row ``i`` at ``cache.slots[i]``).
        index: the grouped manifest of the cached rows (rows left out of the cache must be dropped first).
        pairing, groups: as ``ContrastivePairDataset``.
        mode: ``"device"``: :meth:`shard` moves the rows a rank draws to ``device`` (``"host"``: RAM).
        device: where a device cache lives.
    """

    def __init__(self, cache: ImageCache, index: MultiInstanceIndex, pairing: Literal["micle", "simclr"] = "micle",
                 groups: Literal["all", "multi"] = "all", mode: str = "host",
                 device: torch.device | str | None = None) -> None:
        if len(cache.slots) != len(index.manifest) or (cache.slots < 0).any():
            raise ValueError("CachedPairDataset: every row of the index must be in the cache (drop failed rows)")
        self.cache, self.index, self.pairing, self.groups = cache, index, pairing, groups
        self.mode, self.device = mode, device
        self.num_items = PairIndex(index, pairing, groups).total_items  # checks pairing and groups now
        self.images = cache.images
        self.row_slot = torch.as_tensor(cache.slots, device=cache.images.device)

    def __len__(self) -> int:
        return self.num_items

    def shard(self, rows: np.ndarray) -> CachedPairDataset:
        """This dataset with, for a device cache, only ``rows`` (one rank's draws) on the device; else itself."""
        if self.mode != "device" or self.device is None:
            return self
        out = object.__new__(CachedPairDataset)
        out.__dict__.update(self.__dict__)
        out.cache = self.cache.take(rows, self.device)  # only this rank's images on its device
        local = np.full(len(self.cache.slots), -1, dtype=np.int64)
        local[rows] = np.arange(len(rows))
        out.images, out.row_slot = out.cache.images, torch.as_tensor(local, device=self.device)
        return out

    def _gather(self, rows: np.ndarray) -> torch.Tensor:
        out = self.images.index_select(0, self.row_slot[torch.as_tensor(rows, device=self.images.device)])
        if out.device.type == "cpu" and torch.cuda.is_available():
            out = out.pin_memory()  # the step's non-blocking copy to the GPU then is asynchronous
        return out

    def __getitem__(self, draws: PairDraws) -> dict[str, torch.Tensor]:
        first, second, groups = draws
        return {"view_1": self._gather(first), "view_2": self._gather(second), "group_index": torch.as_tensor(groups)}


class PairBatchSampler(Sampler[PairDraws]):
    """Batches of pair draws over a :class:`CachedPairDataset`, drawn an epoch at a time (:class:`PairIndex`).

    An epoch has ``(items // world_size) // batch_size`` batches on every rank (the last partial batch
    dropped, as pretraining does); each rank draws from its own shard of items (``rank::world_size``).

    Args:
        dataset: the cached pairs (its grouped manifest, pairing and groups).
        batch_size: pairs per batch (per rank).
        shuffle: a new order every epoch.
        seed: the run's seed; :meth:`set_epoch` reseeds with ``seed + 1000003 * epoch``.
        rank, world_size: this process's shard (a distributed config sets them).
    """

    def __init__(self, dataset: CachedPairDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.pairs = PairIndex(dataset.index, dataset.pairing, dataset.groups, seed, rank, world_size)
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        steps = (self.pairs.total_items // self.world_size) // self.batch_size  # the same on every rank
        if steps < 1:
            raise ValueError(f"{self.pairs.total_items // self.world_size} items per rank: fewer than one batch of "
                             f"{batch_size}")
        self.steps = steps
        #: the loader's generator: a private one, so iterating never draws from torch's global generator
        self.generator = torch.Generator().manual_seed(0)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None
                         ) -> PairBatchSampler:
        self.pairs.set_random_state(seed, state)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``'s batches next (from ``(seed, epoch)`` only: a resumed run repeats them)."""
        self.set_random_state(seed=(self.seed + 1000003 * int(epoch)) % (2**32 - 1))

    def rows_needed(self) -> np.ndarray:
        """Row positions this shard can draw (a device cache holds only them)."""
        return self.pairs.rows_needed()

    def pair_counts(self) -> dict[str, int]:
        multi = int((self.pairs.sizes[self.pairs.items] >= 2).sum()) if self.pairs.pairing == "micle" else 0
        return {"distinct": multi, "same_image": len(self.pairs) - multi}

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[PairDraws]:
        first, second, groups = self.pairs.epoch(self.shuffle)
        for s in range(self.steps):
            sl = slice(s * self.batch_size, (s + 1) * self.batch_size)
            yield first[sl], second[sl], groups[sl]


def cached_pair_loader(dataset: CachedPairDataset, sampler: PairBatchSampler) -> DataLoader:
    """The ``DataLoader`` of ``sampler``'s batches of ``dataset`` (a device cache sharded to the sampler's rows).

    ``batch_size=None``: each draw is one batch, gathered by the dataset; in this process (the images may be
    on the device, and a gather needs no workers).
    """
    return DataLoader(dataset.shard(sampler.rows_needed()), sampler=sampler, batch_size=None, num_workers=0,
                      generator=sampler.generator)
