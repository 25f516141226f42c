"""The tensors of a checkpoint from any phase or tool, however they are nested."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["Checkpoint", "extract_state_dict"]

#: entries under which training code commonly nests the weights, most specific first
_WRAPPER_KEYS = ("backbone", "state_dict", "model_state_dict", "model", "network", "net", "encoder")

Checkpoint = str | os.PathLike | Mapping[str, Any] | nn.Module


def extract_state_dict(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a checkpoint from any phase, plus the names of non-tensor entries that were dropped.

    Accepts a path (loaded with ``weights_only=True`` on CPU), a module, a raw state dict, or a dict nesting
    one under ``backbone`` / ``state_dict`` / ``model`` / ``network`` / ... (ignite, Lightning, bundles).
    """
    obj: Any = checkpoint
    if isinstance(obj, str | os.PathLike):
        obj = torch.load(obj, map_location="cpu", weights_only=True)
    for _ in range(len(_WRAPPER_KEYS) + 1):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise TypeError(
                f"expected a state dict, checkpoint dict, module or path, got {type(obj).__name__}."
            )
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping | nn.Module)), None)
        if inner is None:
            break
        obj = inner
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"no tensors found in the checkpoint; its top-level keys are {list(obj)[:20]}.")
    return tensors, [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
