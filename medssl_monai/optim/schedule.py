"""Learning-rate schedules (per iteration for pretraining, per epoch for fine-tuning) and SimCLR's batch-size
scaling rules."""

from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LambdaLR, LRScheduler

__all__ = ["epoch_scheduler", "scale_lr", "warmup_cosine", "warmup_cosine_scheduler"]


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float = 0.0
) -> float:
    """Learning rate after ``step`` optimiser steps: linear warm-up, then cosine decay.

    As in SimCLR, ``lr = base_lr * step / warmup_steps`` for ``step < warmup_steps`` (so the very first
    step uses lr 0), then ``final_lr + (base_lr - final_lr) * (1 + cos(pi * t)) / 2`` with
    ``t = (step - warmup_steps) / (total_steps - warmup_steps)``, and ``final_lr`` from ``total_steps`` on.
    Per iteration rather than per epoch because large-batch runs have few epochs and a per-epoch
    warm-up would jump.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps], got {warmup_steps}.")
    step = max(int(step), 0)
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return final_lr
    t = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine_scheduler(
    optimizer: Optimizer, total_steps: int, warmup_steps: int, final_lr_ratio: float = 0.0
) -> LambdaLR:
    """``LambdaLR`` applying :func:`warmup_cosine` to every group's initial lr.

    Call ``scheduler.step()`` after every ``optimizer.step()`` (per iteration, not per epoch).
    ``final_lr_ratio`` is the final lr as a fraction of each group's initial lr.
    """
    # Validate eagerly rather than at the first scheduler step.
    warmup_cosine(0, total_steps, warmup_steps, 1.0, final_lr_ratio)
    return LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, 1.0, final_lr_ratio)
    )


def scale_lr(base_lr: float, batch_size: int, rule: Literal["linear", "sqrt"] = "linear") -> float:
    """SimCLR's batch-size scaling: ``linear`` gives ``base_lr * batch_size / 256`` (SimCLR: base 0.3),
    ``sqrt`` gives ``base_lr * sqrt(batch_size)`` (SimCLR: base 0.075, better for small batches)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if rule == "linear":
        return base_lr * batch_size / 256.0
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    raise ValueError(f"rule must be 'linear' or 'sqrt', got {rule!r}.")


def epoch_scheduler(optimizer: Optimizer, schedule: str = "cosine", max_epochs: int = 1) -> LRScheduler:
    """A per-epoch schedule for fine-tuning: ``"cosine"`` (each group's lr to 0 at ``max_epochs``, as in
    SimCLR's and MICLe's fine-tuning) or ``"constant"``. Always a scheduler, so a checkpoint's contents do not
    depend on the choice."""
    if schedule == "cosine":
        return CosineAnnealingLR(optimizer, T_max=max(1, int(max_epochs)))
    if schedule == "constant":
        return ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {schedule!r}.")
