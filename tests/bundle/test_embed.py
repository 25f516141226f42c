"""The per-image embedding cache of MONAI Label's ``typicality`` strategy: features equal to a plain forward
pass, only new images embedded on a second call, recomputed for another checkpoint, owner-only file."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl_monai.bundle.embed import cached_features
from medssl_monai.data import LoadManifestImaged
from medssl_monai.networks import get_backbone
from medssl_monai.sample_data import synthetic_image, write_dicom
from medssl_monai.transforms import EnsureFloatImaged

SPEC = {"backbone": "cbr_tiny", "in_channels": 1, "image_size": 32}


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, str]:
    out = {}
    for k in range(7):
        uid = f"1.2.826.0.1.3680043.10.1431.91.{k}"
        out[uid] = str(write_dicom(tmp_path / "img" / f"{k}.dcm", synthetic_image(k % 3, patient_seed=k,
                                   image_seed=k, size=40), patient_id=f"E{k}", study_uid=uid + ".1",
                                   series_uid=uid, sop_uid=uid + ".3"))
    return out


def plain_features(net: torch.nn.Module, path: str) -> np.ndarray:
    """Reference: the fine-tune bundle's inference preprocessing (load, float, area resize), one forward pass."""
    from monai.transforms import Resized

    d = LoadManifestImaged("image", channels=1)({"image": path})
    d = EnsureFloatImaged("image", num_channels=1)(d)
    d = Resized("image", spatial_size=(32, 32), mode="area")(d)
    with torch.no_grad():
        return net(torch.as_tensor(d["image"]).float()[None])[0].numpy()


def test_cached_features_embed_only_new_images(images: dict[str, str], tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = get_backbone("cbr_tiny", in_channels=1).eval()
    ckpt = tmp_path / "model.pt"
    torch.save({f"backbone.{k}": v for k, v in net.state_dict().items()}, ckpt)  # a classifier-style checkpoint
    cache = tmp_path / "cache" / "embeddings.npz"
    located: list[str] = []

    def locate(i: str) -> str:
        located.append(i)
        return images[i]

    ids = sorted(images)
    got, feats, fresh = cached_features(ids[:4], locate, ckpt, cache, **SPEC)
    assert got == ids[:4] and fresh == 4 and located == ids[:4]
    ref = np.stack([plain_features(net, images[i]) for i in ids])
    np.testing.assert_allclose(feats, ref[:4], atol=1e-5)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600

    located.clear()
    got, feats, fresh = cached_features(ids[::-1], locate, ckpt, cache, **SPEC)  # 3 new images, any order
    assert got == ids[::-1] and fresh == 3 and sorted(located) == ids[4:]
    np.testing.assert_allclose(feats, ref[::-1], atol=1e-5)
    located.clear()
    assert cached_features(ids, locate, ckpt, cache, **SPEC)[2] == 0 and located == []  # all cached

    # new weights (same file name, as after MONAI Label's /train): computed again
    torch.save({k: v + 0.05 for k, v in torch.load(ckpt, weights_only=True).items()}, ckpt)
    assert cached_features(ids, locate, ckpt, cache, **SPEC)[2] == len(ids)
    # an unreadable image is left out and tried again next time
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not dicom")
    images["9.9"] = str(bad)
    got, feats, fresh = cached_features([*ids, "9.9"], locate, ckpt, cache, **SPEC)
    assert got == ids and fresh == 1 and len(feats) == len(ids)
    assert cached_features([*ids, "9.9"], locate, ckpt, cache, **SPEC)[2] == 1
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        cached_features(ids, locate, tmp_path / "none.pt", cache, **SPEC)
