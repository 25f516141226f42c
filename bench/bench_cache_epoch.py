"""One MICLe epoch of views on HAM10000 ``train``: from the decoded-image cache vs the per-item path.

    python bench/bench_cache_epoch.py [--size 64] [--batch 128] [--workers 2] [--item-batches 10] \
        [--json bench/results/cache_epoch.json]

* cache build: cold (every image decoded, ``--workers`` processes, written to a fresh ``cache_dir``) and
  warm (a second run: read back from disk, nothing decoded); size in RAM and on disk.
* epoch of views, CPU, same preset (``dermatology``), same pairs semantics, ``--size`` px views:
  per-item path = ``contrastive_dataset(views_on="host")`` in a DataLoader with ``--workers`` workers (decode,
  crop, jitter, blur per item); cache path = ``CachedPairLoader`` gather + ``BatchViews`` on the batch, in
  the main process. The per-item path runs ``--item-batches`` batches and the cache path ``--cache-batches``
  (default: a whole epoch; on two shared cores a whole epoch of either takes minutes); pairs/s give the
  projected epoch times. No model step: this is the data path alone.
* sources only (what the cache replaces): a whole epoch of cache gathers vs ``--item-batches`` batches of
  the per-item loader that decodes and resizes (``views_on="device"`` without a cache).
* keys and checks (issue 19): the content key (every file hashed, xxh3-128 and blake2b) vs the stat-only key
  it replaced (size + mtime), and the full verification of the store (every chunk hashed), each a median of
  ``--rounds`` rounds on a warm page cache, as ratios to the stat key and to the warm reopen.
  ``--skip-epochs`` runs the builds and this part only (JSON default ``bench/results/cache_keys.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medssl_monai.bundle import batch_loader, batch_sampler, contrastive_dataset, load_rows, make_loader
from medssl_monai.data import ImageCacheSpec, table_to_manifest, write_manifest
from medssl_monai.data import cache as cache_module
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


def _median_s(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _keys_and_checks(rows, source: list[int], cache_dir: Path, reopen_s: float, rounds: int) -> dict:
    """What the content key and the store's checks cost, against the stat key they replaced."""
    import xxhash

    paths = [str(p) for p in rows["path"]]

    def stat_key() -> None:
        for p in paths:
            st = os.stat(p)
            _ = (st.st_size, st.st_mtime_ns)

    def file_key(new) -> None:
        for p in paths:
            h = new()
            with open(p, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
            h.hexdigest()

    (index,) = cache_dir.glob("*/index.json")
    idx = json.loads(index.read_text())
    images = np.load(index.parent / idx["images"], mmap_mode="r")
    shape = tuple(images.shape[1:])

    def verify_store() -> None:  # the real path: open (index checks, header) and every chunk hashed
        store = cache_module._Store(index.parent, idx["options"], shape)
        store.open()
        assert store.images is not None and store.verify_all() == 0

    def hash_store(new) -> None:
        r = idx["chunk_rows"]
        for c in range(0, len(images), r):
            h = new()
            h.update(np.ascontiguousarray(images[c:c + r]))
            h.hexdigest()

    digests = {p: cache_module._content(p, {}) for p in set(paths)}

    def stat_content(path, memo) -> str | None:  # the stat key's cost, the stored key's value
        os.stat(str(path))
        return digests[str(path)]

    def reopen_stat_key() -> None:  # the same reopen with the stat key and no checks (what it did before)
        from unittest import mock

        with mock.patch.object(cache_module, "_content", stat_content), \
                mock.patch.object(cache_module._Store, "chunk_ok", lambda self, slot: True), \
                mock.patch.object(cache_module, "_seal_ok", lambda data: True):
            assert cache_module.build_image_cache(rows, source, cache_dir=cache_dir, progress=False).decoded == 0

    def reopen_content_key() -> None:  # the real one: files hashed, index and every chunk checked, gather
        assert cache_module.build_image_cache(rows, source, cache_dir=cache_dir, progress=False).decoded == 0

    pairs = []
    for _ in range(max(rounds, 5)):  # interleaved: both see the same load
        pairs.append((_median_s(reopen_stat_key, 1), _median_s(reopen_content_key, 1)))
    r_stat = statistics.median(p[0] for p in pairs)
    r_content = statistics.median(p[1] for p in pairs)
    stat_s = _median_s(stat_key, rounds)
    xxh_s = _median_s(lambda: file_key(xxhash.xxh3_128), rounds)
    b2_s = _median_s(lambda: file_key(lambda: hashlib.blake2b(digest_size=16)), rounds)
    verify_s = _median_s(verify_store, rounds)
    store_b2_s = _median_s(lambda: hash_store(lambda: hashlib.blake2b(digest_size=16)), rounds)
    store_xxh_s = _median_s(lambda: hash_store(xxhash.xxh3_128), rounds)
    files_mib = sum(os.path.getsize(p) for p in set(paths)) / 2**20
    return {
        "keys_files": len(paths), "keys_files_mib": round(files_mib, 1), "keys_rounds": rounds,
        "key_stat_s": round(stat_s, 4), "key_xxh3_s": round(xxh_s, 4), "key_blake2b_s": round(b2_s, 4),
        "ratio_key_xxh3_vs_stat": round(xxh_s / stat_s, 1), "ratio_key_blake2b_vs_stat": round(b2_s / stat_s, 1),
        "key_xxh3_extra_vs_reopen": round((xxh_s - stat_s) / reopen_s, 3),
        # build_image_cache's reopen alone, interleaved: stat key, no checks (patched) vs content key + checks
        "reopen_cache_stat_key_s": round(r_stat, 3), "reopen_cache_content_key_s": round(r_content, 3),
        "ratio_reopen_cache_content_vs_stat": round(r_content / r_stat, 2),
        "ratio_reopen_cache_content_vs_stat_min": round(min(p[1] for p in pairs) / min(p[0] for p in pairs), 2),
        # the whole dataset reopen (pair index included), as the stat key would have made it
        "reopen_stat_key_est_s": round(reopen_s - (r_content - r_stat), 3),
        "ratio_reopen_vs_stat_key": round(reopen_s / (reopen_s - (r_content - r_stat)), 3),
        "store_mib": round(images.nbytes / 2**20, 1), "store_chunks": len(idx["chunks"]),
        "verify_full_xxh3_s": round(verify_s, 4), "verify_full_vs_reopen": round(verify_s / reopen_s, 3),
        "hash_store_xxh3_s": round(store_xxh_s, 4), "hash_store_blake2b_s": round(store_b2_s, 4),
        "ratio_store_blake2b_vs_xxh3": round(store_b2_s / store_xxh_s, 1),
    }


def _epochs(a, rows, warm, source, build_s: float, reopen_s: float, keys: dict, ram: int, disk: int) -> dict:
    """The epoch timings: cache path vs per-item path, and the sources alone."""
    views = batch_views_for("dermatology", a.size, None, "device", seed=0)
    print(f"cache built in {build_s:.1f} s, reopened in {reopen_s:.1f} s; timing the cache path", flush=True)
    n_g, s_g = _epoch(warm)  # sources only: the gather that replaces decode + resize, a whole epoch
    src = contrastive_dataset(rows, pairing="micle", preset="dermatology", views_on="device",
                              image_cache=ImageCacheSpec(source_size=source, image_size=a.size))
    src_loader = iter(make_loader(src, a.batch, num_workers=a.workers, shuffle=True, drop_last=True))
    next(src_loader)
    t0 = time.perf_counter()
    n_s = sum(next(src_loader)["view_1"].shape[0] for _ in range(a.item_batches))
    s_s = time.perf_counter() - t0
    del src_loader
    n_c, s_c = _epoch(warm, views, a.cache_batches)
    print(f"cache path: {n_c / s_c:.1f} pairs/s; timing the per-item path", flush=True)
    item = contrastive_dataset(rows, pairing="micle", preset="dermatology", views_on="host",
                               image_cache=ImageCacheSpec(image_size=a.size))
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
    return {
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
        "ratio_sources_cache_vs_per_item": round(gather_rate / decode_rate, 1), **keys,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "ham10000")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--source-size", type=int, nargs=2, default=None, help="H W (default: 2x size, square)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--item-batches", type=int, default=10)
    ap.add_argument("--cache-batches", type=int, default=None, help="default: the whole epoch")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the key and check timings (median)")
    ap.add_argument("--skip-epochs", action="store_true", help="builds, keys and checks only")
    ap.add_argument("--json", type=Path, default=None,
                    help="default bench/results/cache_epoch.json (cache_keys.json with --skip-epochs)")
    a = ap.parse_args()
    a.json = a.json or Path("bench/results", "cache_keys.json" if a.skip_epochs else "cache_epoch.json")
    torch.set_num_threads(max(1, a.workers))
    tmp = Path(tempfile.mkdtemp(prefix="cache_bench_"))
    try:
        m = table_to_manifest(a.data / "metadata.csv", group_col="lesion_id", label_col="dx", instance_col="image_id")
        write_manifest(m, tmp / "manifest.csv")
        rows = load_rows(manifest=tmp / "manifest.csv", split="train")
        source = a.source_size or [2 * a.size, 2 * a.size]
        spec = ImageCacheSpec("host", source_size=source, image_size=a.size, cache_dir=str(tmp / "cache"))
        kw = dict(pairing="micle", preset="dermatology", views_on="device", image_cache=spec, num_workers=a.workers)
        t0 = time.perf_counter()
        cold = contrastive_dataset(rows, **kw)
        build_s = time.perf_counter() - t0
        reopens = []
        for _ in range(3):  # warm reopens (content keys, chunks checked as they are read): the median
            t0 = time.perf_counter()
            warm_pairs = contrastive_dataset(rows, **kw)
            reopens.append(time.perf_counter() - t0)
        reopen_s = statistics.median(reopens)
        warm = batch_loader(warm_pairs, batch_sampler(warm_pairs, a.batch, drop_last=True))
        disk = sum(f.stat().st_size for f in (tmp / "cache").rglob("*") if f.is_file())
        ram = warm_pairs.cache.nbytes()
        del cold
        keys = _keys_and_checks(rows, source, tmp / "cache", reopen_s, a.rounds)
        print(f"keys: stat {keys['key_stat_s']} s, xxh3 {keys['key_xxh3_s']} s, blake2b {keys['key_blake2b_s']} s; "
              f"full verification {keys['verify_full_xxh3_s']} s; reopen {reopen_s:.2f} s", flush=True)
        base = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "images": len(rows),
                "source_size": source, "workers": a.workers, "cache_build_s": round(build_s, 2),
                "cache_reopen_s": round(reopen_s, 2), "cache_ram_mib": round(ram / 2**20, 1),
                "cache_disk_mib": round(disk / 2**20, 1), **keys}
        result = base if a.skip_epochs else _epochs(a, rows, warm, source, build_s, reopen_s, keys, ram, disk)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("| what | value |\n|---|---:|")
    for k, v in result.items():
        print(f"| {k} | {v} |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
