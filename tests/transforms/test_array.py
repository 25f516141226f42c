"""Per-image view transforms (medssl_monai.transforms.array) against independent references: PIL's resize
for the crop, explicit numpy weighted sums / padded convolutions for grayscale and blur."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Resize
from PIL import Image
from references import numpy_blur

from medssl_monai.transforms import (
    LUMA_WEIGHTS,
    EnsureFloatImage,
    EnsureFloatImaged,
    RandColorJitter,
    RandGaussianBlur,
    RandGaussianBlurd,
    RandGrayscale,
    RandGrayscaled,
    RandomResizedCrop,
    RandomResizedCropd,
)
from medssl_monai.transforms.functional import blur_kernel_side


def _rand_rgb(h: int = 32, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((3, h, w), dtype=np.float32))


def test_ensure_float_image_layouts_and_ranges():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = EnsureFloatImage()(hwc)
    assert isinstance(out, MetaTensor) and out.shape == (3, 20, 30) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), hwc.transpose(2, 0, 1) / 255.0, atol=1e-6)

    gray16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    out = EnsureFloatImage(in_channels=3)(gray16)
    assert out.shape == (3, 20, 30)
    np.testing.assert_allclose(out[1].numpy(), gray16 / 65535.0, atol=1e-6)

    ct = rng.integers(-1000, 2000, (1, 16, 16)).astype(np.int16)  # signed: min-max rescaled
    out = EnsureFloatImage()(ct)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0

    # MONAI's LoadImage hands 8-bit files over as float32 in [0, 255]: scaled like uint8, not stretched
    dim = MetaTensor(torch.from_numpy(hwc.transpose(2, 0, 1).astype(np.float32) // 2))
    np.testing.assert_allclose(
        EnsureFloatImage()(dim).numpy(), (hwc.transpose(2, 0, 1) // 2) / 255.0, atol=1e-6
    )
    ramp = torch.linspace(10.5, 200.5, 16).reshape(1, 4, 4)  # not integer-valued: min-max rescaled
    out = EnsureFloatImage()(ramp)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0

    rgba = rng.integers(0, 256, (8, 9, 4), dtype=np.uint8)
    assert EnsureFloatImage()(rgba).shape == (3, 8, 9)

    rgb = torch.rand(3, 8, 9)
    gray = EnsureFloatImage(in_channels=1)(rgb)
    ref = sum(w * rgb[i] for i, w in enumerate(LUMA_WEIGHTS))
    torch.testing.assert_close(gray[0].as_tensor(), ref)

    d = EnsureFloatImaged(keys="image", in_channels=3)({"image": hwc[..., 0], "label": 1})
    assert d["image"].shape == (3, 20, 30) and d["label"] == 1


def test_random_resized_crop_shape_and_metatensor():
    img = MetaTensor(_rand_rgb(50, 70), meta={"filename_or_obj": "x.png"})
    out = RandomResizedCrop((32, 40))(img)
    assert isinstance(out, MetaTensor)
    assert out.shape == (3, 32, 40) and out.dtype == torch.float32
    assert out.meta["filename_or_obj"] == "x.png"
    assert out.applied_operations == []  # a crop trace alone would invert to the wrong geometry
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    full = RandomResizedCrop(64, scale=(1.0, 1.0), ratio=(1.0, 1.0))(MetaTensor(_rand_rgb(48, 48)))
    ref_affine = Resize((64, 64), mode="bilinear")(MetaTensor(_rand_rgb(48, 48))).affine
    torch.testing.assert_close(full.affine.double(), ref_affine.double())  # same geometry as MONAI's Resize
    out_np = RandomResizedCrop(16)(_rand_rgb(20, 20).numpy())
    assert isinstance(out_np, torch.Tensor) and out_np.shape == (3, 16, 16)


@pytest.mark.parametrize("src", [96, 40])  # downsampling (antialiased) and upsampling
def test_random_resized_crop_full_box_equals_pil_resize(src):
    rng = np.random.default_rng(src)
    a = rng.random((src, src), dtype=np.float32)
    crop = RandomResizedCrop(64, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = crop(torch.from_numpy(a)[None])
    assert crop.box == (0, 0, src, src)
    ref = np.asarray(Image.fromarray(a, mode="F").resize((64, 64), Image.BILINEAR))
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-5)


def test_random_resized_crop_content_is_the_chosen_box():
    rng = np.random.default_rng(3)
    a = rng.random((90, 120), dtype=np.float32)
    crop = RandomResizedCrop((24, 32), scale=(0.1, 0.5)).set_random_state(2)
    for _ in range(5):
        out = crop(torch.from_numpy(a)[None])[0].numpy()
        top, left, h, w = crop.box
        region = Image.fromarray(np.ascontiguousarray(a[top : top + h, left : left + w]), mode="F")
        np.testing.assert_allclose(out, np.asarray(region.resize((32, 24), Image.BILINEAR)), atol=1e-5)


def test_random_resized_crop_box_statistics():
    height, width = 150, 200
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    crop = RandomResizedCrop(32, scale=scale, ratio=ratio)
    crop.set_random_state(0)
    areas, aspects, positions = [], [], []
    for _ in range(3000):
        crop.randomize((height, width))
        top, left, h, w = crop.box
        assert 0 <= top and 0 <= left and top + h <= height and left + w <= width
        areas.append(h * w / (height * width))
        positions.append(
            (top / (height - h) if h < height else 0.5, left / (width - w) if w < width else 0.5)
        )
        aspects.append(w / h)
        # rounding the sides moves the ratio/area by at most about one pixel per side
        assert ratio[0] * (1 - 2 / h) - 1e-9 <= w / h <= ratio[1] * (1 + 2 / h) + 1e-9
        assert scale[0] * (1 - 2 / min(h, w)) <= areas[-1] <= scale[1] + 1e-9
    areas_a, log_aspects = np.array(areas), np.log(aspects)
    assert areas_a.min() < 0.1 and areas_a.max() > 0.9  # the whole range is reached
    # Boxes of at most half the area always fit at the first draw here, so on that part torchvision's
    # sampling is exactly area ~ U(scale), log-aspect ~ U(log ratio): check both shapes there.
    small = areas_a <= 0.5
    assert small.mean() > (0.5 - scale[0]) / (scale[1] - scale[0]) - 0.03
    lower = ((areas_a > 0.09) & (areas_a <= 0.29)).sum() / ((areas_a > 0.29) & (areas_a <= 0.49)).sum()
    assert 0.85 < lower < 1.15
    centre = 0.5 * (math.log(ratio[0]) + math.log(ratio[1]))
    assert abs(log_aspects[small].mean() - centre) < 0.02
    pos = np.array(positions)[small]  # the box position is uniform over the valid offsets
    np.testing.assert_allclose(pos.mean(0), 0.5, atol=0.03)
    assert (pos.min(0) < 0.02).all() and (pos.max(0) > 0.98).all()
    assert abs(log_aspects[small].std() - (math.log(ratio[1]) - math.log(ratio[0])) / math.sqrt(12)) < 0.02


def test_random_resized_crop_fallback_is_centre_crop():
    # no box with ratio in [2, 3] and full area fits a square: torchvision falls back to a centre crop
    crop = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(2.0, 3.0))
    crop.randomize((60, 60))
    assert crop.box == (15, 0, 30, 60)


def test_random_resized_crop_determinism():
    img = _rand_rgb(64, 64)
    a = RandomResizedCrop(32).set_random_state(7)
    b = RandomResizedCrop(32).set_random_state(7)
    outs_a, outs_b = [a(img) for _ in range(3)], [b(img) for _ in range(3)]
    for x, y in zip(outs_a, outs_b):
        torch.testing.assert_close(x, y)
    assert not torch.equal(outs_a[0], outs_a[1])
    d = RandomResizedCropd(keys=("image", "mask"), spatial_size=32).set_random_state(7)
    res = d({"image": img, "mask": img.clone()})
    torch.testing.assert_close(res["image"], outs_a[0])  # dict and array versions draw the same box
    torch.testing.assert_close(res["image"], res["mask"])  # one box for all keys


def test_saturation_zero_gives_grayscale():
    img = _rand_rgb()
    jitter = RandColorJitter(brightness=0, contrast=0, saturation=(0.0, 0.0), hue=0, prob=1.0)
    out = jitter(img)
    luma = sum(w * img[i].numpy().astype(np.float64) for i, w in enumerate(LUMA_WEIGHTS))
    for c in range(3):
        np.testing.assert_allclose(out[c].numpy(), luma, atol=1e-6)


def test_brightness_factor_scales_and_clips():
    img = _rand_rgb() * 0.6
    jitter = RandColorJitter(brightness=(1.5, 1.5), contrast=0, saturation=0, hue=0, prob=1.0)
    torch.testing.assert_close(jitter(img), img * 1.5)
    bright = torch.full((3, 4, 4), 0.9)
    assert float(jitter(bright).max()) == 1.0


def test_jitter_one_channel_only_brightness_contrast():
    img = torch.rand(1, 16, 16)
    jitter = RandColorJitter(brightness=0.5, contrast=0.5, saturation=0.8, hue=0.2, prob=1.0)
    jitter.set_random_state(11)
    out = jitter(img)
    assert out.shape == (1, 16, 16)
    b, c, _s, _h = jitter.factors
    ref = img.numpy().astype(np.float64)
    for i in jitter.order:  # manual reference: brightness and contrast only, in the drawn order
        if i == 0:
            ref = np.clip(ref * b, 0, 1)
        elif i == 1:
            ref = np.clip(c * ref + (1 - c) * ref.mean(), 0, 1)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        jitter(torch.rand(2, 4, 4))


def test_grayscale_matches_weighted_sum():
    img = MetaTensor(_rand_rgb())
    out = RandGrayscale(prob=1.0)(img)
    assert isinstance(out, MetaTensor) and out.shape == img.shape
    rgb = img.numpy().astype(np.float64)
    ref = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    for c in range(3):
        np.testing.assert_allclose(out[c].numpy(), ref, atol=1e-6)
    one = torch.rand(1, 5, 5)
    torch.testing.assert_close(RandGrayscale(prob=1.0)(one), one)
    d = RandGrayscaled(keys="image", prob=0.0)({"image": img})
    torch.testing.assert_close(d["image"], img)



def test_blur_matches_reference_keeps_constant_and_smooths_noise():
    blur = RandGaussianBlur(sigma=(1.5, 1.5), prob=1.0)
    side = lambda s: blur_kernel_side(s, blur.kernel_fraction, blur.kernel_size)  # noqa: E731
    assert side(64) == 7 and side(224) == 23  # ~10% of the side, odd
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = blur(noise)
    np.testing.assert_allclose(out.numpy(), numpy_blur(noise.numpy().astype(np.float64), 1.5, 7), atol=1e-5)
    assert float(out.var()) < 0.3 * float(noise.var())
    assert abs(float(out.mean()) - float(noise.mean())) < 5e-3
    const = torch.full((1, 30, 40), 0.37)
    torch.testing.assert_close(blur(const), const)  # reflect padding: no dark border
    for sigma in (0.2, 1.7):  # unclamped float32 sums give 1.0000002 here; an average must stay in [0, 1]
        white = torch.ones(3, 32, 32)
        assert torch.equal(RandGaussianBlur(sigma=(sigma, sigma), prob=1.0)(white), white)
    d = RandGaussianBlurd(keys=("a", "b"), prob=1.0).set_random_state(0)({"a": noise, "b": noise.clone()})
    torch.testing.assert_close(d["a"], d["b"])



def test_former_channel_keywords_still_work_with_a_warning() -> None:
    """``num_channels`` (EnsureFloatImage[d]) and a preset's ``channels`` are the former names of
    ``in_channels``: accepted for one release with MONAI's deprecation warning, same result as the new name."""
    import warnings

    from medssl_monai.transforms import get_preset

    rgb = np.random.default_rng(0).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the current name does not warn
        new = EnsureFloatImage(in_channels=1)(rgb)
    with pytest.warns(FutureWarning, match="num_channels.*in_channels"):
        old = EnsureFloatImage(num_channels=1)(rgb)
    assert old.shape == (1, 5, 7) and torch.equal(torch.as_tensor(old), torch.as_tensor(new))
    with pytest.warns(FutureWarning, match="num_channels.*in_channels"):
        d = EnsureFloatImaged(keys="image", num_channels=3)
    assert d.converter.in_channels == 3
    with pytest.warns(FutureWarning, match="channels.*in_channels"):
        pipeline = get_preset("chest_xray", channels=3)  # the preset's own default is 1
    assert pipeline.transforms[0].converter.in_channels == 3
