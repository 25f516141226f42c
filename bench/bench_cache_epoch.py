"""One MICLe epoch of views on HAM10000 ``train``: from the decoded-image cache vs the per-item path.

    python bench/bench_cache_epoch.py [--size 64] [--batch 128] [--workers 2] [--item-batches 10] \
        [--json bench/results/cache_epoch.json]

* cache build: cold (every image decoded, ``--workers`` processes, written to a fresh ``cache_dir``) and
  warm (a second run: read back from disk, nothing decoded); size in RAM and on disk.
* epoch of views, CPU, same preset (``dermatology``), same pairs semantics, ``--size`` px views:
  per-item path = ``contrastive_dataset(views_on="cpu")`` in a DataLoader with ``--workers`` workers (decode,
  crop, jitter, blur per item); cache path = ``CachedPairLoader`` gather + ``BatchViews`` on the batch, in
  the main process. The per-item path runs ``--item-batches`` batches and the cache path ``--cache-batches``
  (default: a whole epoch; on two shared cores a whole epoch of either takes minutes); pairs/s give the
  projected epoch times. No model step: this is the data path alone.
* sources only (what the cache replaces): a whole epoch of cache gathers vs ``--item-batches`` batches of
  the per-item loader that decodes and resizes (``views_on="device"`` without a cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from medssl_monai.bundle import contrastive_dataset, load_rows, make_loader
from medssl_monai.data import table_to_manifest, write_manifest
from medssl_monai.transforms import batch_views_for

SHARED = Path(os.environ.get("MEDSSL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _epoch(loader, views=None, max_batches: int | None = None) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    for i, b in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x1, x2 = b["view_1"], b["view_2"]
        if views is not None:
            x1, x2 = views(x1), views(x2)
        n += x1.shape[0]
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "ham10000")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--source-size", type=int, nargs=2, default=None, help="H W (default: 2x size, square)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--item-batches", type=int, default=10)
    ap.add_argument("--cache-batches", type=int, default=None, help="default: the whole epoch")
    ap.add_argument("--json", type=Path, default=Path("bench/results/cache_epoch.json"))
    a = ap.parse_args()
    torch.set_num_threads(max(1, a.workers))
    tmp = Path(tempfile.mkdtemp(prefix="cache_bench_"))
    try:
        m = table_to_manifest(a.data / "metadata.csv", group_col="lesion_id", label_col="dx", instance_col="image_id")
        write_manifest(m, tmp / "manifest.csv")
        rows = load_rows(manifest=tmp / "manifest.csv", split="train")
        source = a.source_size or [2 * a.size, 2 * a.size]
        kw = dict(pairing="micle", preset="dermatology", image_size=a.size, views_on="device", source_size=source,
                  batch_size=a.batch, num_workers=a.workers, cache_dir=tmp / "cache")
        t0 = time.perf_counter()
        cold = contrastive_dataset(rows, cache="host", **kw)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = contrastive_dataset(rows, cache="host", **kw)
        reopen_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in (tmp / "cache").rglob("*") if f.is_file())
        ram = warm.cache.nbytes()
        del cold
        views = batch_views_for("dermatology", a.size, None, "device", seed=0)
        print(f"cache built in {build_s:.1f} s, reopened in {reopen_s:.1f} s; timing the cache path", flush=True)
        n_g, s_g = _epoch(warm)  # sources only: the gather that replaces decode + resize, a whole epoch
        src = contrastive_dataset(rows, pairing="micle", preset="dermatology", image_size=a.size, views_on="device",
                                  source_size=source)
        src_loader = iter(make_loader(src, a.batch, num_workers=a.workers, shuffle=True, drop_last=True))
        next(src_loader)
        t0 = time.perf_counter()
        n_s = sum(next(src_loader)["view_1"].shape[0] for _ in range(a.item_batches))
        s_s = time.perf_counter() - t0
        del src_loader
        n_c, s_c = _epoch(warm, views, a.cache_batches)
        print(f"cache path: {n_c / s_c:.1f} pairs/s; timing the per-item path", flush=True)
        item = contrastive_dataset(rows, pairing="micle", preset="dermatology", image_size=a.size, views_on="cpu")
        loader = make_loader(item, a.batch, num_workers=a.workers, shuffle=True, drop_last=True)
        it_loader = iter(loader)
        next(it_loader)  # workers started, first batch (prefetch) not timed
        t0 = time.perf_counter()
        n_i = 0
        for _ in range(a.item_batches):
            n_i += next(it_loader)["view_1"].shape[0]
        s_i = time.perf_counter() - t0
        del it_loader
        item_rate, cache_rate = n_i / s_i, n_c / s_c
        gather_rate, decode_rate = n_g / s_g, n_s / s_s
        epoch_pairs = len(warm) * a.batch
        result = {
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": a.workers,
            "images": len(rows), "lesions_per_epoch": epoch_pairs, "view_size": a.size, "source_size": source,
            "batch": a.batch, "workers": a.workers,
            "cache_build_s": round(build_s, 2), "cache_reopen_s": round(reopen_s, 2),
            "cache_ram_mib": round(ram / 2**20, 1), "cache_disk_mib": round(disk / 2**20, 1),
            "cache_batches_timed": a.cache_batches or len(warm), "cache_pairs_per_s": round(cache_rate, 1),
            "cache_epoch_s_projected": round(epoch_pairs / cache_rate, 1),
            "item_batches_timed": a.item_batches, "item_pairs_per_s": round(item_rate, 1),
            "item_epoch_s_projected": round(epoch_pairs / item_rate, 1),
            "ratio_cache_vs_item": round(cache_rate / item_rate, 2),
            "sources_cache_gather_pairs_per_s": round(gather_rate, 1), "sources_cache_epoch_s": round(s_g, 2),
            "sources_per_item_decode_resize_pairs_per_s": round(decode_rate, 1),
            "sources_per_item_epoch_s_projected": round(epoch_pairs / decode_rate, 1),
            "ratio_sources_cache_vs_per_item": round(gather_rate / decode_rate, 1),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("| what | value |\n|---|---:|")
    for k, v in result.items():
        print(f"| {k} | {v} |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
