"""The evaluator's best key metric as a checkpointable object, for :class:`~.checkpoint.TrainingCheckpoint`.

MONAI's ``SupervisedEvaluator`` keeps ``best_metric`` / ``best_metric_epoch`` in its engine state, which no
checkpoint of the trainer holds; the fine-tune bundle lists this object among the checkpointed ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["EvaluatorBest"]


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
