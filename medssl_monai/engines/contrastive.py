"""The contrastive trainer of phases 1 and 2: a MONAI ``Trainer`` (an Ignite ``Engine``) around ContrastiveStep.

SimCLR and MICLe differ only in their data (one image twice vs two images of one patient) and in whether
the loss masks same-patient negatives, so one engine serves both. Being a MONAI ``Workflow``, it takes MONAI
and Ignite handlers (``LrScheduleHandler(epoch_level=False)`` for the per-iteration schedule,
``StatsHandler``, ``TensorBoardStatsHandler``, checkpointing, validation monitors) from a bundle config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from monai.engines import Trainer
from monai.utils import CommonKeys
from torch import nn

from ..losses import NTXentLoss
from .step import ContrastiveStep

__all__ = ["ContrastiveTrainer"]


class ContrastiveTrainer(Trainer):
    """Ignite/MONAI trainer for SimCLR and MICLe batches (``view_1``, ``view_2``, optional group ids).

    ``engine.state.output`` is ``{"loss", "top1", "lr"}`` as tensors (no per-iteration host sync); MONAI's
    ``StatsHandler``/``TensorBoardStatsHandler`` read ``loss`` by default.

    Args:
        device, max_epochs, train_data_loader, epoch_length, train_handlers, key_train_metric: as MONAI's
            ``SupervisedTrainer``.
        network: an ``SSLModel`` (forward returns ``(features, projections)``).
        optimizer: e.g. ``LARS``; the LR schedule is a handler.
        loss_function: ``NTXentLoss`` (patient-aware when batches carry ``group_key``).
        amp: ``None``/``"none"``, ``"bf16"`` or ``"fp16"``.
        channels_last, grad_clip, group_key, views: see ``ContrastiveStep``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: NTXentLoss | None = None,
        epoch_length: int | None = None,
        amp: Literal["bf16", "fp16", "none"] | None = None,
        channels_last: bool = False,
        grad_clip: float | None = None,
        group_key: str | None = "group_index",
        views: Callable[[torch.Tensor], torch.Tensor] | None = None,
        train_handlers: Sequence | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            handlers=train_handlers,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            amp=False,  # mixed precision is ContrastiveStep's (bf16 or fp16), not MONAI's fp16-only flag
            decollate=False,
        )
        self.network = network
        self.optimizer = optimizer
        self.loss_function = loss_function if loss_function is not None else NTXentLoss()
        self.step = ContrastiveStep(network, self.loss_function, optimizer, scheduler=None, device=device, amp=amp,
                                    channels_last=channels_last, grad_clip=grad_clip, group_key=group_key,
                                    views=views)

    def _iteration(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.step(batchdata)
        return {CommonKeys.LOSS: out["loss"], "top1": out["top1"], "lr": out["lr"]}
