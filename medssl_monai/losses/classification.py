"""Classification losses for fine-tuning and the class weights that counter label imbalance.

* :func:`class_weights`: inverse-frequency or "effective number" (Cui et al. 2019) weights for
  ``CrossEntropyLoss``, or ``pos_weight`` for ``BCEWithLogitsLoss``;
* :class:`IndexCrossEntropyLoss` / :class:`MultiHotBCEWithLogitsLoss`: the two losses, tolerant of the label
  shapes and dtypes MONAI data pipelines produce;
* :func:`classification_loss`: the one a config asks for (``multi_label``), weighted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "CLASS_WEIGHT_MODES",
    "IndexCrossEntropyLoss",
    "MultiHotBCEWithLogitsLoss",
    "class_weights",
    "classification_loss",
]

logger = logging.getLogger(__name__)

CLASS_WEIGHT_MODES = ("inverse", "effective", "none")


def _effective_number(n: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al. 2019: E_n = (1 - beta^n) / (1 - beta), the expected number of distinct samples."""
    return (1.0 - torch.pow(beta, n)) / (1.0 - beta)


def class_weights(
    labels: torch.Tensor | np.ndarray | Sequence,
    num_classes: int,
    mode: str = "inverse",
    beta: float = 0.999,
    multi_label: bool | None = None,
) -> torch.Tensor:
    """Loss weights from training labels, float32 ``(num_classes,)``.

    Multi-class (labels = class indices): ``CrossEntropyLoss(weight=...)`` weights.
        ``inverse``: ``1 / n_c``; ``effective``: ``1 / E_{n_c}`` (Cui et al. 2019, ``beta`` -> 1 approaches
        ``inverse``, ``beta = 0`` gives no re-weighting); ``none``: ones. Weights are scaled to mean 1 over
        the classes present, so the loss keeps its scale (and the learning rate its meaning). A class absent
        from ``labels`` gets weight 0: it is never a target, and a huge weight would only mislead.
    Multi-label (labels = ``(N, C)`` multi-hot): ``BCEWithLogitsLoss(pos_weight=...)``.
        ``inverse``: ``n_neg / n_pos`` (PyTorch's recommendation); ``effective``: ``E_{n_neg} / E_{n_pos}``;
        ``none``: ones. A label with no positives or no negatives gets 1 (no information to balance).

    ``multi_label=None`` infers the case: 2-D labels with ``num_classes`` columns are multi-hot.
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(f"mode must be one of {CLASS_WEIGHT_MODES}, got {mode!r}.")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}.")
    y = labels.detach().cpu() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if multi_label is None:
        multi_label = y.ndim == 2 and y.shape[1] == num_classes and not (num_classes > 1 and y.shape[1] == 1)
    if mode == "none":
        return torch.ones(num_classes, dtype=torch.float32)
    if multi_label:
        if y.ndim != 2 or y.shape[1] != num_classes:
            raise ValueError(f"multi-label labels must be (N, {num_classes}), got {tuple(y.shape)}.")
        pos = (y > 0.5).sum(dim=0).double()
        neg = y.shape[0] - pos
        if mode == "inverse":
            ratio = neg / pos
        else:
            ratio = _effective_number(neg, beta) / _effective_number(pos, beta)
        return torch.where((pos > 0) & (neg > 0), ratio, torch.ones_like(ratio)).float()
    idx = y.reshape(-1).long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes}).")
    counts = torch.bincount(idx, minlength=num_classes).double()
    present = counts > 0
    if not present.any():
        raise ValueError("no labels to compute class weights from.")
    raw = torch.zeros(num_classes, dtype=torch.float64)
    if mode == "inverse":
        raw[present] = 1.0 / counts[present]
    else:
        raw[present] = 1.0 / _effective_number(counts[present], beta)
    if (~present).any():
        logger.warning("classes %s have no training labels; their loss weight is 0",
                       torch.nonzero(~present).reshape(-1).tolist())
    return (raw * present.sum() / raw.sum()).float()


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else torch.as_tensor(t)


class IndexCrossEntropyLoss(nn.CrossEntropyLoss):
    """``CrossEntropyLoss`` that also takes ``(N, 1)`` or float-valued class-index targets.

    Data pipelines often yield labels as ``(1,)`` channel-first tensors or floats; PyTorch would read a float
    ``(N,)`` target as probabilities and fail. Anything else is passed through unchanged.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = _plain(input), _plain(target)
        if target.ndim == input.ndim and target.shape[1] == 1 and input.shape[1] > 1:
            target = target[:, 0]
        if target.ndim == input.ndim - 1 and target.is_floating_point():
            target = target.long()
        return super().forward(input, target)


class MultiHotBCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """``BCEWithLogitsLoss`` casting multi-hot targets to the logits' dtype (integer ones fail otherwise)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = _plain(input), _plain(target)
        return super().forward(input, target.reshape(input.shape).to(input.dtype))


def classification_loss(multi_label: bool = False, weight: torch.Tensor | Sequence[float] | None = None,
                        device: str | torch.device | None = None) -> nn.Module:
    """``MultiHotBCEWithLogitsLoss(pos_weight=weight)`` (multi-label) or ``IndexCrossEntropyLoss(weight=weight)``,
    on ``device``; the weights go to the log, since they change what the loss rewards."""
    if weight is not None:
        weight = torch.as_tensor(weight, dtype=torch.float32)
        logger.info("class weights: %s", [round(float(w), 4) for w in weight])
    loss: nn.Module = (
        MultiHotBCEWithLogitsLoss(pos_weight=weight) if multi_label else IndexCrossEntropyLoss(weight=weight)
    )
    return loss.to(device) if device is not None else loss
