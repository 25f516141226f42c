"""The pretraining bundles are declared, not built by one factory: ``train#dataset`` is a Dataset,
``train#sampler`` and ``train#dataloader`` are components the config composes, and ``multi_gpu_train.json``'s
override of the sampler is what the trainer's loader uses, on the per-item and the cached batch-pair paths alike
(the cached loader once read ``torch.distributed`` itself and ignored the override)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medssl_monai.bundle.locate import bundle_path
from medssl_monai.data import CachedPairDataset, ImageCacheSpec, PairBatchSampler, write_manifest
from medssl_monai.data.epoch_batches import EpochBatchSampler


def _manifest(folder: Path, patients: int = 8) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for p in range(patients):
        for i in range(2):
            path = folder / f"{p}.{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
            rows.append({"path": str(path), "patient_id": f"p{p}", "study_uid": f"s{p}", "series_uid": f"s{p}",
                         "sop_uid": f"u{p}.{i}", "label": f"c{p % 2}", "split": "train", "source": "image"})
    write_manifest(pd.DataFrame(rows), folder / "manifest.csv")
    return folder / "manifest.csv"


def _parser(bundle: str, tmp_path: Path, multi_gpu: bool, **overrides):
    from monai.bundle import ConfigParser

    configs = bundle_path(bundle) / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), *([str(configs / "multi_gpu_train.json")] if multi_gpu else [])])
    parser.update({"bundle_root": str(tmp_path / bundle), "manifest": str(_manifest(tmp_path / "data")),
                   "dataset_dir": None, "batch_size": 2, "image_size": 8, "cache_dir": str(tmp_path / "cache"),
                   **overrides})
    return parser


@pytest.mark.parametrize("bundle", ["micle_medical", "simclr_natural"])
@pytest.mark.parametrize("cache", ["host", "device", "none"])
def test_multi_gpu_sampler_override_is_what_the_trainer_loads(bundle: str, cache: str, tmp_path: Path,
                                                               monkeypatch) -> None:
    import ignite.distributed as idist

    monkeypatch.setattr(idist, "get_rank", lambda: 1)  # rank 1 of 2, read only through the config's override
    monkeypatch.setattr(idist, "get_world_size", lambda: 2)
    views_on = "device" if cache != "none" else "host"
    parser = _parser(bundle, tmp_path, True, cache=cache, views_on=views_on, device="$torch.device('cpu')")
    assert parser["train#trainer"]["train_data_loader"] == "@train#dataloader"
    assert parser["train#sampler#world_size"] == "$idist.get_world_size()"
    loader = parser.get_parsed_content("train#dataloader")
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert parser.get_parsed_content("image_cache") == ImageCacheSpec(cache, image_size=8, cache_dir=str(tmp_path / "cache"))
    items = 8 if bundle == "micle_medical" else 16  # MICLe: one item per patient; SimCLR: per image
    if cache == "none":
        sampler = loader.batch_sampler
        assert isinstance(sampler, EpochBatchSampler) and not isinstance(parser.get_parsed_content("train#dataset"),
                                                                         CachedPairDataset)
    else:
        sampler = loader.sampler
        assert isinstance(sampler, PairBatchSampler) and isinstance(loader.dataset, CachedPairDataset)
        ranks_items = {int(g) for batch in loader for g in batch["group_index"]}
        assert len(ranks_items) <= items // 2  # this rank's shard only
    assert (sampler.rank, sampler.world_size) == (1, 2) and len(loader) == (items // 2) // 2
    assert sampler is parser.get_parsed_content("train#sampler")


def test_single_process_config_is_one_rank(tmp_path: Path) -> None:
    parser = _parser("micle_medical", tmp_path, False, cache="host", views_on="device")
    sampler = parser.get_parsed_content("train#sampler")
    assert isinstance(sampler, PairBatchSampler) and (sampler.rank, sampler.world_size) == (0, 1)
    assert len(parser.get_parsed_content("train#dataloader")) == 8 // 2
    bad = _parser("micle_medical", tmp_path / "bad", False, cache="host", source_size=[0, 4])
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the spec's one-line error
        bad.get_parsed_content("image_cache")
    assert str(err.value.__cause__).startswith("ImageCacheSpec.source_size: ")
