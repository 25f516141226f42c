"""BatchViews (views made on the accelerator, per item draws) against independent references: a naive
bilinear sampler, torch's own flips/turns/resize, and the per-item CPU transforms of the same preset."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medssl_monai.transforms import BatchViews, RandColorJitter, RandGaussianBlur, batch_views_for
from medssl_monai.transforms.functional import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    rgb_to_grayscale,
)


def _images(n: int = 6, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def _naive_bilinear(img: np.ndarray, box: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Loop reference: output pixel centre -> source coordinate in the box, clamped to the image, bilinear."""
    c, height, width = img.shape
    top, left, bh, bw = (float(v) for v in box)
    oh, ow = out_hw
    out = np.zeros((c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            sy = min(max(top + (i + 0.5) * bh / oh - 0.5, 0.0), height - 1.0)
            sx = min(max(left + (j + 0.5) * bw / ow - 0.5, 0.0), width - 1.0)
            y0, x0 = math.floor(sy), math.floor(sx)
            y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            wy, wx = sy - y0, sx - x0
            out[:, i, j] = ((1 - wy) * (1 - wx) * img[:, y0, x0] + (1 - wy) * wx * img[:, y0, x1]
                            + wy * (1 - wx) * img[:, y1, x0] + wy * wx * img[:, y1, x1])
    return out


def test_crop_samples_each_items_box() -> None:
    x = _images()
    views = BatchViews((8, 10), crop_scale=(0.2, 0.9))
    views.set_random_state(seed=3)
    y = views(x)
    boxes = views.params["box"]
    assert len({tuple(b) for b in boxes}) > 1  # each item its own box
    for k in range(len(x)):
        top, left, h, w = boxes[k]
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 24
        assert 0.2 * 480 - 2 * (h + w) <= h * w <= 0.9 * 480 + 2 * (h + w)  # area in range, up to rounding
        assert 3 / 4 - 0.2 <= w / h <= 4 / 3 + 0.2
        np.testing.assert_allclose(y[k].numpy(), _naive_bilinear(x[k].numpy(), boxes[k], (8, 10)), atol=1e-5)


def test_whole_image_box_is_a_plain_resize() -> None:
    x = _images(h=24, w=24)
    views = BatchViews(16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    ref = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(views(x), ref, atol=1e-5, rtol=0)


def test_flips_and_quarter_turns_are_exact() -> None:
    x = _images(n=12, h=16, w=16)
    same = dict(spatial_size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    torch.testing.assert_close(BatchViews(**same)(x), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(BatchViews(**same, hflip_prob=1.0)(x), x.flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(BatchViews(**same, vflip_prob=1.0)(x), x.flip(-2), atol=1e-6, rtol=0)
    turns = BatchViews(**same, rot90_prob=1.0)
    turns.set_random_state(seed=0)
    y = turns(x)
    ks = turns.params["rot90"]
    assert set(ks) == {1, 2, 3}
    for k in range(len(x)):
        torch.testing.assert_close(y[k], torch.rot90(x[k], int(ks[k]), dims=(-2, -1)), atol=1e-6, rtol=0)


def test_colour_jitter_matches_the_per_item_functions() -> None:
    """Each item: the CPU transform's functions, in the item's own order, with the item's own factors."""
    x = _images(n=16, h=12, w=12)
    views = BatchViews(12, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_prob=0.7,
                       brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.6, 1.4), hue=(-0.1, 0.1))
    views.set_random_state(seed=5)
    y = views(x)
    p = views.params
    assert 0 < p["jitter"].sum() < len(x) and len({tuple(o) for o in p["order"]}) > 1
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for k in range(len(x)):
        ref = x[k].clone()
        if p["jitter"][k]:
            for i in p["order"][k]:
                ref = ops[i](ref, float(p["factors"][k, i]))
        torch.testing.assert_close(y[k], ref, atol=2e-5, rtol=0)


def test_grayscale_and_blur_match_the_per_item_transforms() -> None:
    x = _images(n=8, h=30, w=30)
    gray = BatchViews(30, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), grayscale_prob=1.0)(x)
    torch.testing.assert_close(gray, rgb_to_grayscale(x).expand(-1, 3, -1, -1), atol=1e-5, rtol=0)
    views = BatchViews(30, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), blur_prob=0.5, blur_sigma=(0.1, 2.0))
    views.set_random_state(seed=1)
    y = views(x)
    blurred = views.params["blur"]
    assert 0 < blurred.sum() < len(x)
    for k in range(len(x)):
        if not blurred[k]:
            torch.testing.assert_close(y[k], x[k], atol=1e-5, rtol=0)
            continue
        one = RandGaussianBlur(sigma=(0.1, 2.0), prob=1.0)
        one.randomize()  # prob 1: it will blur; then the item's sigma
        one.current_sigma = float(views.params["sigma"][k])
        torch.testing.assert_close(y[k], one(x[k], randomize=False), atol=1e-5, rtol=0)


def test_seeded_and_independent_per_item() -> None:
    x = _images(n=1, h=40, w=40).expand(8, -1, -1, -1).contiguous()  # 8 copies of one image
    a, b = batch_views_for("natural", 16, views_on="device", seed=7), batch_views_for("natural", 16,
                                                                                      views_on="device", seed=7)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)  # same seed, same views
    assert all(not torch.allclose(ya[0], ya[k]) for k in range(1, 8))  # copies of one image, different views
    assert not torch.allclose(ya, a(x))  # the stream moves on


def test_from_preset_follows_the_preset_and_its_overrides() -> None:
    d = BatchViews.from_preset("dermatology", 32, {"crop_scale": [0.5, 1.0], "strength": 1.0})
    assert d.crop_scale == (0.5, 1.0) and d.rot90_prob == 0.75 and d.vflip_prob == 0.5
    assert d.ranges[0] == pytest.approx((0.2, 1.8)) and d.ranges[3] == pytest.approx((-0.2, 0.2))
    n = BatchViews.from_preset("natural", 32)
    assert n.grayscale_prob == 0.2 and n.rot90_prob == 0.0 and n.blur_prob == 0.5
    with pytest.raises(ValueError, match="Rand2DElasticd"):
        BatchViews.from_preset("chest_xray", 32)
    assert batch_views_for("natural", 32, views_on="host") is None
    with pytest.raises(ValueError, match="views_on"):
        batch_views_for("natural", 32, views_on="gpu")


def test_views_on_cpu_is_the_former_name_of_host() -> None:
    """``views_on: cpu`` (before the location words were unified with ``cache: none|host|device``) still
    means ``host``, with a warning, wherever it is read: the transforms, the bundle dataset, the override check."""
    import warnings

    import pandas as pd

    from medssl_monai.bundle.data import contrastive_dataset
    from medssl_monai.bundle.overrides import check_override_values
    from medssl_monai.transforms import views_location

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert views_location("host") == "host" and views_location("device") == "device"
        assert check_override_values({"views_on": "host"}) == []
    with pytest.warns(FutureWarning, match="'cpu' is the former name of 'host'"):
        assert batch_views_for("natural", 32, views_on="cpu") is None
    with pytest.warns(FutureWarning, match="former name"):
        assert check_override_values({"views_on": "cpu"}, "pretrain") == []
    assert check_override_values({"views_on": "gpu"}, "pretrain") == [
        "pretrain.views_on: expected one of ['host', 'device'], got 'gpu'"]
    rows = pd.DataFrame({"path": ["a.png", "b.png"], "patient_id": ["p", "p"], "study_uid": ["s", "s"]})
    with pytest.warns(FutureWarning, match="former name"):
        old = contrastive_dataset(rows, pairing="simclr", views_on="cpu")
    new = contrastive_dataset(rows, pairing="simclr", views_on="host")
    assert len(old) == len(new) == 2  # the per-item views dataset, as for host
    assert [type(t).__name__ for t in old.dataset.transform.transforms] == \
        [type(t).__name__ for t in new.dataset.transform.transforms]


def test_micle_bundle_with_views_on_the_device(tmp_path: Path) -> None:
    """The bundle key: the loader only resizes, the trainer makes the views (here on the CPU device)."""
    from bundle.test_bundles import copy_bundle, monai_bundle
    from conftest import require_data

    from medssl_monai.data import table_to_manifest, write_manifest

    ham = require_data("ham10000")
    m = table_to_manifest(ham / "metadata.csv", group_col="lesion_id", label_col="dx", instance_col="image_id")
    write_manifest(m[m["mini"]], tmp_path / "mini.csv")
    root = copy_bundle("micle_medical", tmp_path)
    r = monai_bundle("run", "--bundle_root", str(root), "--config_file", str(root / "configs/train.json"),
                 "--manifest", str(tmp_path / "mini.csv"), "--max_epochs", "1", "--batch_size", "16",
                     "--image_size", "32", "--backbone", "cbr_tiny", "--limit", "64", "--knn_interval", "0",
                     "--log_interval", "1", "--preset", "dermatology", "--views_on", "device",
                     "--source_size", "[45, 60]")
    assert (root / "models/model.pt").is_file()
    log = (root / "output/train.log").read_text() + r.stdout + r.stderr
    assert "views made on the training device" in log
    losses = [float(v) for v in re.findall(r"train_loss: ([0-9.naninf]+)", log)]
    assert losses and all(math.isfinite(v) for v in losses)


def test_input_types_channels_and_bad_parameters() -> None:
    x = _images(n=4, h=20, w=20)
    u8 = (x * 255).round().to(torch.uint8)
    a = BatchViews(12, crop_scale=(0.5, 1.0), jitter_prob=1.0, brightness=(0.5, 1.5))
    a.set_random_state(seed=2)
    ya = a(u8.float() / 255.0)
    a.set_random_state(seed=2)
    torch.testing.assert_close(a(u8), ya)  # uint8 is scaled to [0, 1], not clamped at 1
    a.set_random_state(seed=2)
    yb = a(x.to(torch.bfloat16))  # computed in float32: no NaN, no half-pixel grid error
    assert yb.dtype == torch.float32 and torch.isfinite(yb).all()
    gray = BatchViews(12, jitter_prob=1.0, brightness=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.1, 0.1),
                      grayscale_prob=1.0, blur_prob=1.0)(x[:, :1])
    assert gray.shape == (4, 1, 12, 12) and gray.min() >= 0 and gray.max() <= 1
    with pytest.raises(ValueError, match="1 or 3 channels"):
        BatchViews(12)(torch.rand(2, 4, 20, 20))
    with pytest.raises(ValueError, match=r"hflip_prob=1\.5"):
        BatchViews(12, hflip_prob=1.5)
    with pytest.raises(ValueError, match="blur_kernel_size"):
        BatchViews(12, blur_kernel_size=4)


def test_a_preset_in_another_order_is_refused(tmp_path: Path) -> None:
    """BatchViews runs its steps in one order; a custom preset that blurs before cropping is not the same."""
    import json

    from medssl_monai.transforms import load_preset_config

    cfg = load_preset_config("natural")
    cfg["transforms"] = [cfg["transforms"][0], cfg["transforms"][-1], *cfg["transforms"][1:-1]]
    (tmp_path / "blur_first.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="order"):
        BatchViews.from_preset(str(tmp_path / "blur_first.json"), 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (host-device syncs are a GPU matter)")
def test_no_host_device_sync_on_cuda() -> None:
    views = batch_views_for("dermatology", 64, views_on="device", seed=0).cuda()
    x = torch.rand(32, 3, 96, 128, device="cuda")
    views(x)  # warm-up (kernels loaded, pinned buffers)
    torch.cuda.set_sync_debug_mode("error")
    try:
        views(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_crop_boxes_follow_the_per_item_crops_distribution() -> None:
    """The batch draws boxes with its own stream, so compare distributions with the per-item crop's."""
    from medssl_monai.transforms import RandomResizedCrop

    n, height, width = 4000, 150, 200
    views = BatchViews(64, crop_scale=(0.08, 1.0))
    views.set_random_state(seed=0)
    ours = views.draw_boxes(n, height, width).astype(float)
    crop = RandomResizedCrop(64, scale=(0.08, 1.0))
    crop.set_random_state(seed=1)
    ref = []
    for _ in range(n):
        crop.randomize((height, width))
        ref.append(crop.box)
    ref = np.asarray(ref, dtype=float)
    for boxes in (ours, ref):
        assert (boxes[:, 0] + boxes[:, 2] <= height).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)  # noqa: E731
    log_aspect = lambda b: np.log(b[:, 3] / b[:, 2])  # noqa: E731
    centre_y = lambda b: (b[:, 0] + b[:, 2] / 2) / height  # noqa: E731
    for stat in (area, log_aspect, centre_y):
        a, r = stat(ours), stat(ref)
        assert abs(a.mean() - r.mean()) < 4 * np.sqrt(a.var() / n + r.var() / n)  # same mean, 4 standard errors
        assert abs(np.quantile(a, 0.9) - np.quantile(r, 0.9)) < 0.05 * (r.max() - r.min())


def test_per_item_and_batch_paths_agree_for_the_same_parameters() -> None:
    """Both paths call the same functions: the per-item transforms, given the parameters an item of the batch
    was given (jitter order and factors, blur sigma), make the same image as the batch path."""
    x = _images(n=6, h=24, w=24, seed=4)
    same = dict(spatial_size=24, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))  # the crop is the identity
    ranges = dict(brightness=(0.6, 1.4), contrast=(0.6, 1.4), saturation=(0.6, 1.4), hue=(-0.1, 0.1))
    views = BatchViews(**same, jitter_prob=1.0, **ranges, blur_prob=1.0, blur_sigma=(0.1, 2.0))
    views.randomize((6, 24, 24))
    # fixed parameters, set by hand: every item its own order, factors and sigma
    views.params["order"] = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [0, 2, 1, 3], [3, 0, 2, 1]])
    views.params["factors"] = np.array([[0.7, 1.3, 0.6, 0.05], [1.2, 0.8, 1.4, -0.08], [1.0, 1.1, 0.9, 0.1],
                                        [0.65, 1.35, 1.2, -0.1], [1.39, 0.61, 0.7, 0.0], [0.9, 1.2, 1.3, 0.07]])
    views.params["sigma"] = np.array([0.1, 0.5, 1.0, 1.5, 2.0, 0.8])
    y = views(x, randomize=False)
    jitter = RandColorJitter(**ranges, prob=1.0)
    blur = RandGaussianBlur(sigma=(0.1, 2.0), prob=1.0)
    jitter.randomize(), blur.randomize()  # prob 1: both will apply; the draws are then replaced
    for k in range(len(x)):
        jitter.order = [int(i) for i in views.params["order"][k]]
        jitter.factors = [float(f) for f in views.params["factors"][k]]
        blur.current_sigma = float(views.params["sigma"][k])
        ref = blur(jitter(x[k], randomize=False), randomize=False)
        torch.testing.assert_close(y[k], ref, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="randomize"):
        views(x[:2], randomize=False)  # draws for 6 items do not fit a batch of 2


def test_override_check_knows_the_same_view_locations() -> None:
    """bundle/overrides.py stays free of torch, so it spells views_on's choices itself: they must agree."""
    from medssl_monai.bundle.overrides import OVERRIDE_TYPES
    from medssl_monai.transforms import VIEWS_ON

    assert tuple(OVERRIDE_TYPES["views_on"].choices) == VIEWS_ON
