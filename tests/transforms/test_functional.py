"""medssl_monai.transforms.functional: the maths both view paths share, against independent references
(``colorsys`` for RGB<->HSV and hue, explicit per-image calls and numpy sums for the batched parameters)."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
from references import numpy_blur

from medssl_monai.transforms import hsv_to_rgb, rgb_to_hsv
from medssl_monai.transforms.functional import (
    COLOR_ADJUSTMENTS,
    adjust_hue,
    adjust_saturation,
    blur_kernel_side,
    crop_box_size,
    gaussian_blur,
    gaussian_kernel1d,
    separable_filter,
)


def _rand_rgb(h: int = 32, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((3, h, w), dtype=np.float32))


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



# --------------------------------------------------------------------------------------------------
# one parameter per item: what the batch path passes, checked against one call per image
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [3, 1])
def test_colour_adjustments_take_one_factor_per_item(channels):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, channels, 9, 11, generator=g)
    ranges = ((0.4, 1.6), (0.4, 1.6), (0.4, 1.6), (-0.3, 0.3))
    for i, (lo, hi) in enumerate(ranges):
        f = lo + (hi - lo) * torch.rand(5, generator=g)
        batched = COLOR_ADJUSTMENTS[i](x.clone(), f.view(-1, 1, 1, 1))
        for k in range(5):  # contrast blends with each image's own mean, not the batch's
            torch.testing.assert_close(batched[k], COLOR_ADJUSTMENTS[i](x[k].clone(), float(f[k])), atol=1e-6, rtol=0)
    # an independent reference for the one op that mixes pixels: contrast against a numpy mean per image
    f = np.array([0.5, 1.5, 0.8, 1.2, 1.0])
    ref = x.double().numpy()
    luma = ref if channels == 1 else np.tensordot([0.299, 0.587, 0.114], ref, axes=([0], [1]))[:, None]
    ref = np.clip(f[:, None, None, None] * ref + (1 - f[:, None, None, None]) * luma.mean(axis=(1, 2, 3), keepdims=True), 0, 1)
    out = COLOR_ADJUSTMENTS[1](x, torch.tensor(f, dtype=torch.float32).view(-1, 1, 1, 1))
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)



def test_gaussian_blur_takes_one_sigma_per_item():
    x = torch.rand(4, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.3, 0.9, 1.5, 2.0])
    k = blur_kernel_side(40)
    assert k == 5  # 2 * (int(0.1 * 40) // 2) + 1
    batched = gaussian_blur(x, sigmas)
    for i in range(4):
        np.testing.assert_allclose(batched[i].numpy(), numpy_blur(x[i].double().numpy(), float(sigmas[i]), k), atol=1e-5)
        torch.testing.assert_close(batched[i], gaussian_blur(x[i], float(sigmas[i])), atol=1e-6, rtol=0)
    # a fixed kernel side and a shared sigma for the batch
    torch.testing.assert_close(gaussian_blur(x, 1.2, kernel_size=9)[2], gaussian_blur(x[2], 1.2, kernel_size=9))
    np.testing.assert_allclose(gaussian_blur(x, 1.2, kernel_size=9)[2].numpy(), numpy_blur(x[2].double().numpy(), 1.2, 9),
                               atol=1e-5)
    assert blur_kernel_side(224) == 23 and blur_kernel_side(64) == 7 and blur_kernel_side(2, kernel_size=9) == 3
    per_item = gaussian_kernel1d(sigmas, 5)
    assert per_item.shape == (4, 5)
    torch.testing.assert_close(per_item[1], gaussian_kernel1d(0.9, 5))
    with pytest.raises(ValueError, match="per-item taps"):
        separable_filter(x[0], per_item, per_item)  # per-item kernels need the batch they belong to


def test_crop_box_size_is_torchvisions_formula_for_numbers_and_arrays():
    rng = np.random.default_rng(0)
    area = 150 * 200
    fraction, log_aspect = rng.uniform(0.08, 1.0, 500), rng.uniform(math.log(3 / 4), math.log(4 / 3), 500)
    h, w = crop_box_size(area, fraction, log_aspect)
    ref_w = [round(math.sqrt(area * f * math.exp(a))) for f, a in zip(fraction, log_aspect)]
    ref_h = [round(math.sqrt(area * f / math.exp(a))) for f, a in zip(fraction, log_aspect)]
    assert w.tolist() == ref_w and h.tolist() == ref_h
    one = crop_box_size(area, float(fraction[7]), float(log_aspect[7]))
    assert (int(one[0]), int(one[1])) == (ref_h[7], ref_w[7])
