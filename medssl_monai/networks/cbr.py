"""The small conv-BN-ReLU ("CBR") family of Raghu et al. 2019, *Transfusion: Understanding Transfer Learning
for Medical Imaging*.

Each block is one conv (stride 1, "same" padding) -> BatchNorm -> ReLU followed by a 3x3 stride-2 max-pool;
global average pooling follows the last block. Blocks are MONAI ``Convolution`` layers (conv + ``ADN`` with
ordering "NDA"), so their keys look like MONAI's (``block1.cbr.conv.weight``, ``block1.cbr.adn.N.*``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool

from medssl_monai.networks.backbones import BackboneMixin, register_backbone

__all__ = ["CBR_CONFIGS", "CBRNet", "cbr_large_t", "cbr_large_w", "cbr_small", "cbr_tiny"]

#: name -> (channels per block, conv kernel size), as in Transfusion (Raghu et al. 2019, Sec. 3).
CBR_CONFIGS: dict[str, tuple[tuple[int, ...], int]] = {
    "cbr_large_t": ((32, 64, 128, 256, 512), 7),
    "cbr_large_w": ((64, 128, 256, 512), 7),
    "cbr_small": ((32, 64, 128, 256), 7),
    "cbr_tiny": ((64, 128, 256, 512), 5),
}


class CBRNet(BackboneMixin, nn.Module):
    """Stack of conv-BN-ReLU + max-pool blocks; stages are ``block1`` .. ``blockK`` (block i has stride 2**i).

    Args:
        channels: output channels of each block; pass narrower late entries for Transfusion's "slimmed"
            hybrids (reuse the first blocks of a pretrained net, smaller fresh top).
        kernel_size: conv kernel size (7 for Large/Small, 5 for Tiny).
        in_channels: input channels.
        spatial_dims: 2 for images (3 works too).
        act, norm: MONAI activation / normalisation specs.
        bias: conv bias; off by default because BatchNorm's shift makes it redundant.
    """

    def __init__(
        self,
        channels: Sequence[int],
        kernel_size: int = 7,
        in_channels: int = 3,
        spatial_dims: int = 2,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) == 0:
            raise ValueError("channels must list at least one block.")
        self.channels = [int(c) for c in channels]
        self.kernel_size = kernel_size
        self.feature_dim: int = self.channels[-1]
        self.stage_names: list[str] = [f"block{i}" for i in range(1, len(self.channels) + 1)]
        pool_type = Pool[Pool.MAX, spatial_dims]
        prev = in_channels
        for name, ch in zip(self.stage_names, self.channels):
            cbr = Convolution(
                spatial_dims, prev, ch, strides=1, kernel_size=kernel_size, act=act, norm=norm, bias=bias
            )
            # padding=1 gives ceil(n / 2), i.e. TensorFlow's "SAME" pooling used by the original models
            pool = pool_type(kernel_size=3, stride=2, padding=1)
            self.add_module(name, nn.Sequential(OrderedDict(cbr=cbr, pool=pool)))
            prev = ch
        conv_type = Conv[Conv.CONV, spatial_dims]
        for m in self.modules():  # same init as MONAI's ResNet so both families start alike
            if isinstance(m, conv_type):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def _cbr(name: str) -> Any:
    default_channels, default_kernel = CBR_CONFIGS[name]

    def factory(in_channels: int = 3, **kwargs: Any) -> CBRNet:
        kwargs.setdefault("channels", default_channels)
        kwargs.setdefault("kernel_size", default_kernel)
        return CBRNet(in_channels=in_channels, **kwargs)

    factory.__name__ = name
    factory.__doc__ = (
        f"Transfusion {name}: channels {default_channels}, {default_kernel}x{default_kernel} convs."
    )
    return register_backbone(name, factory)


cbr_large_t = _cbr("cbr_large_t")
cbr_large_w = _cbr("cbr_large_w")
cbr_small = _cbr("cbr_small")
cbr_tiny = _cbr("cbr_tiny")
