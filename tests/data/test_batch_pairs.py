"""Pairs drawn per batch from index arrays: MICLe/SimCLR semantics, uniformity, seeding, group ids, shards."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medssl_monai.data import (
    CachedPairDataset,
    ContrastivePairDataset,
    MultiInstanceIndex,
    PairBatchSampler,
    PairIndex,
    build_image_cache,
    cached_pair_loader,
)
from medssl_monai.losses import NTXentLoss

# chi-square critical values at p = 0.001 (tables): the tests are seeded, so this is a 1-in-1000 design
CHI2_CRIT_001 = {5: 20.515, 11: 31.264}


def planted() -> pd.DataFrame:
    """Patient A: 4 images, B: 3, C, D, E: 1 each (rows interleaved, as a real manifest may be)."""
    patients = ["A", "B", "C", "A", "B", "D", "A", "B", "E", "A"]
    return pd.DataFrame({"path": [f"/x/{i}.png" for i in range(len(patients))], "patient_id": patients,
                         "sop_uid": [f"u{i}" for i in range(len(patients))]})


def chi_square(counts: Counter, cells: list) -> float:
    n = sum(counts[c] for c in cells)
    expected = n / len(cells)
    return sum((counts[c] - expected) ** 2 / expected for c in cells)


def test_micle_draws_two_different_images_uniformly() -> None:
    df = planted()
    pairs = PairIndex(MultiInstanceIndex(df), "micle", seed=7)
    assert len(pairs) == 5  # one item per patient
    rows_of = {p: list(np.flatnonzero(df["patient_id"] == p)) for p in "ABCDE"}
    counts: Counter = Counter()
    for _ in range(3000):
        a, b, g = pairs.epoch()
        assert sorted(g.tolist()) == [0, 1, 2, 3, 4]  # every group once per epoch
        for x, y in zip(a, b):
            patient = df["patient_id"][x]
            assert df["patient_id"][y] == patient  # both from one group
            if len(rows_of[patient]) > 1:
                assert x != y  # two different images
            else:
                assert x == y  # one image, twice
            counts[(patient, int(x), int(y))] += 1
    for p, df_ in (("A", 11), ("B", 5)):
        cells = [(p, x, y) for x in rows_of[p] for y in rows_of[p] if x != y]
        stat = chi_square(counts, cells)
        assert stat < CHI2_CRIT_001[df_], (p, stat)
    # and the test has power: a sampler that only ever drew the first two images would fail it
    skewed = Counter({("A", rows_of["A"][0], rows_of["A"][1]): 3000})
    assert chi_square(skewed, [("A", x, y) for x in rows_of["A"] for y in rows_of["A"] if x != y]) > 1000


def test_pairs_fresh_every_epoch_same_seed_same_pairs() -> None:
    idx = MultiInstanceIndex(planted())
    a = PairIndex(idx, "micle", seed=3)
    b = PairIndex(idx, "micle", seed=3)
    e1, e2 = a.epoch(), a.epoch()
    f1, f2 = b.epoch(), b.epoch()
    for x, y in zip(e1 + e2, f1 + f2):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(e1, e2))  # a new draw each epoch
    a.set_random_state(seed=3)
    for x, y in zip(a.epoch(), f1):
        np.testing.assert_array_equal(x, y)
    c = PairIndex(idx, "micle", seed=4).epoch()
    assert any(not np.array_equal(x, y) for x, y in zip(c, f1))


def test_simclr_and_multi_groups_match_the_dataset() -> None:
    df = planted()
    idx = MultiInstanceIndex(df)
    simclr = PairIndex(idx, "simclr", seed=0)
    ds = ContrastivePairDataset(idx, pairing="simclr")
    assert len(simclr) == len(ds) == len(df)
    a, b, g = simclr.epoch()
    np.testing.assert_array_equal(a, b)  # one image twice
    assert sorted(a.tolist()) == list(range(len(df)))  # every image once per epoch
    # the group ids are the dataset's: the position of the row's group in MultiInstanceIndex.group_ids
    code = {ds.pair(i)["image_1"]["sop_uid"]: ds.pair(i)["group_index"] for i in range(len(ds))}
    assert all(code[df["sop_uid"][r]] == gi for r, gi in zip(a, g))
    multi = PairIndex(idx, "micle", groups="multi", seed=0)
    ds_multi = ContrastivePairDataset(idx, pairing="micle", groups="multi")
    assert len(multi) == len(ds_multi) == 2
    assert sorted(multi.epoch()[2].tolist()) == sorted(ds_multi.pair(i)["group_index"] for i in range(2))
    with pytest.raises(ValueError, match="no multi-image groups"):
        PairIndex(MultiInstanceIndex(df[df["patient_id"].isin(["C", "D"])]), groups="multi")


def _png_rows(tmp_path: Path, patients: list[str]) -> pd.DataFrame:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i, p in enumerate(patients):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
        rows.append({"path": str(path), "patient_id": p, "sop_uid": f"u{i}"})
    return pd.DataFrame(rows)


def test_loader_gathers_cached_images_and_group_ids_make_the_mask(tmp_path: Path) -> None:
    df = _png_rows(tmp_path, ["A", "B", "A", "C", "B", "A", "D", "E"])
    cache = build_image_cache(df, (8, 8), progress=False)
    idx = MultiInstanceIndex(df)
    pairs = CachedPairDataset(cache, idx, pairing="simclr")
    loader = cached_pair_loader(pairs, PairBatchSampler(pairs, batch_size=8, seed=1))
    assert isinstance(loader, torch.utils.data.DataLoader) and len(pairs) == 8 and len(loader) == 1
    batch = next(iter(loader))
    assert batch["view_1"].dtype == torch.uint8 and batch["view_1"].shape == (8, 3, 8, 8)
    # each view is the cached image of some row, and its group id is that row's patient
    rows = [int(np.flatnonzero((cache.images == v).flatten(1).all(1))[0]) for v in batch["view_1"]]
    patients = [df["patient_id"][r] for r in rows]
    assert [idx.group_ids[int(gi)] for gi in batch["group_index"]] == patients
    # the patient-aware loss masks the same pairs with the integer ids as with the patient ids themselves
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    loss = NTXentLoss(temperature=0.5)
    with_ids = loss(z1, z2, group_ids=batch["group_index"])
    assert torch.allclose(with_ids, loss(z1, z2, group_ids=patients))
    assert not torch.allclose(with_ids, loss(z1, z2))  # A and B appear more than once: the mask matters


def test_ranks_draw_disjoint_shards_with_equal_steps(tmp_path: Path) -> None:
    df = _png_rows(tmp_path, [f"p{i // 2}" for i in range(12)])  # 6 patients x 2 images
    cache = build_image_cache(df, (8, 8), progress=False)
    idx = MultiInstanceIndex(df)
    seen = []
    pairs = CachedPairDataset(cache, idx, pairing="micle", mode="device", device="cpu")
    for rank in (0, 1):
        loader = cached_pair_loader(pairs, PairBatchSampler(pairs, batch_size=3, seed=0, rank=rank, world_size=2))
        assert len(loader) == 1 and len(loader.dataset.images) == 6  # only this rank's 3 patients' images
        seen.append({int(g) for b in loader for g in b["group_index"]})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(6))


def test_view_grid_shows_uint8_cache_batches_in_unit_range() -> None:
    from medssl_monai.handlers.view_pairs import view_pairs_grid

    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.allclose(view_pairs_grid(x, x), view_pairs_grid(x.float() / 255.0, x.float() / 255.0))


def test_sampler_epochs_are_reseeded_from_seed_and_epoch(tmp_path: Path) -> None:
    """``set_epoch`` (what ``ReseedEachEpoch`` calls) draws an epoch from ``(seed, epoch)`` only: the same
    epoch twice gives the same batches whatever ran before (a resumed run), a new epoch new pairs."""
    df = _png_rows(tmp_path, [f"p{i // 2}" for i in range(12)])
    pairs = CachedPairDataset(build_image_cache(df, (8, 8), progress=False), MultiInstanceIndex(df))
    sampler = PairBatchSampler(pairs, batch_size=3, seed=5)
    loader = cached_pair_loader(pairs, sampler)

    def epoch(e: int) -> list[torch.Tensor]:
        sampler.set_epoch(e)
        return [torch.cat([b["view_1"].flatten(), b["view_2"].flatten(), b["group_index"]]) for b in loader]

    first = epoch(2)
    epoch(3)
    assert all(torch.equal(x, y) for x, y in zip(first, epoch(2)))
    assert not all(torch.equal(x, y) for x, y in zip(first, epoch(3)))
    state = torch.get_rng_state()
    epoch(4)
    assert torch.equal(state, torch.get_rng_state())  # iterating never draws from torch's global generator
