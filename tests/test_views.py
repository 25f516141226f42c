"""Tests for the contrastive view transforms and presets (medssl_monai.transforms).

References are independent of the code under test where one exists: PIL's resize for the crop,
``colorsys`` for RGB<->HSV, explicit numpy weighted sums / padded convolutions for grayscale and blur.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.data.utils import set_rnd
from monai.transforms import Compose, RandFlipd, Resize
from PIL import Image

from medssl_monai.transforms import (
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
    get_preset,
    hsv_to_rgb,
    list_presets,
    preset_parameters,
    rgb_to_hsv,
)
from medssl_monai.transforms.views import adjust_hue, adjust_saturation


def _natural_photo(name: str) -> np.ndarray:
    """A real photo from the shared data; skip (or fail under CI=true) when the folder is absent."""
    from conftest import require_data

    return np.asarray(Image.open(require_data("natural", name)))


def _rand_rgb(h: int = 32, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((3, h, w), dtype=np.float32))


# --------------------------------------------------------------------------------------------------
# EnsureFloatImage
# --------------------------------------------------------------------------------------------------
def test_ensure_float_image_layouts_and_ranges():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = EnsureFloatImage()(hwc)
    assert isinstance(out, MetaTensor) and out.shape == (3, 20, 30) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), hwc.transpose(2, 0, 1) / 255.0, atol=1e-6)

    gray16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    out = EnsureFloatImage(num_channels=3)(gray16)
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
    gray = EnsureFloatImage(num_channels=1)(rgb)
    ref = sum(w * rgb[i] for i, w in enumerate(LUMA_WEIGHTS))
    torch.testing.assert_close(gray[0].as_tensor(), ref)

    d = EnsureFloatImaged(keys="image", num_channels=3)({"image": hwc[..., 0], "label": 1})
    assert d["image"].shape == (3, 20, 30) and d["label"] == 1


# --------------------------------------------------------------------------------------------------
# RandomResizedCrop
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# colour
# --------------------------------------------------------------------------------------------------
def _pixels(n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    special = [
        [0, 0, 0],
        [1, 1, 1],
        [0.5, 0.5, 0.5],
        [1, 0, 0],
        [0, 1, 0],
        [0, 0, 1],
        [1, 1, 0],
        [0.2, 0.2, 0.7],
    ]
    return np.concatenate([rng.random((n, 3)), np.array(special)]).astype(np.float32)


def test_rgb_hsv_round_trip_matches_colorsys():
    px = _pixels()
    img = torch.from_numpy(px.T.reshape(3, 1, -1).copy())
    hsv = rgb_to_hsv(img).reshape(3, -1).numpy().T
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in px.astype(np.float64)])
    hue_diff = np.abs(hsv[:, 0] - ref[:, 0])
    np.testing.assert_allclose(np.minimum(hue_diff, 1 - hue_diff), 0, atol=1e-5)  # hue is circular
    np.testing.assert_allclose(hsv[:, 1:], ref[:, 1:], atol=1e-5)
    rgb = hsv_to_rgb(rgb_to_hsv(img))
    torch.testing.assert_close(rgb, img, atol=1e-5, rtol=0)
    hsv_in = _pixels(seed=1)
    rgb2 = hsv_to_rgb(torch.from_numpy(hsv_in.T.reshape(3, 1, -1).copy())).reshape(3, -1).numpy().T
    ref2 = np.array([colorsys.hsv_to_rgb(*p) for p in hsv_in.astype(np.float64)])
    np.testing.assert_allclose(rgb2, ref2, atol=1e-5)


def test_hue_shift_matches_colorsys_and_zero_is_identity():
    img = _rand_rgb(8, 8)
    torch.testing.assert_close(adjust_hue(img, 0.0), img, atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_saturation(img, 1.0), img)
    shifted = adjust_hue(img, 0.3).reshape(3, -1).numpy().T
    ref = []
    for p in img.reshape(3, -1).numpy().T.astype(np.float64):
        h, s, v = colorsys.rgb_to_hsv(*p)
        ref.append(colorsys.hsv_to_rgb((h + 0.3) % 1.0, s, v))
    np.testing.assert_allclose(shifted, np.array(ref), atol=1e-5)


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


def test_jitter_prob_zero_is_identity_and_dict_shares_factors():
    img = MetaTensor(_rand_rgb())
    out = RandColorJitter(prob=0.0)(img)
    assert isinstance(out, MetaTensor)
    torch.testing.assert_close(out, img)
    d = RandColorJitterd(keys=("a", "b"), prob=1.0).set_random_state(3)({"a": img, "b": img.clone()})
    assert not torch.allclose(d["a"], img)
    torch.testing.assert_close(d["a"], d["b"])


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


# --------------------------------------------------------------------------------------------------
# blur
# --------------------------------------------------------------------------------------------------
def _numpy_blur(img: np.ndarray, sigma: float, k: int) -> np.ndarray:
    """Reference: 2D Gaussian as an explicit sum over kernel offsets on a reflect-padded image."""
    x = np.arange(k) - (k - 1) / 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    kernel2d = np.outer(g, g) / np.outer(g, g).sum()
    r = k // 2
    padded = np.pad(img, ((0, 0), (r, r), (r, r)), mode="reflect")
    out = np.zeros_like(img, dtype=np.float64)
    for dy in range(k):
        for dx in range(k):
            out += kernel2d[dy, dx] * padded[:, dy : dy + img.shape[1], dx : dx + img.shape[2]]
    return out


def test_blur_matches_reference_keeps_constant_and_smooths_noise():
    blur = RandGaussianBlur(sigma=(1.5, 1.5), prob=1.0)
    assert blur._kernel_side(64) == 7 and blur._kernel_side(224) == 23  # ~10% of the side, odd
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = blur(noise)
    np.testing.assert_allclose(out.numpy(), _numpy_blur(noise.numpy().astype(np.float64), 1.5, 7), atol=1e-5)
    assert float(out.var()) < 0.3 * float(noise.var())
    assert abs(float(out.mean()) - float(noise.mean())) < 5e-3
    const = torch.full((1, 30, 40), 0.37)
    torch.testing.assert_close(blur(const), const)  # reflect padding: no dark border
    for sigma in (0.2, 1.7):  # unclamped float32 sums give 1.0000002 here; an average must stay in [0, 1]
        white = torch.ones(3, 32, 32)
        assert torch.equal(RandGaussianBlur(sigma=(sigma, sigma), prob=1.0)(white), white)
    d = RandGaussianBlurd(keys=("a", "b"), prob=1.0).set_random_state(0)({"a": noise, "b": noise.clone()})
    torch.testing.assert_close(d["a"], d["b"])


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------
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


def test_transforms_instantiate_from_bundle_config():
    config = {
        "keys": ["image"],
        "pre": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "medssl_monai.transforms.RandomResizedCropd",
                    "keys": "@keys",
                    "spatial_size": 16,
                },
                {"_target_": "medssl_monai.transforms.RandColorJitterd", "keys": "@keys", "prob": 1.0},
                {
                    "_target_": "medssl_monai.transforms.ContrastiveViewsd",
                    "keys": "@keys",
                    "transform": "dermatology",
                    "spatial_size": [48, 48],
                    "preset_overrides": {"strength": 0.3},
                },
            ],
        },
    }
    pre = ConfigParser(config).get_parsed_content("pre")
    out = pre({"image": torch.rand(3, 32, 32)})
    assert out["view_1"].shape == (3, 48, 48) and "image" not in out
    jitter = next(t for t in pre.transforms[-1].transform.transforms if isinstance(t, RandColorJitterd))
    assert jitter.inner.brightness == pytest.approx((0.76, 1.24))


# --------------------------------------------------------------------------------------------------
# ContrastiveViewsd
# --------------------------------------------------------------------------------------------------
def test_contrastive_views_simclr_differ_and_reproducible():
    photo = _natural_photo("chelsea.png")
    make = lambda: ContrastiveViewsd(keys="image", transform="natural")  # noqa: E731
    out_a = make().set_random_state(5)({"image": photo, "label": 1})
    out_b = make().set_random_state(5)({"image": photo, "label": 1})
    out_c = make().set_random_state(6)({"image": photo, "label": 1})
    assert out_a["view_1"].shape == out_a["view_2"].shape == (3, 64, 64)
    assert not torch.allclose(out_a["view_1"], out_a["view_2"])
    torch.testing.assert_close(out_a["view_1"], out_b["view_1"])
    torch.testing.assert_close(out_a["view_2"], out_b["view_2"])
    assert not torch.allclose(out_a["view_1"], out_c["view_1"])
    assert "image" not in out_a and out_a["label"] == 1
    # the per-worker seeding MONAI's DataLoader uses reaches the inner pipeline too
    t1, t2 = make(), make()
    set_rnd(t1, 123), set_rnd(t2, 123)
    torch.testing.assert_close(t1({"image": photo})["view_2"], t2({"image": photo})["view_2"])


def test_contrastive_views_leave_the_source_untouched():
    src = MetaTensor(torch.rand(3, 64, 64), meta={"filename_or_obj": "a.png", "original_channel_dim": -1})
    before = src.clone()
    views = ContrastiveViewsd(keys="image", transform="dermatology", keep_sources=True).set_random_state(0)
    for _ in range(4):
        out = views({"image": src})
    assert out["image"] is src and torch.equal(src.as_tensor(), before.as_tensor())
    assert src.applied_operations == [] and src.meta["original_channel_dim"] == -1


def test_contrastive_views_micle_uses_both_sources():
    dark, bright = np.full((80, 80, 3), 25, np.uint8), np.full((60, 90, 3), 230, np.uint8)
    pipeline = get_preset("natural", strength=0.5)  # brightness in [0.6, 1.4]: the ranges cannot meet
    views = ContrastiveViewsd(keys=("image_1", "image_2"), transform=pipeline, keep_sources=True)
    views.set_random_state(0)
    for _ in range(10):
        out = views({"image_1": dark, "image_2": bright, "lesion_id": "L1"})
        assert float(out["view_1"].max()) < 0.2 and float(out["view_2"].min()) > 0.5
        assert out["lesion_id"] == "L1" and "image_1" in out
    with pytest.raises(KeyError, match="image_2"):
        views({"image_1": dark})


def test_contrastive_views_accepts_list_pipeline():
    pipeline = [
        RandomResizedCropd(keys="image", spatial_size=8),
        RandFlipd(keys="image", prob=0.5, spatial_axis=1),
    ]
    out = ContrastiveViewsd(keys="image", transform=pipeline)({"image": torch.rand(3, 20, 20)})
    assert out["view_1"].shape == (3, 8, 8)


def test_throughput_smoke_batch_of_64():
    """A 64-image batch of 64x64 pairs runs (timing is measured separately, not asserted)."""
    views = Compose([ContrastiveViewsd(keys="image", transform="natural")]).set_random_state(0)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(64)]
    pairs = [views({"image": im}) for im in images]
    batch_1 = torch.stack([p["view_1"].as_tensor() for p in pairs])
    batch_2 = torch.stack([p["view_2"].as_tensor() for p in pairs])
    assert batch_1.shape == batch_2.shape == (64, 3, 64, 64)
    assert torch.isfinite(batch_1).all() and not torch.equal(batch_1, batch_2)
