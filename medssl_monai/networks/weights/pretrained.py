"""Hand-over between phases: initialise a network from the previous phase's weights or an ImageNet file.

Phase 2 starts from phase 1's ``models/model.pt`` (an ``SSLModel`` state dict), phase 3 from phase 2's;
users with a torchvision-layout ImageNet ResNet file can start from that instead. Every key is accounted
for in a report that goes to the log; a mismatch fails the run instead of silently training from scratch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .report import TransferReport
from .state_dict import extract_state_dict
from .torchvision import import_torchvision_resnet
from .transfer import load_backbone_weights

__all__ = ["load_pretrained"]

logger = logging.getLogger(__name__)


def _looks_torchvision(state: dict[str, torch.Tensor]) -> bool:
    keys = set(state)
    return "conv1.weight" in keys and "fc.weight" in keys and not any(k.startswith("backbone.") for k in keys)


def load_pretrained(
    network: nn.Module,
    ckpt: str | os.PathLike | None,
    mode: str = "full",
    k: int | None = None,
    source: str = "auto",
    strict: bool = True,
    load_projection: bool = True,
    seed: int | None = 0,
) -> TransferReport | None:
    """Load ``ckpt`` into ``network.backbone`` (and matching ``projection_head`` layers); no-op for no ckpt.

    Args:
        network: an ``SSLModel`` or ``Classifier`` (anything with ``.backbone``).
        ckpt: a phase's ``models/model.pt``, any checkpoint ``load_backbone_weights`` understands, or a
            torchvision-layout ResNet file. ``None``/``""``/``"none"`` keeps the random init.
        mode, k: ``"full"``, ``"first_k"`` (first ``k`` stages: Transfusion's hybrid reuse) or ``"mean_var"``.
        source: ``"auto"`` (torchvision layout detected by its keys), ``"medssl"`` or ``"torchvision"``.
        load_projection: also copy the projection-head layers the network keeps (SimCLRv2 fine-tuning).
    """
    if ckpt is None or str(ckpt).strip().lower() in ("", "none", "null"):
        logger.info("no pretrained checkpoint: random initialisation")
        return None
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_ckpt {path} not found (train the previous phase first, or set it to null)")
    network = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    raw = torch.load(path, map_location="cpu", weights_only=True)
    state, _ = extract_state_dict(raw)
    backbone = network.backbone
    if source == "torchvision" or (source == "auto" and _looks_torchvision(state)):
        report = import_torchvision_resnet(backbone, state, mode=mode, k=k, strict=strict, seed=seed)
    elif source in ("auto", "medssl"):
        report = load_backbone_weights(backbone, state, mode=mode, k=k, strict=strict, seed=seed)
    else:
        raise ValueError(f"source must be 'auto', 'medssl' or 'torchvision', got {source!r}")
    logger.info("pretrained %s -> backbone: %s", path.name, report.summary())
    head = getattr(network, "projection_head", None)
    head_file = path.with_name("projection_head.pt")
    if load_projection and head is not None and mode == "full":
        if not head_file.is_file():
            raise FileNotFoundError(f"the network keeps projection-head layers but {head_file} (written beside "
                                    f"{path.name} by the pretraining bundles) is missing")
        head_state = torch.load(head_file, map_location="cpu", weights_only=True)
        own = head.state_dict()
        bad = [n for n in own if n not in head_state or head_state[n].shape != own[n].shape]
        if bad:
            raise ValueError(f"{head_file}: projection-head tensors missing or of another shape: {bad[:5]}")
        head.load_state_dict({n: head_state[n] for n in own})
        logger.info("pretrained %s -> projection head: %d tensors", head_file.name, len(own))
    return report
