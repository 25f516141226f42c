"""Parameter groups for fine-tuning: the pretrained backbone and the new head, each with and without decay.

Two splits, both plain ``torch.optim`` parameter-group dicts (any optimiser takes them):

* weight decay skips one-dimensional parameters (BatchNorm scales/shifts, biases), whose decay only fights
  the normalisation;
* the backbone (and the projection-head layers a classifier keeps: they are pretrained too) can learn at
  ``backbone_lr_mult`` times the head's rate. A new, randomly initialised head needs a large step; the
  pretrained features are what a few labels should disturb least.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["finetune_param_groups"]


def finetune_param_groups(network: nn.Module, weight_decay: float, lr: float,
                          backbone_lr_mult: float = 1.0, head_prefix: str = "head.") -> list[dict[str, Any]]:
    """Groups ``head``, ``head_no_decay``, ``backbone``, ``backbone_no_decay`` (empty ones dropped), head first.

    Only parameters that require gradients are included, so a linear probe (frozen backbone) optimises the
    head alone. Each group carries its own ``lr`` (``lr`` for the head, ``lr * backbone_lr_mult`` for the
    rest), which learning-rate schedulers scale from. ``network`` may be wrapped in
    ``DistributedDataParallel``; parameters are named as in the plain module.
    """
    if backbone_lr_mult < 0:
        raise ValueError(f"backbone_lr_mult must be >= 0, got {backbone_lr_mult}.")
    inner = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    named: dict[str, list[nn.Parameter]] = {"head": [], "head_no_decay": [], "backbone": [], "backbone_no_decay": []}
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        part = "head" if name.startswith(head_prefix) else "backbone"
        named[part if p.ndim > 1 else f"{part}_no_decay"].append(p)
    groups = []
    for name, params in named.items():
        if params:
            groups.append({"params": params, "name": name,
                           "weight_decay": 0.0 if name.endswith("no_decay") else weight_decay,
                           "lr": lr * (backbone_lr_mult if name.startswith("backbone") else 1.0)})
    if not groups:
        raise ValueError("the network has no trainable parameters.")
    return groups
