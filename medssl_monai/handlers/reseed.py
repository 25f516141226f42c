"""Re-seed a training loader (or a dataset's random transforms) from (seed, epoch) at every epoch start.

Batches and augmentations then depend only on the epoch number, not on what ran before in the process, so a
run resumed from an epoch-end checkpoint sees exactly what the uninterrupted run would have. A loader made by
``make_loader(..., seed=...)`` draws its order and one seed per item from ``(seed, epoch)`` (whatever
``num_workers``, persistent workers included), as does the decoded-image cache's ``PairBatchSampler`` (the
sampler of a loader without automatic batching); a dataset with ``set_random_state`` is reseeded with
``seed + 1000003 * epoch``.
"""

from __future__ import annotations

import logging
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["ReseedEachEpoch"]

logger = logging.getLogger(__name__)


class ReseedEachEpoch:
    """At every ``EPOCH_STARTED``: ``set_epoch(epoch)`` of the loader's batch sampler (``loader.batch_sampler``,
    or ``loader.sampler`` when it yields whole batches), or ``set_random_state(...)``.

    Args:
        dataset: a dataset or loader with ``set_random_state`` (kept for older configs; ``loader`` also takes it).
        seed: the run's seed (for ``set_random_state``; an epoch loader keeps the seed it was made with).
        loader: the training loader. A loader with neither (a plain ``DataLoader`` given to
            ``build_finetune``) is left alone, with a warning that a resume is then not bit-exact.
    """

    def __init__(self, dataset: Any = None, seed: int = 0, loader: Any = None) -> None:
        target = loader if loader is not None else dataset
        if target is None:
            raise TypeError("ReseedEachEpoch needs loader= (or dataset=)")
        self.target = target
        self.seed = int(seed)
        sampler = getattr(target, "batch_sampler", None)
        if sampler is None:  # a loader without automatic batching: its sampler yields the batches (cached pairs)
            sampler = getattr(target, "sampler", None)
        self._set_epoch = getattr(sampler, "set_epoch", None) or getattr(target, "set_epoch", None)
        inner = getattr(target, "dataset", None)
        if self._set_epoch is None and not hasattr(target, "set_random_state") and hasattr(inner, "set_random_state"):
            self.target = target = inner  # e.g. a DDP loader: its dataset's transforms, as before epoch loaders
        if self._set_epoch is None and not hasattr(target, "set_random_state"):
            if loader is None:
                raise TypeError(f"{type(target).__name__} has no set_random_state(): nothing to reseed")
            logger.warning("%s has no epoch sampler and no set_random_state(): its batches are not reseeded per "
                           "epoch, so a resumed run may differ from an uninterrupted one", type(target).__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        if self._set_epoch is not None:
            self._set_epoch(epoch)
        elif hasattr(self.target, "set_random_state"):
            self.target.set_random_state(seed=(self.seed + 1000003 * epoch) % (2**32 - 1))
