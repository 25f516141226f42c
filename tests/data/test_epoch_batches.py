"""Training batches from (seed, epoch): every item once per epoch, a last batch of one merged (never a batch
BatchNorm cannot train on), the same batches and augmentations however the process got there."""

from __future__ import annotations

import pytest
import torch
from monai.data import Dataset
from monai.transforms import Compose, RandFlipd, RandGaussianNoised

from medssl_monai.data.bad_images import BadImageLog, SkipUnreadable
from medssl_monai.data.epoch_batches import EpochBatchSampler, SeededItems, random_parts


@pytest.mark.parametrize("n,batch", [(9, 4), (17, 16), (33, 8), (8, 4), (10, 4), (5, 16)])
def test_every_item_once_and_no_batch_of_one(n: int, batch: int) -> None:
    sampler = EpochBatchSampler(n, batch, seed=3)
    sampler.set_epoch(2)
    batches = list(sampler)
    sizes = [len(b) for b in batches]
    assert sorted(i for b in batches for i, _ in b) == list(range(n))
    assert min(sizes) >= 2 and len(batches) == len(sampler)
    rest = n % batch
    if rest == 1 and n > batch:  # merged into the batch before
        assert sizes[-1] == batch + 1 and all(s == batch for s in sizes[:-1])
    else:
        assert all(s == batch for s in sizes[: n // batch])


@pytest.mark.parametrize("n,batch", [(9, 4), (17, 16), (33, 8)])
def test_drop_last_drops_the_short_batch(n: int, batch: int) -> None:
    sampler = EpochBatchSampler(n, batch, drop_last=True, seed=0)
    assert [len(b) for b in sampler] == [batch] * (n // batch) == [batch] * len(sampler)


def test_an_epoch_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochBatchSampler(20, 4, seed=7), EpochBatchSampler(20, 4, seed=7)
    for epoch in (1, 2, 3):  # a walks through every epoch, b jumps straight to the last (a resume)
        a.set_epoch(epoch)
        first = list(a)
    b.set_epoch(3)
    torch.manual_seed(123)  # the global generator plays no part
    assert list(b) == first
    a.set_epoch(2)
    assert list(a) != first


def test_item_seeds_reach_random_transforms_inside_wrappers() -> None:
    """MONAI's set_rnd / Compose stop at a wrapper that is not Randomizable: random_parts looks inside."""
    inner = Compose([RandFlipd(keys="x", prob=0.5, spatial_axis=0), RandGaussianNoised(keys="x", prob=1.0)])
    transform = SkipUnreadable(inner, BadImageLog("train", 1))
    assert random_parts(transform) == list(inner.transforms)
    ds = SeededItems(Dataset([{"x": torch.arange(16.0).reshape(1, 4, 4)}], transform))
    same = [ds[(0, 11)]["x"] for _ in range(3)]
    assert all(torch.equal(same[0], t) for t in same[1:])
    assert not torch.equal(same[0], ds[(0, 12)]["x"])


def test_training_loaders_refuse_sizes_with_no_usable_batch() -> None:
    from medssl_monai.bundle import make_loader

    with pytest.raises(ValueError, match="fewer than batch_size=4 with drop_last"):
        make_loader(Dataset([{"x": 0}] * 3), 4, drop_last=True, seed=0)
    with pytest.raises(ValueError, match="1 training item"):
        make_loader(Dataset([{"x": 0}]), 4, seed=0)
    loader = make_loader(Dataset([{"x": torch.tensor(i)} for i in range(9)]), 4, seed=0)
    loader.batch_sampler.set_epoch(1)
    assert [len(b["x"]) for b in loader] == [4, 5]


def test_without_set_epoch_every_pass_is_a_new_epoch() -> None:
    """A config whose handlers were replaced (no ReseedEachEpoch) must not repeat one epoch forever."""
    sampler = EpochBatchSampler(12, 4, seed=1)
    passes = [list(sampler) for _ in range(3)]
    assert passes[0] != passes[1] != passes[2] and sampler.epoch == 3
    sampler.set_epoch(2)
    assert list(sampler) == passes[1]


def test_reseed_handler_sets_the_epoch_or_falls_back_to_the_dataset() -> None:
    from types import SimpleNamespace

    from medssl_monai.bundle import make_loader
    from medssl_monai.handlers import ReseedEachEpoch

    loader = make_loader(Dataset([{"x": torch.tensor(i)} for i in range(8)]), 4, seed=5)
    handler = ReseedEachEpoch(loader=loader)
    handler(SimpleNamespace(state=SimpleNamespace(epoch=7)))
    assert loader.batch_sampler.epoch == 7

    seeds = []

    class Seedable(Dataset):
        def set_random_state(self, seed=None, state=None):
            seeds.append(seed)

    plain = torch.utils.data.DataLoader(Seedable([1, 2]), batch_size=2)  # e.g. a DDP loader
    ReseedEachEpoch(loader=plain, seed=3)(SimpleNamespace(state=SimpleNamespace(epoch=2)))
    assert seeds == [3 + 1000003 * 2]


def test_ranks_take_disjoint_shards_of_the_single_process_epoch() -> None:
    """``rank``/``world_size`` (the distributed config's override): every rank the same number of batches, the
    shards disjoint, and each item with the seed it has in one process (the same augmentation)."""
    single = EpochBatchSampler(11, 2, shuffle=True, drop_last=True, seed=3)
    ranks = [EpochBatchSampler(11, 2, shuffle=True, drop_last=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (1, 2):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        whole = dict(pair for batch in single for pair in batch)
        shards = [[pair for batch in r for pair in batch] for r in ranks]
        assert [len(r) for r in ranks] == [2, 2] and all(len(s) == 4 for s in shards)  # 11 // 2 = 5: 2 batches of 2
        assert not {i for i, _ in shards[0]} & {i for i, _ in shards[1]}
        assert all(whole.get(i, seed) == seed for s in shards for i, seed in s)
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(11, 2, rank=2, world_size=2)


@pytest.mark.parametrize("n,batch,min_batches", [(70, 64, 20), (9, 4, 7), (33, 8, 3), (5, 16, 1)])
def test_min_batches_makes_whole_reshuffled_passes(n: int, batch: int, min_batches: int) -> None:
    """A small budget's epoch: enough whole passes for min_batches, each item once per pass, each pass its own
    order and item seeds; the first pass is exactly the epoch without min_batches."""
    plain, longer = EpochBatchSampler(n, batch, seed=5), EpochBatchSampler(n, batch, seed=5, min_batches=min_batches)
    plain.set_epoch(3)
    longer.set_epoch(3)
    one, many = list(plain), list(longer)
    passes = -(-min_batches // len(one))  # naive: ceil(min_batches / batches per pass)
    assert len(many) == len(longer) == passes * len(one) >= min_batches
    assert many[: len(one)] == one
    for k in range(passes):
        part = many[k * len(one):(k + 1) * len(one)]
        assert sorted(i for b in part for i, _ in b) == list(range(n))
    if passes > 1:
        second = many[len(one): 2 * len(one)]
        assert [i for b in second for i, _ in b] != [i for b in one for i, _ in b]  # reshuffled
        assert {s for b in second for _, s in b}.isdisjoint({s for b in one for _, s in b})  # new item seeds
    again = EpochBatchSampler(n, batch, seed=5, min_batches=min_batches)
    again.set_epoch(3)  # a resume straight into epoch 3
    assert list(again) == many


def test_min_batches_needs_the_seeded_loader() -> None:
    from medssl_monai.bundle import make_loader

    ds = Dataset([{"x": torch.zeros(1)} for _ in range(6)])
    assert len(make_loader(ds, 4, seed=0, min_batches=5)) == 6  # batches of 4 + 2 a pass: 3 passes for 5
    with pytest.raises(ValueError, match="min_batches needs the seeded"):
        make_loader(ds, 4, min_batches=5)
