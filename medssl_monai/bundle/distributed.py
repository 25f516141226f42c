"""Multi-process training through ``ignite.distributed``: NCCL on GPUs, gloo on CPU, launched by torchrun.

The bundles' ``multi_gpu_train.json`` overrides a handful of ``train.json`` entries with these helpers, so
the single-process and multi-process runs share every other line of config.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ignite.distributed as idist
import torch
from torch import nn

__all__ = [
    "finalize_distributed",
    "init_distributed",
    "is_main",
    "summary_writer",
    "unwrap",
    "world_size",
    "wrap_ddp",
]

logger = logging.getLogger(__name__)


def init_distributed(backend: str | None = None) -> str:
    """Join the process group torchrun set up (``nccl`` with CUDA, ``gloo`` without); no-op when alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return "none"
    if idist.get_world_size() > 1:  # already initialised
        return str(idist.backend())
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    idist.initialize(backend)
    logger.info("rank %d of %d, backend %s, device %s", idist.get_rank(), idist.get_world_size(), backend,
                idist.device())
    return backend


def world_size() -> int:
    return idist.get_world_size()


def is_main() -> bool:
    """Rank 0 writes models, logs and TensorBoard files; the other ranks only train."""
    return idist.get_rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (checkpoints and exports hold the plain module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, sync_bn: bool = True) -> nn.Module:
    """``DistributedDataParallel`` for multi-process runs (batch norm synchronised on GPUs, where
    ``SyncBatchNorm`` works; on CPU each rank normalises with its own batch statistics)."""
    if idist.get_world_size() <= 1:
        return model
    device = idist.device()
    if sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


class _NullWriter:
    """A SummaryWriter stand-in for ranks other than 0."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def summary_writer(log_dir: str | os.PathLike) -> Any:
    """A TensorBoard writer on rank 0, a no-op elsewhere (one set of event files per run)."""
    if is_main():
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(log_dir))
    return _NullWriter()


def finalize_distributed() -> None:
    if idist.get_world_size() > 1:
        idist.barrier()
        idist.finalize()
