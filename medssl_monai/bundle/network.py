"""The fine-tuning bundle's ``network_def`` factory."""

from __future__ import annotations

from torch import nn

from ..networks import Classifier, ProjectionHead, get_backbone

__all__ = ["classifier_def"]


def classifier_def(backbone: str, in_channels: int, num_classes: int, keep_projection_layers: int = 0,
                   projection_dim: int = 128, projection_layers: int = 3, projection_norm: str = "batch",
                   dropout: float = 0.0, backbone_kwargs: dict | None = None) -> nn.Module:
    """The fine-tuning bundle's ``network_def``: backbone + the first ``keep_projection_layers`` of a
    projection head shaped like the pretraining bundles' (so their ``projection_head.pt`` loads) + linear.

    ``backbone_kwargs`` go to the backbone factory: Transfusion's slimmed hybrids narrow the upper stages
    (``{"block_inplanes": [64, 128, 128, 256]}`` for a ResNet-18, ``{"channels": [...]}`` for a CBR net) while
    ``transfer_mode="first_k"`` fills the unchanged lower stages with pretrained weights.
    """
    net = get_backbone(backbone, in_channels=in_channels, **(backbone_kwargs or {}))
    head = None
    if keep_projection_layers > 0:
        head = ProjectionHead(int(net.feature_dim), out_features=projection_dim, num_layers=projection_layers,
                              norm=projection_norm)
    return Classifier(net, num_classes, keep_projection_layers=keep_projection_layers, projection_head=head,
                      dropout=dropout)
