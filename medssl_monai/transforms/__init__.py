"""Augmentation views for contrastive pretraining (SimCLR, MICLe) as MONAI transforms, and presets."""

from medssl_monai.transforms.batch_views import BatchViews, batch_views_for
from medssl_monai.transforms.presets import get_preset, list_presets, load_preset_config, preset_parameters
from medssl_monai.transforms.views import (
    LUMA_WEIGHTS,
    ContrastiveViewsd,
    EnsureFloatImage,
    EnsureFloatImaged,
    RandColorJitter,
    RandColorJitterd,
    RandGaussianBlur,
    RandGaussianBlurd,
    RandGrayscale,
    RandGrayscaled,
    RandomResizedCrop,
    RandomResizedCropd,
    hsv_to_rgb,
    rgb_to_grayscale,
    rgb_to_hsv,
)

__all__ = [
    "LUMA_WEIGHTS",
    "BatchViews",
    "ContrastiveViewsd",
    "EnsureFloatImage",
    "EnsureFloatImaged",
    "RandColorJitter",
    "RandColorJitterd",
    "RandGaussianBlur",
    "RandGaussianBlurd",
    "RandGrayscale",
    "RandGrayscaled",
    "RandomResizedCrop",
    "RandomResizedCropd",
    "batch_views_for",
    "get_preset",
    "hsv_to_rgb",
    "list_presets",
    "load_preset_config",
    "preset_parameters",
    "rgb_to_grayscale",
    "rgb_to_hsv",
]
