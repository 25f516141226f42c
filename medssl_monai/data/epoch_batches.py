"""Training batches drawn from ``(seed, epoch)`` only, each item with its own augmentation seed.

Why: a resumed run must see, in every epoch after the checkpoint, exactly the batches and augmentations the
uninterrupted run saw. With a plain ``DataLoader`` neither holds: the shuffle order comes from torch's global
generator (whatever consumed it before the epoch), and MONAI random transforms keep their own generators,
seeded once when they are built (``num_workers=0``) or when a worker starts (persistent workers start once),
so after a restart they replay the first epoch's draws. Here the epoch's order and one seed per item come
from ``(seed, epoch)``; the item's seed travels with its index through the sampler (also into persistent
workers) and :class:`SeededItems` reseeds the dataset's random transforms with it right before the item is
read. The result depends on neither the history of the process nor ``num_workers``.

Last batch (training without ``drop_last``): a final batch of a single item is merged into the batch before
it (``batch_size + 1`` items). A batch of one crashes BatchNorm in training mode ("Expected more than 1
value per channel"), and dropping it would leave that item out of the epoch; merging keeps every item in
every epoch at the cost of one slightly larger batch. Final batches of 2 or more are kept as they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose
from monai.utils import MAX_SEED
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochBatchSampler", "SeededItems", "epoch_seed", "random_parts"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 31-bit seed of ``(seed, epoch)`` (nearby seeds and epochs give unrelated streams)."""
    return int(np.random.SeedSequence([int(seed) % 2**32, int(epoch) % 2**32]).generate_state(1)[0] >> 1)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, item_seed)`` for :class:`SeededItems`; call :meth:`set_epoch` before each epoch.

    Args:
        n: number of items.
        batch_size: items per batch.
        shuffle: a new order every epoch (else ``0..n-1``).
        drop_last: drop a final short batch (pretraining: NT-Xent wants full batches); otherwise a final
            batch of one item is merged into the previous one (see the module docstring).
        seed: the run's seed.
        rank, world_size: this process's shard (a distributed config sets them): every rank draws the same
            epoch order and item seeds and takes the items ``rank::world_size`` of it, ``n // world_size`` each
            (equal steps on every rank; the items left over change with the order), so an item gets the
            augmentation it would get in a single process.
        min_batches: an epoch holds at least this many batches: whole passes over the items, each pass in its
            own order with its own item seeds, all drawn from ``(seed, epoch)``. Why: a small label budget
            (70 images at batch 64) otherwise trains for one optimizer step per epoch, so "6 epochs" would
            mean 6 steps; the epoch count, validation interval and learning-rate schedule stay as configured.
            The first pass is the epoch a sampler without ``min_batches`` yields.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, drop_last: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1, min_batches: int = 0) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.n, self.batch_size, self.shuffle, self.drop_last = int(n), int(batch_size), bool(shuffle), bool(drop_last)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        #: items per rank and epoch
        self.local_n = self.n // self.world_size if self.world_size > 1 else self.n
        self.epoch = 0
        self.min_batches = max(int(min_batches), 0)
        #: the DataLoader's generator (its workers' base seed), reseeded with the epoch
        self.generator = torch.Generator()
        self.set_epoch(0)
        self._epoch_given = False

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``__iter__`` yield epoch ``epoch``'s batches (Ignite's 1-based ``state.epoch``).

        Without a call before an ``__iter__`` (a config whose handlers were replaced), the epoch counts up by
        itself: every pass is still a new epoch, but a resumed run then restarts the count.
        """
        self.epoch = int(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch) ^ 0x5EED)
        self._epoch_given = True

    def _sizes(self) -> list[int]:
        full, rest = divmod(self.local_n, self.batch_size)
        sizes = [self.batch_size] * full
        if rest and not self.drop_last:
            if rest == 1 and sizes:
                sizes[-1] += 1  # merged: a batch of one would crash BatchNorm
            else:
                sizes.append(rest)
        return sizes

    def passes(self) -> int:
        """Passes over the items per epoch: enough whole passes for ``min_batches`` (at least one)."""
        per_pass = len(self._sizes())
        return max(1, -(-self.min_batches // per_pass)) if per_pass else 1

    def __len__(self) -> int:
        return len(self._sizes()) * self.passes()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if not self._epoch_given:
            self.set_epoch(self.epoch + 1)
        self._epoch_given = False
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        for _ in range(self.passes()):  # later passes continue the epoch's generator: pass 1 is unchanged
            order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
            if self.world_size > 1:
                order = order[self.rank::self.world_size][:self.local_n]
            seeds = torch.randint(0, MAX_SEED, (self.n,), generator=g, dtype=torch.int64).tolist()
            start = 0
            for size in self._sizes():
                yield [(i, seeds[i]) for i in order[start:start + size]]
                start += size


def random_parts(transform: Any) -> list[Any]:
    """The objects with ``set_random_state`` in ``transform``, looking through plain ``Compose`` chains and
    wrappers without a random state of their own.

    Why not MONAI's ``set_rnd``: it stops at the first object with ``set_random_state``, and ``Compose`` passes
    the seed on only to members that are ``Randomizable``, so the random transforms inside a wrapper such as
    ``SkipUnreadable`` (which must not be ``Randomizable``: ``CacheDataset`` would stop caching at it) were
    never reseeded, neither here nor by MONAI's ``worker_init_fn``.
    """
    found: list[Any] = []
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if obj is None or id(obj) in seen:
            return
        seen.add(id(obj))
        if type(obj) is Compose:  # its own R is unused by __call__; OneOf & co. use theirs and stay whole
            for t in obj.transforms:
                walk(t)
        elif hasattr(obj, "set_random_state"):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for key, value in vars(obj).items():
                if not key.startswith("__"):
                    walk(value)

    walk(transform)
    return found


class SeededItems(Dataset):
    """``dataset`` whose items, read as ``(index, seed)``, are made with random transforms reseeded by ``seed``.

    The random parts are found once (:func:`random_parts`): the dataset itself when it has
    ``set_random_state`` (e.g. the contrastive pair dataset, which passes the seed on to its views), else the
    random transforms in its ``transform``. A plain integer index reads the item unseeded. Other attributes are
    the wrapped dataset's.
    """

    def __init__(self, dataset: Any) -> None:
        if not isinstance(dataset, Sized):
            raise TypeError(f"{type(dataset).__name__} has no len(): cannot draw epochs of it")
        self.dataset = dataset
        if hasattr(dataset, "set_random_state"):
            self.random_parts: list[Any] = [dataset]
        else:
            self.random_parts = random_parts(getattr(dataset, "transform", None))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if isinstance(item, tuple):
            index, seed = item
            for j, part in enumerate(self.random_parts):
                part.set_random_state(seed=(int(seed) + j) % MAX_SEED)
            return self.dataset[int(index)]
        return self.dataset[item]

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("dataset")
        if inner is None or name.startswith("__"):  # unpickling: no dataset yet
            raise AttributeError(name)
        return getattr(inner, name)
