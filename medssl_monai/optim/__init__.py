"""Optimisers, parameter groups and learning-rate schedules for pretraining and fine-tuning."""

from .lars import LARS, lars_param_groups
from .param_groups import finetune_param_groups
from .schedule import epoch_scheduler, scale_lr, warmup_cosine, warmup_cosine_scheduler

__all__ = [
    "LARS",
    "epoch_scheduler",
    "finetune_param_groups",
    "lars_param_groups",
    "scale_lr",
    "warmup_cosine",
    "warmup_cosine_scheduler",
]
