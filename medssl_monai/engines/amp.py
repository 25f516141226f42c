"""The bundles' ``amp`` setting (``null | "bf16" | "fp16"``) -> autocast arguments for MONAI's engines."""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["AMP_DTYPES", "amp_dtype", "autocast_kwargs"]

logger = logging.getLogger(__name__)

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def amp_dtype(amp: bool | str | None) -> torch.dtype | None:
    """``amp`` setting -> autocast dtype (``None``: off). A string such as ``"none"`` must not read as true."""
    if amp is None or amp is False:
        return None
    if amp is True:
        return torch.float16
    if isinstance(amp, str):
        key = amp.strip().lower()
        if key in ("none", "false", "off", ""):
            return None
        if key in AMP_DTYPES:
            return AMP_DTYPES[key]
    raise ValueError(f"amp must be None/False/'none', True/'fp16' or 'bf16', got {amp!r}.")


def autocast_kwargs(amp: bool | str | None, device: str | torch.device) -> dict[str, Any] | None:
    """``{"dtype": ...}`` for ``SupervisedTrainer/Evaluator(amp=True, amp_kwargs=...)``, or ``None`` (off).

    MONAI's engines autocast on CUDA only, so elsewhere the setting is ignored, with a warning.
    """
    dtype = amp_dtype(amp)
    if dtype is None:
        return None
    if torch.device(device).type != "cuda":
        logger.warning("amp=%s is ignored on %s: MONAI's engines autocast on CUDA only", amp, device)
        return None
    return {"dtype": dtype}
