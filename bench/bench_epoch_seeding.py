"""Cost of the per-item reseeding that makes resumes exact (``SeededItems``): items/s of the SimCLR views
(``natural`` preset, two views per item) and of the fine-tune augmentation, read plainly vs with a seed
each, in the same run, on generated 256 px PNGs, one process.

    python bench/bench_epoch_seeding.py [--items 200] [--size 64] [--json bench/results/epoch_seeding.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from medssl_monai.bundle import contrastive_dataset
from medssl_monai.data import ImageCacheSpec
from medssl_monai.data.epoch_batches import SeededItems


def _rows(folder: Path, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(path)
        rows.append({"path": str(path), "patient_id": f"p{i}", "study_uid": f"s{i}", "series_uid": f"s{i}",
                     "sop_uid": f"u{i}", "label": "a", "split": "train", "source": "image"})
    return pd.DataFrame(rows)


def _finetune(rows: pd.DataFrame, size: int):
    from monai.data import Dataset
    from monai.transforms import Compose, RandFlipd, ToTensord

    from medssl_monai.bundle import skip_unreadable
    from medssl_monai.data import LoadManifestImaged
    from medssl_monai.transforms import EnsureFloatImaged, RandomResizedCropd

    t = Compose([LoadManifestImaged(keys="image", in_channels=3), EnsureFloatImaged(keys="image", in_channels=3),
                 RandomResizedCropd(keys="image", spatial_size=(size, size), scale=(0.5, 1.0)),
                 RandFlipd(keys="image", spatial_axis=1, prob=0.5), ToTensord(keys="image", track_meta=False)])
    return Dataset([{"image": r} for r in rows.to_dict("records")], skip_unreadable(t, "train", len(rows)))


def _rate(read, n: int, repeats: int = 3) -> float:
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            read(i)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--json", default="bench/results/epoch_seeding.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = _rows(Path(tmp), args.items)
        out = {}
        for name, ds in (("simclr views", contrastive_dataset(rows, pairing="simclr",
                                                                   image_cache=ImageCacheSpec(image_size=args.size))),
                         ("fine-tune augmentation", _finetune(rows, args.size))):
            seeded = SeededItems(ds)
            plain = _rate(ds.__getitem__, args.items)
            with_seed = _rate(lambda i, s=seeded: s[(i, 1000 + i)], args.items)
            out[name] = {"plain_items_per_s": round(plain, 1), "seeded_items_per_s": round(with_seed, 1),
                         "ratio": round(with_seed / plain, 3), "random_parts": len(seeded.random_parts)}
    print(f"{'pipeline':<24} {'plain/s':>9} {'seeded/s':>9} {'ratio':>7}")
    for name, r in out.items():
        print(f"{name:<24} {r['plain_items_per_s']:>9} {r['seeded_items_per_s']:>9} {r['ratio']:>7}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"items": args.items, "size": args.size, "machine": platform.node(),
                                           "results": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
