"""Index throughput vs a bare ``pydicom.dcmread(stop_before_pixels=True)`` loop, in one run.

    python bench/bench_index.py [--files 3000] [--repeats 3] [--json bench/results/index.json]

Targets (issue 2): one worker >= 0.9x the bare loop; near-linear gain with more workers (on as many cores
as the machine has); an incremental re-index of an unchanged tree >= 20x faster than the cold index.
All timings are with a warm page cache (a warm-up pass reads every file first), best of ``--repeats``.
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

import numpy as np
import pydicom

from medssl_monai.data import index_tree
from medssl_monai.sample_data import synthetic_image, write_dicom


def make_tree(root: Path, n_files: int, size: int = 64) -> list[str]:
    """A PACS-like tree: 20 patients per folder level, opaque names, 12-bit CR images with full headers."""
    paths = []
    base = synthetic_image(1, 0, 0, size)
    for i in range(n_files):
        p = root / f"D{i // 500:03d}" / f"S{i // 50:04d}" / f"IM{i:06d}"
        write_dicom(p, base, patient_id=f"PAT{i // 7:05d}", patient_name=f"NAME^{i // 7}", birth_date="19700101",
                    study_uid=f"1.2.826.0.1.3680043.10.9.{i // 7}", series_uid=f"1.2.826.0.1.3680043.10.9.{i // 7}.1",
                    sop_uid=f"1.2.826.0.1.3680043.10.9.{i // 7}.1.{i}", instance_number=i % 7 + 1,
                    view_position="PA", body_part="CHEST", rescale=(1.0, -1024.0))
        paths.append(str(p))
    return paths


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="*", default=None)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "index.json"))
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    workers = args.workers or sorted({1, 2, cores})
    tmp = Path(tempfile.mkdtemp(prefix="medssl-bench-"))
    try:
        files = make_tree(tmp / "tree", args.files)
        for f in files:  # warm the page cache for every contender alike
            Path(f).read_bytes()

        def bare() -> None:
            for f in files:
                pydicom.dcmread(f, stop_before_pixels=True)

        rows = []
        t_bare = best_of(bare, args.repeats)
        rows.append(("bare dcmread loop (file list given)", t_bare, 1.0))
        t_one = None
        for w in workers:
            t = best_of(lambda w=w: index_tree(tmp / "tree", workers=w), args.repeats)
            t_one = t if w == 1 else t_one
            rows.append((f"medssl index, {w} worker(s)", t, t_bare / t))
        out = tmp / "m.csv"
        t_cold = best_of(lambda: (out.unlink(missing_ok=True), index_tree(tmp / "tree", out, workers=1)), args.repeats)
        t_incr = best_of(lambda: index_tree(tmp / "tree", out, workers=1), args.repeats)
        res = index_tree(tmp / "tree", out, workers=1)
        assert res.stats["files_read"] == 0 and res.stats["instances"] == args.files
        rows.append(("cold index with manifest written, 1 worker", t_cold, t_bare / t_cold))
        rows.append(("incremental re-index, unchanged tree", t_incr, t_bare / t_incr))
        print(f"\n{args.files} DICOM files (64x64, full headers), {cores} cores, best of {args.repeats}\n")
        print(f"| {'what':<45} | {'seconds':>8} | {'files/s':>9} | {'vs bare loop':>12} |")
        print(f"|{'-' * 47}|{'-' * 10}:|{'-' * 11}:|{'-' * 14}:|")
        for name, t, ratio in rows:
            print(f"| {name:<45} | {t:8.3f} | {args.files / t:9.0f} | {ratio:11.2f}x |")
        speedups = {w: (t_one / r[1]) for w, r in zip(workers, rows[1:])}
        print("\nworker scaling vs 1 worker: " + ", ".join(f"{w}: {s:.2f}x" for w, s in speedups.items()))
        print(f"incremental vs cold: {t_cold / t_incr:.1f}x faster")
        result = {
            "files": args.files, "cores": cores, "repeats": args.repeats, "python": platform.python_version(),
            "pydicom": pydicom.__version__,
            "rows": [{"what": n, "seconds": t, "files_per_s": args.files / t, "ratio_vs_bare": r} for n, t, r in rows],
            "one_worker_vs_bare": t_bare / t_one,
            "worker_speedup": {str(w): s for w, s in speedups.items()},
            "incremental_speedup_vs_cold": t_cold / t_incr,
            "targets": {"one_worker_vs_bare>=0.9": t_bare / t_one >= 0.9,
                        "incremental>=20x": t_cold / t_incr >= 20},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    np.random.seed(0)


if __name__ == "__main__":
    main()
