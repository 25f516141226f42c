"""Index throughput vs a bare ``pydicom.dcmread(stop_before_pixels=True)`` loop, in one run.

    python bench/bench_index.py [--files 3000] [--repeats 3] [--json bench/results/index.json]

Targets (issue 2): one worker >= 0.9x the bare loop; near-linear gain with more workers (on as many cores
as the machine has); an incremental re-index of an unchanged tree >= 20x faster than the cold index.
All timings are with a warm page cache (a warm-up pass reads every file first); contenders run interleaved
in each round and the table reports medians (ratios are medians of per-round ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pydicom

from medssl_monai.data import index_tree


def make_tree(root: Path, n_files: int) -> list[str]:
    """A PACS-like tree of real clinical headers: pydicom's CT_small and MR_small (256 and 100+ elements,
    as shipped in the pydicom wheel) re-identified per file; 7 images per patient, opaque file names."""
    from pydicom.data import get_testdata_file

    templates = [pydicom.dcmread(get_testdata_file(n, download=False)) for n in ("CT_small.dcm", "MR_small.dcm")]
    paths = []
    for i in range(n_files):
        ds = templates[i % 2]
        ds.PatientID = f"PAT{i // 7:05d}"
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.9.{i // 7}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.9.{i // 7}.{i % 2}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.9.{i // 7}.{i % 2}.{i}"
        ds.InstanceNumber = i % 7 + 1
        p = root / f"D{i // 500:03d}" / f"S{i // 50:04d}" / f"IM{i:06d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(p)
        paths.append(str(p))
    return paths


def interleaved(contenders: dict, repeats: int) -> dict[str, list[float]]:
    """Run every contender once per round, rounds repeated: drift in machine speed hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=7)
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

        out = tmp / "m.csv"
        index_tree(tmp / "tree", out)  # the incremental contender starts from an existing manifest
        contenders = {"bare dcmread loop (file list given)": bare}
        for w in workers:
            contenders[f"medssl index, {w} worker(s)"] = lambda w=w: index_tree(tmp / "tree", workers=w)
        contenders["cold index with manifest written, 1 worker"] = (
            lambda: index_tree(tmp / "tree", tmp / "cold.csv", incremental=False))
        contenders["incremental re-index, unchanged tree"] = lambda: index_tree(tmp / "tree", out)
        times = interleaved(contenders, args.repeats)
        res = index_tree(tmp / "tree", out, workers=1)
        assert res.stats["files_read"] == 0 and res.stats["instances"] == args.files
        names = list(contenders)
        bare_t = times[names[0]]
        # ratio per round (same round = same machine state), then the median over rounds
        ratios = {n: statistics.median(b / t for b, t in zip(bare_t, times[n])) for n in names}
        med = {n: statistics.median(times[n]) for n in names}
        rows = [(n, med[n], ratios[n]) for n in names]
        one = "medssl index, 1 worker(s)"
        t_one = med[one]
        t_cold = med["cold index with manifest written, 1 worker"]
        t_incr = med["incremental re-index, unchanged tree"]
        print(f"\n{args.files} DICOM files (real CT/MR headers), {cores} cores, median of {args.repeats} interleaved rounds\n")
        print(f"| {'what':<45} | {'seconds':>8} | {'files/s':>9} | {'vs bare loop':>12} |")
        print(f"|{'-' * 47}|{'-' * 10}:|{'-' * 11}:|{'-' * 14}:|")
        for name, t, ratio in rows:
            print(f"| {name:<45} | {t:8.3f} | {args.files / t:9.0f} | {ratio:11.2f}x |")
        speedups = {w: t_one / med[f"medssl index, {w} worker(s)"] for w in workers}
        print("\nworker scaling vs 1 worker: " + ", ".join(f"{w}: {s:.2f}x" for w, s in speedups.items()))
        print(f"incremental vs cold: {t_cold / t_incr:.1f}x faster")
        result = {
            "files": args.files, "cores": cores, "repeats": args.repeats, "python": platform.python_version(),
            "pydicom": pydicom.__version__,
            "rows": [{"what": n, "seconds": t, "files_per_s": args.files / t, "ratio_vs_bare": r} for n, t, r in rows],
            "one_worker_vs_bare": ratios[one],
            "worker_speedup": {str(w): s for w, s in speedups.items()},
            "incremental_speedup_vs_cold": t_cold / t_incr,
            "targets": {"one_worker_vs_bare>=0.9": ratios[one] >= 0.9,
                        "incremental>=20x": t_cold / t_incr >= 20},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
