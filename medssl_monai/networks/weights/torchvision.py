"""Import a torchvision-layout ResNet file (e.g. ImageNet weights) into a MONAI ``ResNet`` backbone.

Nothing is downloaded: the file is the user's. The explicit key table is what rejects keys of other layouts.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
from monai.networks.nets.resnet import ResNet

from .report import TransferReport
from .state_dict import Checkpoint, extract_state_dict
from .transfer import _check_mode, _make_generator, _matches, _select_prefix, _transfer

__all__ = ["import_torchvision_resnet", "map_torchvision_resnet_key"]

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
#: torchvision ResNet key -> MONAI ResNet key. MONAI 1.x happens to use the same names (its projection shortcut
#: is ``nn.Sequential(conv, norm)`` -> ``downsample.0/1``); the explicit table is what rejects unknown keys and
#: is the single place to change if either naming moves.
_TORCHVISION_TO_MONAI: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"conv1\.weight"), r"conv1.weight"),
    (re.compile(rf"bn1\.{_BN}"), r"bn1.\1"),
    (re.compile(r"layer([1-4])\.(\d+)\.conv([1-3])\.weight"), r"layer\1.\2.conv\3.weight"),
    (re.compile(rf"layer([1-4])\.(\d+)\.bn([1-3])\.{_BN}"), r"layer\1.\2.bn\3.\4"),
    (re.compile(r"layer([1-4])\.(\d+)\.downsample\.0\.weight"), r"layer\1.\2.downsample.0.weight"),
    (re.compile(rf"layer([1-4])\.(\d+)\.downsample\.1\.{_BN}"), r"layer\1.\2.downsample.1.\3"),
)
_TORCHVISION_SKIPPED = ("fc.*",)


def map_torchvision_resnet_key(key: str) -> str | None:
    """MONAI ``ResNet`` key for a torchvision ResNet key, or ``None`` if it is not part of that layout."""
    for pattern, replacement in _TORCHVISION_TO_MONAI:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    return None


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters for ``in_channels`` inputs: sum for 1 channel, else tile and rescale by 3 / in_channels.

    Keeps the response to a grey image equal to the RGB model's response to the same grey image in all
    channels (the rule timm uses).
    """
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / weight.shape[1])
    tiled = weight.repeat(1, reps, *([1] * (weight.ndim - 2)))[:, :in_channels]
    return tiled * (weight.shape[1] / in_channels)


def import_torchvision_resnet(
    backbone: nn.Module,
    path_or_state_dict: Checkpoint,
    mode: str = "full",
    k: int | None = None,
    strict: bool = True,
    prefix: str | None = None,
    adapt_first_conv: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> TransferReport:
    """Load a torchvision-layout ResNet checkpoint (a local file; nothing is downloaded) into a MONAI ResNet.

    ``fc.*`` is dropped and listed as ``skipped``; keys outside torchvision's layout are ``unexpected``.
    With ``adapt_first_conv`` an RGB ``conv1`` is adapted to the backbone's input channels (e.g. grayscale)
    and listed in ``adapted``. The backbone needs torchvision's shortcuts (1x1 conv + BN, no bias), as the
    registered ``resnet*`` backbones have. ``mode``/``k``/``seed`` work as in :func:`load_backbone_weights`.
    """
    if not isinstance(backbone, ResNet):
        raise TypeError(f"expected a MONAI ResNet backbone, got {type(backbone).__name__}.")
    _check_mode(mode, k)
    report = TransferReport(mode=mode)
    state, non_tensors = extract_state_dict(path_or_state_dict)
    report.skipped.extend(non_tensors)

    def is_known(key: str) -> bool:
        return map_torchvision_resnet_key(key) is not None

    selected = _select_prefix(state, prefix, is_known, report)
    source: dict[str, torch.Tensor] = {}
    for key, value in selected.items():
        mapped = map_torchvision_resnet_key(key)
        if _matches(key, _TORCHVISION_SKIPPED):
            report.skipped.append(report.prefix + key)
        elif mapped is None:
            report.unexpected.append(report.prefix + key)
        else:
            source[mapped] = value

    conv1 = backbone.state_dict().get("conv1.weight")
    src_conv1 = source.get("conv1.weight")
    if (
        adapt_first_conv
        and conv1 is not None
        and src_conv1 is not None
        and src_conv1.shape[1] != conv1.shape[1]
        and src_conv1.shape[:1] + src_conv1.shape[2:] == conv1.shape[:1] + conv1.shape[2:]
    ):
        source["conv1.weight"] = _adapt_input_conv(src_conv1, conv1.shape[1])
        report.adapted.append("conv1.weight")
    # a MONAI ResNet built with feed_forward=True has its own fc: not part of the transfer
    return _transfer(
        backbone, source, report, k, strict, _TORCHVISION_SKIPPED, _make_generator(generator, seed)
    )
