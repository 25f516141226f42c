"""MICLe pairing: two different images of a group, uniform, fresh every epoch; singles paired with themselves."""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import DataLoader
from monai.transforms import Compose

from medssl_monai.data import (
    ContrastivePairDataset,
    LoadManifestImaged,
    MultiInstanceIndex,
    table_to_manifest,
)
from medssl_monai.losses import NTXentLoss
from medssl_monai.transforms import ContrastiveViewsd


def _toy_index() -> MultiInstanceIndex:
    rows = [("A", f"a{i}") for i in range(4)] + [("B", "b0"), ("B", "b1")] + [("C", "c0")]
    df = pd.DataFrame({"patient_id": [g for g, _ in rows], "path": [p for _, p in rows],
                       "sop_uid": [p for _, p in rows]})
    return MultiInstanceIndex(df)


def test_pairs_are_distinct_and_uniform() -> None:
    ds = ContrastivePairDataset(_toy_index(), seed=0)
    assert len(ds) == 3 and ds.pair_counts() == {"distinct": 2, "same_image": 1}
    counts: collections.Counter = collections.Counter()
    n = 6000
    for _ in range(n):
        item = ds[0]  # group A: 4 images -> 12 ordered pairs
        assert item["distinct"] and item["image_1"]["path"] != item["image_2"]["path"]
        assert item["group_id"] == "A"
        counts[(item["image_1"]["path"], item["image_2"]["path"])] += 1
    assert set(counts) == set(itertools.permutations([f"a{i}" for i in range(4)], 2))
    expected = n / 12
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 31.3  # 11 degrees of freedom, p = 0.001
    single = ds[2]
    assert not single["distinct"] and single["image_1"]["path"] == single["image_2"]["path"] == "c0"


def test_fresh_each_epoch_and_reproducible() -> None:
    a = ContrastivePairDataset(_toy_index(), seed=1)
    b = ContrastivePairDataset(_toy_index(), seed=1)
    epochs_a = [[(a[i]["image_1"]["path"], a[i]["image_2"]["path"]) for i in range(2)] for _ in range(10)]
    epochs_b = [[(b[i]["image_1"]["path"], b[i]["image_2"]["path"]) for i in range(2)] for _ in range(10)]
    assert epochs_a == epochs_b  # same seed, same pairs
    assert len({tuple(e) for e in epochs_a}) > 3  # but new pairs from epoch to epoch


def test_multi_only_and_simclr_modes() -> None:
    idx = _toy_index()
    multi = ContrastivePairDataset(idx, groups="multi")
    assert multi.group_ids == ["A", "B"] and len(multi) == 2
    simclr = ContrastivePairDataset(idx, pairing="simclr")
    assert len(simclr) == 7
    items = [simclr[i] for i in range(len(simclr))]
    assert all(it["image_1"]["path"] == it["image_2"]["path"] for it in items)
    assert sorted(it["image_1"]["path"] for it in items) == sorted(idx.manifest["path"])
    assert [it["group_index"] for it in items] == [0, 0, 0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="no multi-image groups"):
        ContrastivePairDataset(MultiInstanceIndex(idx.manifest[idx.manifest["patient_id"] == "C"]), groups="multi")


def test_micle_batches_on_real_dermoscopy(ham10000: Path) -> None:
    """HAM10000 `mini` lesions -> loaded pairs -> dermatology views -> batches with group ids -> masked loss."""
    m = table_to_manifest(ham10000 / "metadata.csv", group_col="lesion_id", label_col="dx", instance_col="image_id")
    idx = MultiInstanceIndex(m[m["mini"]])
    transform = Compose([
        LoadManifestImaged(keys=("image_1", "image_2")),
        ContrastiveViewsd(keys=("image_1", "image_2"), transform="dermatology", spatial_size=(32, 32)),
    ])
    ds = ContrastivePairDataset(idx, transform, groups="multi", seed=0)
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2)
    batch = next(iter(loader))
    assert batch["view_1"].shape == batch["view_2"].shape == (8, 3, 32, 32)
    assert batch["distinct"].all()
    assert 0.0 <= float(batch["view_1"].min()) and float(batch["view_1"].max()) <= 1.0
    # two workers must not augment alike: the first items of each worker's batch differ
    a, b = ds[0], ds[0]
    assert not torch.equal(a["view_1"], b["view_1"])
    loss = NTXentLoss(temperature=0.1)(batch["view_1"].flatten(1), batch["view_2"].flatten(1),
                                      group_ids=batch["group_index"])
    assert torch.isfinite(loss)


def test_workers_get_different_augmentation_streams(tmp_path: Path) -> None:
    """MONAI's worker seeding must reach the transform inside the dataset."""
    from PIL import Image

    paths = []
    for i in range(8):
        p = tmp_path / f"{i}.png"
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    df = pd.DataFrame({"patient_id": ["p"] * 8, "path": paths, "source": ["image"] * 8})
    idx = MultiInstanceIndex(df)
    transform = Compose([LoadManifestImaged(keys=("image_1", "image_2")),
                         ContrastiveViewsd(keys=("image_1", "image_2"), transform="natural", spatial_size=(16, 16))])
    # 4 identical single-group items: with per-worker seeding, worker 0 and worker 1 give different views
    ds = ContrastivePairDataset(idx, transform, pairing="simclr", seed=0)
    ds._images = [ds._images[0]] * 4
    out = list(DataLoader(ds, batch_size=1, num_workers=2, shuffle=False))
    views = [o["view_1"][0] for o in out]
    assert not torch.equal(views[0], views[1])
