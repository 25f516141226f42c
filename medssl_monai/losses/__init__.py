"""Self-supervised losses."""

from .ntxent import NTXentLoss, contrastive_top1, ntxent_loss

__all__ = ["NTXentLoss", "contrastive_top1", "ntxent_loss"]
