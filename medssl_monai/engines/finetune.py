"""Fine-tuning handlers the declarative bundle (``finetune_classification/configs/train.json``) attaches.

The fine-tune itself is MONAI's ``SupervisedTrainer`` + ``SupervisedEvaluator`` declared in that config; what
MONAI and Ignite do not provide is here:

* :class:`EvaluatorBest`: the evaluator's best key metric as a checkpointable object;
* :class:`LearningRateLogger`: the learning rate each epoch trains with, to TensorBoard.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ignite.engine import Engine, Events
from torch.optim import Optimizer

__all__ = ["EvaluatorBest", "LearningRateLogger"]


class EvaluatorBest:
    """The evaluator's best key metric as a checkpointable object.

    Ignite's engine state holds only epoch/iteration; without this a resumed fine-tune would compare its
    next validation against -1 and report a "best" that is not. Optional on load: checkpoints written before
    it existed still resume.
    """

    optional = True

    def __init__(self, evaluator: Any) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, Any]:
        s = self.evaluator.state
        return {"best_metric": float(s.best_metric), "best_metric_epoch": int(s.best_metric_epoch)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])


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
