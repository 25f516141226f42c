"""Weights between phases and tools: state dicts, transfer modes (full, first k stages, Mean-Var), torchvision
import, the per-key report, and the phase hand-over the bundles call."""

from .pretrained import load_pretrained
from .report import TransferReport, WeightTransferError
from .state_dict import extract_state_dict
from .torchvision import import_torchvision_resnet, map_torchvision_resnet_key
from .transfer import TRANSFER_MODES, load_backbone_weights, stage_keys

__all__ = [
    "TRANSFER_MODES",
    "TransferReport",
    "WeightTransferError",
    "extract_state_dict",
    "import_torchvision_resnet",
    "load_backbone_weights",
    "load_pretrained",
    "map_torchvision_resnet_key",
    "stage_keys",
]
