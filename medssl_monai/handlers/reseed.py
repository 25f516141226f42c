"""Re-seed a dataset's random transforms from (seed, epoch) at the start of every epoch.

Augmentation streams then depend only on the epoch number, not on how many items were drawn before, so a
run resumed from an epoch-end checkpoint sees exactly the augmentations the uninterrupted run would have
(with ``num_workers=0``; with workers, MONAI's ``worker_init_fn`` reseeds from torch's restored RNG).
"""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events

__all__ = ["ReseedEachEpoch"]


class ReseedEachEpoch:
    """Call ``dataset.set_random_state(seed + epoch)`` at every ``EPOCH_STARTED``."""

    def __init__(self, dataset: Any, seed: int = 0) -> None:
        if not hasattr(dataset, "set_random_state"):
            raise TypeError(f"{type(dataset).__name__} has no set_random_state(): nothing to reseed")
        self.dataset = dataset
        self.seed = int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.dataset.set_random_state(seed=(self.seed + 1000003 * engine.state.epoch) % (2**32 - 1))
