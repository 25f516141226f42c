"""View presets (medssl_monai.transforms.presets): names, overrides, errors, and every preset on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from medssl_monai.transforms import (
    RandColorJitterd,
    RandomResizedCropd,
    get_preset,
    list_presets,
    preset_parameters,
)


def _natural_photo(name: str) -> np.ndarray:
    """A real photo from the shared data; skip (or fail under CI=true) when the folder is absent."""
    from conftest import require_data

    return np.asarray(Image.open(require_data("natural", name)))


def test_list_presets_and_errors():
    assert set(list_presets()) == {"natural", "dermatology", "chest_xray"}
    with pytest.raises(ValueError, match="chest_xray, dermatology, natural"):
        get_preset("imagenet")
    with pytest.raises(ValueError, match="unknown parameter"):
        get_preset("natural", not_a_knob=1)
    assert preset_parameters("dermatology")["strength"] == 0.5
    with pytest.raises(ValueError, match="square"):
        get_preset("dermatology", spatial_size=(32, 48))
    get_preset("dermatology", spatial_size=(32, 48), rot90_prob=0.0)


@pytest.mark.parametrize("name", ["natural", "dermatology", "chest_xray"])
def test_preset_on_real_photos(name):
    channels = 1 if name == "chest_xray" else 3
    pipeline = get_preset(name, spatial_size=(64, 64))
    pipeline.set_random_state(0)
    for photo in ("astronaut.png", "camera.png"):  # RGB and grayscale photos
        out = pipeline({"image": _natural_photo(photo), "label": 3})
        view = out["image"]
        assert isinstance(view, MetaTensor)
        assert view.shape == (channels, 64, 64) and view.dtype == torch.float32
        assert 0.0 <= float(view.min()) and float(view.max()) <= 1.0
        assert float(view.std()) > 0 and out["label"] == 3


def test_chest_xray_preset_on_synthetic_radiograph():
    yy, xx = np.mgrid[0:256, 0:200]
    xray = (30000 + 20000 * np.sin(xx / 17.0) * np.cos(yy / 23.0)).astype(np.uint16)  # 16-bit, (H, W)
    pipeline = get_preset("chest_xray", keys="img", spatial_size=48).set_random_state(1)
    for _ in range(5):
        view = pipeline({"img": xray})["img"]
        assert view.shape == (1, 48, 48) and view.dtype == torch.float32
        assert 0.0 <= float(view.min()) and float(view.max()) <= 1.0


def test_preset_overrides_reach_transforms():
    pipeline = get_preset("natural", keys=("x",), spatial_size=(32, 48), strength=0.5, crop_scale=(0.5, 1.0))
    jitter = next(t for t in pipeline.transforms if isinstance(t, RandColorJitterd)).inner
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.hue == pytest.approx((-0.1, 0.1))
    crop = next(t for t in pipeline.transforms if isinstance(t, RandomResizedCropd)).cropper
    assert crop.scale == (0.5, 1.0) and crop.spatial_size == (32, 48)
    assert pipeline({"x": torch.rand(3, 40, 40)})["x"].shape == (3, 32, 48)

