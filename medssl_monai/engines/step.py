"""One contrastive optimisation step (SimCLR / MICLe), shared by the Ignite engine and the benchmarks.

Both views go through the network as one batch of 2N (so batch norm sees both, as in SimCLR), the
projections are split back, NT-Xent (optionally patient-aware) is computed in float32, and the optimiser
and per-iteration LR schedule step. Values come back as tensors: converting them with ``.item()`` on every
iteration would synchronise with the GPU, so handlers do that only when they log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from ..losses import NTXentLoss

__all__ = ["ContrastiveStep"]

_AMP = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ContrastiveStep:
    """Callable ``step(batch) -> {"loss", "top1", "lr"}`` for batches with two view keys.

    Args:
        model: returns ``(features, projections)`` (``SSLModel``).
        loss: an ``NTXentLoss``.
        optimizer, scheduler: the scheduler (if any) steps every iteration.
        device: where the batch goes.
        amp: ``None``, ``"bf16"`` or ``"fp16"`` (fp16 uses a ``GradScaler``).
        channels_last: convert inputs (and the model, once) to channels-last memory format.
        grad_clip: max global gradient norm, ``None`` for no clipping.
        group_key: batch key with per-item group ids for the patient-aware loss (``None``: ignore groups).
        views: applied to each view batch on ``device`` before the model (``BatchViews``: the augmentations
            made on the accelerator, the loader then only decodes and resizes); ``None``: views come ready.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: NTXentLoss,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        device: torch.device | str = "cpu",
        amp: Literal["bf16", "fp16", "none"] | None = None,
        channels_last: bool = False,
        grad_clip: float | None = None,
        view_keys: tuple[str, str] = ("view_1", "view_2"),
        group_key: str | None = "group_index",
        views: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if amp not in _AMP:
            raise ValueError(f"amp must be one of {sorted(k for k in _AMP if k)} or None, got {amp!r}")
        self.model = model
        self.loss = loss
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.amp_dtype = _AMP[amp]
        self.channels_last = channels_last
        self.grad_clip = grad_clip
        self.view_keys = view_keys
        self.group_key = group_key
        self.views = views
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        x1 = torch.as_tensor(batch[self.view_keys[0]]).to(self.device, non_blocking=True)
        x2 = torch.as_tensor(batch[self.view_keys[1]]).to(self.device, non_blocking=True)
        if self.views is not None:
            x1, x2 = self.views(x1), self.views(x2)
        x = torch.cat([x1, x2])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        groups = None
        if self.group_key is not None and self.group_key in batch:
            groups = torch.as_tensor(batch[self.group_key]).to(self.device, non_blocking=True)
        self.model.train()
        with self._autocast():
            _, z = self.model(x)
        z1, z2 = z.float().chunk(2)
        loss, top1 = self.loss(z1, z2, group_ids=groups, return_accuracy=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return {"loss": loss.detach(), "top1": top1.detach(),
                "lr": torch.tensor(self.optimizer.param_groups[0]["lr"])}
