"""Dictionary view transforms (medssl_monai.transforms.dictionary): one draw for all keys, bundle-config
instantiation, and the contrastive pair (``ContrastiveViewsd``) for SimCLR and MICLe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.data.utils import set_rnd
from monai.transforms import Compose, RandFlipd
from PIL import Image

from medssl_monai.transforms import (
    ContrastiveViewsd,
    RandColorJitter,
    RandColorJitterd,
    RandomResizedCropd,
    get_preset,
)


def _natural_photo(name: str) -> np.ndarray:
    """A real photo from the shared data; skip (or fail under CI=true) when the folder is absent."""
    from conftest import require_data

    return np.asarray(Image.open(require_data("natural", name)))


def _rand_rgb(h: int = 32, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((3, h, w), dtype=np.float32))


def test_jitter_prob_zero_is_identity_and_dict_shares_factors():
    img = MetaTensor(_rand_rgb())
    out = RandColorJitter(prob=0.0)(img)
    assert isinstance(out, MetaTensor)
    torch.testing.assert_close(out, img)
    d = RandColorJitterd(keys=("a", "b"), prob=1.0).set_random_state(3)({"a": img, "b": img.clone()})
    assert not torch.allclose(d["a"], img)
    torch.testing.assert_close(d["a"], d["b"])


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

