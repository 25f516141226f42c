"""Augmentation views for contrastive pretraining (SimCLR, MICLe) as MONAI transforms, and presets.

Laid out as MONAI's own transform packages are:

- :mod:`.functional`: the maths on plain tensors (crop boxes and resampling, colour, blur), shared by both
  paths below, for one image or a batch with one parameter per item;
- :mod:`.array`: per-image transforms (``Randomizable``, ``randomize=False`` to reuse a draw);
- :mod:`.dictionary`: their ``...d`` versions (one draw for all keys) and :class:`ContrastiveViewsd`;
- :mod:`.batch`: :class:`BatchViews`, a preset applied to a whole batch on the training device;
- :mod:`.presets` + ``preset_configs/``: the named recipes as bundle config.
"""

from medssl_monai.transforms.array import (
    EnsureFloatImage,
    RandColorJitter,
    RandGaussianBlur,
    RandGrayscale,
    RandomResizedCrop,
)
from medssl_monai.transforms.batch import VIEWS_ON, BatchViews, batch_views_for, views_location
from medssl_monai.transforms.dictionary import (
    ContrastiveViewsd,
    EnsureFloatImaged,
    RandColorJitterd,
    RandGaussianBlurd,
    RandGrayscaled,
    RandomResizedCropd,
)
from medssl_monai.transforms.functional import LUMA_WEIGHTS, hsv_to_rgb, rgb_to_grayscale, rgb_to_hsv
from medssl_monai.transforms.presets import get_preset, list_presets, load_preset_config, preset_parameters

__all__ = [
    "LUMA_WEIGHTS",
    "VIEWS_ON",
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
    "views_location",
]
