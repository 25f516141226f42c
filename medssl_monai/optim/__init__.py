"""Optimisers and learning-rate schedules for self-supervised pretraining."""

from .lars import LARS, lars_param_groups
from .schedule import scale_lr, warmup_cosine, warmup_cosine_scheduler

__all__ = ["LARS", "lars_param_groups", "scale_lr", "warmup_cosine", "warmup_cosine_scheduler"]
