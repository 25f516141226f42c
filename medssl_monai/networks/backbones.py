"""Backbone registry and the ResNet family (SimCLR widths) built on MONAI's ``ResNet``.

Every backbone returned by :func:`get_backbone` follows one small protocol so that the SSL, transfer and
representation-analysis code never has to special-case an architecture:

* ``forward(x) -> (N, feature_dim)`` globally average-pooled features (no classifier);
* ``feature_dim: int``;
* ``stage_names: list[str]`` (ordered, input to output) and ``stages() -> OrderedDict[name, module]``, so that
  weights of the first ``k`` stages can be reused (Transfusion "hybrid" models) and per-stage activations can
  be hooked (SVCCA / CKA);
* ``forward_features(x, stages=None) -> dict[name, Tensor]`` for direct access to intermediate stage outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck, get_inplanes

__all__ = [
    "BACKBONES",
    "BackboneMixin",
    "ResNetBackbone",
    "available_backbones",
    "get_backbone",
    "global_avg_pool",
    "register_backbone",
    "resnet18",
    "resnet50",
    "resnet50_2x",
    "resnet50_4x",
    "resnet152",
]

#: name -> factory ``(in_channels: int = 3, **kwargs) -> nn.Module``; iterate it to list the names.
BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(
    name: str, factory: Callable[..., nn.Module] | None = None, *, overwrite: bool = False
) -> Callable[..., Any]:
    """Register ``factory(in_channels=3, **kwargs)`` under ``name``; usable as a decorator.

    Re-registering an existing name needs ``overwrite=True`` so that a plugin cannot silently shadow a
    built-in architecture that a config refers to.
    """
    key = name.lower()

    def _register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if key in BACKBONES and not overwrite:
            raise ValueError(f"backbone '{key}' is already registered; pass overwrite=True to replace it.")
        BACKBONES[key] = fn
        return fn

    return _register if factory is None else _register(factory)


def available_backbones() -> list[str]:
    """Sorted names accepted by :func:`get_backbone`."""
    return sorted(BACKBONES)


def get_backbone(name: str, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build the registered backbone ``name`` with ``in_channels`` input channels.

    Extra ``kwargs`` go to the factory (e.g. ``channels=`` for a slimmed CBR net, ``spatial_dims=3``).
    The result is checked against the backbone protocol (``feature_dim``, ``stage_names``, ``stages()``)
    because the transfer and analysis tools rely on it.
    """
    key = name.lower()
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; available: {', '.join(available_backbones())}.")
    model = BACKBONES[key](in_channels=in_channels, **kwargs)
    missing = [a for a in ("feature_dim", "stage_names", "stages") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"backbone '{key}' does not implement the backbone protocol, missing: {missing}.")
    return model


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C); dimension agnostic so 2D and 3D backbones share it."""
    return x.mean(dim=tuple(range(2, x.ndim)))


class BackboneMixin:
    """Stage-wise forward shared by the backbones; subclasses set ``stage_names`` and ``feature_dim``.

    The default ``stages()`` looks every stage up as an attribute of the same name, and ``forward`` runs the
    stages in order and pools, so a hook on ``stages()[name]`` always sees what ``forward`` computes.
    """

    feature_dim: int
    stage_names: list[str]

    def stages(self) -> OrderedDict[str, nn.Module]:
        """Ordered mapping ``stage name -> module`` (input to output)."""
        return OrderedDict((name, getattr(self, name)) for name in self.stage_names)

    def forward_features(
        self, x: torch.Tensor, stages: str | Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Outputs of the requested stages (all by default), computing no further than the last one asked."""
        if stages is None:
            wanted = list(self.stage_names)
        else:
            wanted = [stages] if isinstance(stages, str) else list(stages)
        unknown = [s for s in wanted if s not in self.stage_names]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; this backbone has {self.stage_names}.")
        last = max((self.stage_names.index(s) for s in wanted), default=-1)
        out: dict[str, torch.Tensor] = {}
        for i, (name, stage) in enumerate(self.stages().items()):
            if i > last:
                break
            x = stage(x)
            if name in wanted:
                out[name] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages().values():
            x = stage(x)
        return global_avg_pool(x)


class _ResNetStem(nn.Module):
    """conv1 -> bn1 -> act -> maxpool of a MONAI ResNet, as one callable/hookable stage.

    It shares (not copies) the parent's modules and is deliberately *not* registered as a submodule, so the
    backbone's ``state_dict`` keeps MONAI's ``ResNet`` key names (``conv1.weight``, ``bn1.*``) and checkpoints of
    plain MONAI ResNets load as they are.
    """

    def __init__(self, conv1: nn.Module, bn1: nn.Module, act: nn.Module, maxpool: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act, self.maxpool = conv1, bn1, act, maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.act(self.bn1(self.conv1(x))))


class ResNetBackbone(BackboneMixin, ResNet):
    """MONAI ``ResNet`` with the ImageNet stem, torchvision-style shortcuts and no classifier.

    Settings that differ from MONAI's defaults, on purpose:

    * ``conv1_t_size=7, conv1_t_stride=2, no_max_pool=False``: MONAI's default stem stride is 1, which keeps a
      4x larger feature map (4x the compute) than the ImageNet ResNet used by SimCLR / Transfusion.
    * ``shortcut_type="B", bias_downsample=False``: 1x1 conv + BN projection shortcuts without bias (torchvision's
      layout); MONAI's ``resnet18`` preset uses zero-padding shortcuts ("A") instead. With these settings the
      parameter counts equal torchvision's (minus ``fc``) and torchvision weights map one-to-one.
    * ``feed_forward=False``: ``forward`` returns pooled ``(N, feature_dim)`` features.

    ``width_multiplier`` scales *every* stage, stem included, as SimCLR's ResNet-50 (2x)/(4x) do (unlike
    torchvision's ``wide_resnet50_2``, which only widens the bottleneck's inner convs). ``block_inplanes``
    (planes of the four stages; the stem has ``block_inplanes[0]`` channels) overrides it, e.g. for a slimmed
    top whose first stages still take pretrained weights.

    Stages: ``stem`` (stride 4), ``layer1`` (stride 4), ``layer2`` (8), ``layer3`` (16), ``layer4`` (32).
    """

    _STEM_PARTS = ("conv1", "bn1", "act", "maxpool")

    def __init__(
        self,
        block: str | type[ResNetBlock | ResNetBottleneck] = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        in_channels: int = 3,
        width_multiplier: float = 1,
        block_inplanes: Sequence[int] | None = None,
        spatial_dims: int = 2,
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
    ) -> None:
        if block_inplanes is None:  # int() like MONAI's widen_factor, so 0.5 gives a slim net too
            block_inplanes = [int(c * width_multiplier) for c in get_inplanes()]
        inplanes = [int(c) for c in block_inplanes]
        super().__init__(
            block=block,
            layers=list(layers),
            block_inplanes=inplanes,
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            no_max_pool=False,
            shortcut_type="B",
            widen_factor=1.0,
            feed_forward=False,
            bias_downsample=False,
            act=act,
            norm=norm,
        )
        expansion = type(self.layer4[-1]).expansion
        self.block_inplanes = inplanes
        self.feature_dim: int = inplanes[3] * expansion
        self.stage_names: list[str] = ["stem", "layer1", "layer2", "layer3", "layer4"]
        object.__setattr__(self, "stem", _ResNetStem(self.conv1, self.bn1, self.act, self.maxpool))

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "stem":
            raise AttributeError("'stem' is a view of conv1/bn1/act/maxpool; replace those modules instead.")
        super().__setattr__(name, value)
        # keep the stem view in sync when a user swaps e.g. conv1 to change the input channels
        stem = self.__dict__.get("stem")
        if stem is not None and name in self._STEM_PARTS:
            setattr(stem, name, value)

    def train(self, mode: bool = True) -> ResNetBackbone:
        super().train(mode)
        self.stem.training = mode  # the unregistered stem view is not reached by nn.Module.train
        return self


def _resnet(block: str, layers: Sequence[int], width: int = 1) -> Callable[..., ResNetBackbone]:
    def factory(in_channels: int = 3, **kwargs: Any) -> ResNetBackbone:
        kwargs.setdefault("width_multiplier", width)
        return ResNetBackbone(block=block, layers=layers, in_channels=in_channels, **kwargs)

    factory.__doc__ = (
        f"MONAI ResNet ({block}, layers {tuple(layers)}, width x{width}) with the ImageNet stem."
    )
    return factory


resnet18 = register_backbone("resnet18", _resnet("basic", (2, 2, 2, 2)))
resnet50 = register_backbone("resnet50", _resnet("bottleneck", (3, 4, 6, 3)))
resnet50_2x = register_backbone("resnet50_2x", _resnet("bottleneck", (3, 4, 6, 3), width=2))
resnet50_4x = register_backbone("resnet50_4x", _resnet("bottleneck", (3, 4, 6, 3), width=4))
resnet152 = register_backbone("resnet152", _resnet("bottleneck", (3, 8, 36, 3)))
