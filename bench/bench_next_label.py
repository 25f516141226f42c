"""Seconds per ``POST /activelearning/typicality`` choice (:func:`medssl_monai.selection.next_to_label`) on a
realistic datastore: 10,000 images of 512-d embeddings (bench_select.py's planted pool), with 0 to 1,000 of
them labelled, against MONAI Label's ``random`` strategy (a uniform pick among the unlabelled) in the same run.

    OMP_NUM_THREADS=1 python bench/bench_next_label.py [--items 10000] [--dim 512] [--labelled 0,10,100,1000]

The embeddings themselves come from the strategy's per-image cache after the first request (not timed here:
that is the backbone's forward pass, measured in tests/test_monai_label.py and docs/monai_label.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_select import planted_pool

from medssl_monai.selection import next_to_label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--labelled", default="0,10,100,1000")
    ap.add_argument("--json", default="bench/results/next_label.json")
    args = ap.parse_args()
    import sklearn.cluster  # noqa: F401  (imported before the clock starts)

    x, _ = planted_pool(args.items, args.dim)
    ids = [f"1.2.826.0.1.{i}" for i in range(len(x))]
    rng = np.random.default_rng(0)
    rows = []
    for n in (int(v) for v in args.labelled.split(",")):
        labelled = set(rng.choice(ids, size=n, replace=False).tolist()) if n else set()
        t0 = time.perf_counter()
        free = [i for i in ids if i not in labelled]
        _ = free[int(np.random.default_rng(n).integers(len(free)))]
        base = time.perf_counter() - t0
        t0 = time.perf_counter()
        pick = next_to_label(x, ids, labelled, seed=0)
        seconds = time.perf_counter() - t0
        assert pick not in labelled
        rows.append({"images": len(ids), "labelled": n, "clusters": n + 1, "typicality_s": round(seconds, 3),
                     "random_s": round(base, 4), "x_random": round(seconds / max(base, 1e-9), 1)})
    print("| images | labelled | k-means clusters | typicality s | random s | x random |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['labelled']} | {r['clusters']} | {r['typicality_s']:.2f} | "
              f"{r['random_s']:.4f} | {r['x_random']:.0f} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "dim": args.dim, "machine": platform.machine(),
                               "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
