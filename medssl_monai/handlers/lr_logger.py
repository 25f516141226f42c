"""The learning rate each epoch trains with, to TensorBoard (the fine-tune bundle's ``lr`` curve).

Not an ``engine.state.metrics`` entry: the value is read at ``EPOCH_STARTED`` (MONAI's ``LrScheduleHandler``
steps at the epoch's end, so at ``EPOCH_COMPLETED`` the next epoch's rate would be logged).
"""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events
from torch.optim import Optimizer

__all__ = ["LearningRateLogger"]


class LearningRateLogger:
    """At each epoch start, the first parameter group's learning rate (the head's, see
    :func:`~medssl_monai.optim.finetune_param_groups`) as ``tag``; other groups as ``tag/<group name>``.

    At ``EPOCH_STARTED``, not completed: the value the epoch trains with (MONAI's ``LrScheduleHandler`` steps at
    the epoch's end). ``summary_writer=None`` makes it a no-op.
    """

    def __init__(self, summary_writer: Any, optimizer: Optimizer, tag: str = "lr") -> None:
        self.summary_writer = summary_writer
        self.optimizer = optimizer
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        if self.summary_writer is not None:
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        groups = self.optimizer.param_groups
        self.summary_writer.add_scalar(self.tag, groups[0]["lr"], engine.state.epoch)
        for i, g in enumerate(groups[1:], start=1):
            if g["lr"] != groups[0]["lr"]:
                self.summary_writer.add_scalar(f"{self.tag}/{g.get('name', i)}", g["lr"], engine.state.epoch)
