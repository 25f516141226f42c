"""Projection / classification heads and the model wrappers used for SSL pretraining and fine-tuning."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["Classifier", "ClassifierHead", "ProjectionHead", "SSLModel"]


class _BatchNorm1dNoShift(nn.BatchNorm1d):
    """BatchNorm1d with a learnable scale but no shift (beta).

    SimCLRv2's last projection layer uses BN with ``center=False``; a shift right before the (cosine) contrastive
    loss only adds a parameter. Written as a subclass because ``BatchNorm1d(bias=False)`` needs torch >= 2.6.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True)
        self.bias = None  # un-registers the parameter; F.batch_norm accepts bias=None

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:  # only during nn.BatchNorm1d.__init__, before the bias is removed
            nn.init.zeros_(self.bias)


class ProjectionHead(nn.Module):
    """SimCLRv2 projection head: ``num_layers`` linear layers.

    Every layer but the last is Linear(no bias) -> BatchNorm1d -> ReLU; the last is Linear(no bias) ->
    BatchNorm1d without shift (see :class:`_BatchNorm1dNoShift`) and no ReLU. Linear biases are dropped because
    the following BN makes them redundant (as in SimCLRv2). Layers are kept in ``self.layers`` so that
    fine-tuning can start from a middle layer (:meth:`truncated`, :class:`Classifier`).

    Args:
        in_features: backbone feature dimension.
        hidden_features: width of the hidden layers; defaults to ``in_features`` (SimCLRv2).
        out_features: projection dimension (128 in SimCLR).
        num_layers: number of linear layers (SimCLRv2 uses 3, SimCLRv1 2).
        norm: ``"batch"`` (SimCLRv2) or ``"layer"`` (no batch statistics: the output of an item does not
            depend on the rest of the batch, e.g. for multi-process CPU runs where BN cannot be synchronised).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int = 128,
        num_layers: int = 3,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
        if norm not in ("batch", "layer"):
            raise ValueError(f"norm must be 'batch' or 'layer', got {norm!r}.")
        hidden = in_features if hidden_features is None else hidden_features
        layers: list[nn.Module] = []
        dim = in_features
        for i in range(num_layers):
            last = i == num_layers - 1
            out = out_features if last else hidden
            parts: OrderedDict[str, nn.Module] = OrderedDict(linear=nn.Linear(dim, out, bias=False))
            if norm == "layer":
                parts["bn"] = nn.LayerNorm(out, bias=not last)
            elif last:
                parts["bn"] = _BatchNorm1dNoShift(out)
            else:
                parts["bn"] = nn.BatchNorm1d(out)
                parts["act"] = nn.ReLU(inplace=True)
            layers.append(nn.Sequential(parts))
            dim = out
        self.in_features = in_features
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_layers(cls, layers: Sequence[nn.Module], in_features: int) -> ProjectionHead:
        """A head made of existing (shared, not copied) layers; used to keep the first k pretrained layers."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.in_features = in_features
        head.layers = nn.ModuleList(layers)
        return head

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def out_features(self) -> int:
        return self.layers[-1].linear.out_features if len(self.layers) else self.in_features

    def truncated(self, k: int) -> ProjectionHead:
        """The first ``k`` layers (sharing their modules), e.g. SimCLRv2's fine-tuning from the first layer."""
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"k must be in [0, {self.num_layers}], got {k}.")
        return ProjectionHead.from_layers(list(self.layers[:k]), self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClassifierHead(nn.Module):
    """Optional dropout followed by a linear layer (the linear-probe / fine-tuning classifier)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x))


class SSLModel(nn.Module):
    """Backbone + projection head for contrastive pretraining; ``forward(x) -> (features, projections)``.

    Features are returned too because linear evaluation and representation analysis use them, while the
    loss uses the projections.
    """

    def __init__(self, backbone: nn.Module, projection_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = (
            projection_head if projection_head is not None else ProjectionHead(int(backbone.feature_dim))
        )

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.feature_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return features, self.projection_head(features)


class Classifier(nn.Module):
    """Backbone (+ first ``keep_projection_layers`` of a pretrained projection head) + linear classifier.

    SimCLRv2 fine-tunes from a middle layer of the projection head rather than from the backbone output; with
    ``keep_projection_layers=k`` the first ``k`` layers of ``projection_head`` are kept (shared, not copied).
    They are stored as ``projection_head.layers.{i}`` so that an :class:`SSLModel` state dict loads into this
    model with ``strict=False`` (only the dropped head layers are unexpected).

    Args:
        backbone: feature extractor with ``feature_dim``.
        num_classes: number of output logits.
        keep_projection_layers: number of projection-head layers to keep (0: classifier on the features).
        projection_head: the pretrained :class:`ProjectionHead`; required when ``keep_projection_layers > 0``.
        dropout: dropout before the linear classifier.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        keep_projection_layers: int = 0,
        projection_head: ProjectionHead | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head: ProjectionHead | None = None
        in_features = int(backbone.feature_dim)
        if keep_projection_layers > 0:
            if projection_head is None:
                raise ValueError("keep_projection_layers > 0 needs the pretrained projection_head.")
            if keep_projection_layers > projection_head.num_layers:
                raise ValueError(
                    f"keep_projection_layers={keep_projection_layers} but the head has "
                    f"{projection_head.num_layers} layers."
                )
            self.projection_head = projection_head.truncated(keep_projection_layers)
            in_features = self.projection_head.out_features
        elif keep_projection_layers < 0:
            raise ValueError(f"keep_projection_layers must be >= 0, got {keep_projection_layers}.")
        self.head = ClassifierHead(in_features, num_classes, dropout)
        self.backbone_frozen = False

    @classmethod
    def from_ssl_model(
        cls, model: SSLModel, num_classes: int, keep_projection_layers: int = 0, dropout: float = 0.0
    ) -> Classifier:
        """Classifier sharing the backbone (and kept head layers) of a pretrained :class:`SSLModel`."""
        return cls(model.backbone, num_classes, keep_projection_layers, model.projection_head, dropout)

    def _frozen_parts(self) -> list[nn.Module]:
        return [m for m in (self.backbone, self.projection_head) if m is not None]

    def freeze_backbone(self) -> Classifier:
        """Linear-probe mode: only ``head`` trains.

        The backbone and kept projection layers stop requiring gradients *and* stay in eval mode even after
        ``model.train()``, so their BatchNorm statistics are not updated by the probe's data.
        """
        for part in self._frozen_parts():
            part.requires_grad_(False)
            part.eval()
        self.backbone_frozen = True
        return self

    def unfreeze_backbone(self) -> Classifier:
        """Back to full fine-tuning."""
        for part in self._frozen_parts():
            part.requires_grad_(True)
            part.train(self.training)
        self.backbone_frozen = False
        return self

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.backbone_frozen:
            for part in self._frozen_parts():
                part.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if self.projection_head is not None:
            features = self.projection_head(features)
        return self.head(features)
