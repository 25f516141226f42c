"""Losses: self-supervised (NT-Xent) and classification (fine-tuning)."""

from .classification import (
    CLASS_WEIGHT_MODES,
    IndexCrossEntropyLoss,
    MultiHotBCEWithLogitsLoss,
    class_weights,
    classification_loss,
)
from .ntxent import NTXentLoss, contrastive_top1, ntxent_loss

__all__ = [
    "CLASS_WEIGHT_MODES",
    "IndexCrossEntropyLoss",
    "MultiHotBCEWithLogitsLoss",
    "NTXentLoss",
    "class_weights",
    "classification_loss",
    "contrastive_top1",
    "ntxent_loss",
]
