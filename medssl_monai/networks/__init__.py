"""Backbones, heads and (``weights/``) weight-transfer tools for SSL pretraining and Transfusion-style studies."""

from medssl_monai.networks.backbones import (
    BACKBONES,
    BackboneMixin,
    ResNetBackbone,
    available_backbones,
    get_backbone,
    global_avg_pool,
    register_backbone,
)
from medssl_monai.networks.cbr import CBR_CONFIGS, CBRNet  # importing registers the cbr_* backbones
from medssl_monai.networks.heads import Classifier, ClassifierHead, ProjectionHead, SSLModel
from medssl_monai.networks.weights import (
    TRANSFER_MODES,
    TransferReport,
    WeightTransferError,
    extract_state_dict,
    import_torchvision_resnet,
    load_backbone_weights,
    load_pretrained,
    map_torchvision_resnet_key,
    stage_keys,
)

__all__ = [
    "BACKBONES",
    "CBR_CONFIGS",
    "TRANSFER_MODES",
    "BackboneMixin",
    "CBRNet",
    "Classifier",
    "ClassifierHead",
    "ProjectionHead",
    "ResNetBackbone",
    "SSLModel",
    "TransferReport",
    "WeightTransferError",
    "available_backbones",
    "extract_state_dict",
    "get_backbone",
    "global_avg_pool",
    "import_torchvision_resnet",
    "load_backbone_weights",
    "load_pretrained",
    "map_torchvision_resnet_key",
    "register_backbone",
    "stage_keys",
]
