"""Label-selection speed on a realistic pool: 10,000 items of 512-d embeddings (a ResNet-18's pooled
features), each strategy at budgets of 1/5/10%, against the random baseline in the same run.

    python bench/bench_select.py [--items 10000] [--dim 512] [--budgets 0.01,0.05,0.1] [--json bench/results/select.json]

The embedding is planted: 100 Gaussian clusters with long-tailed (Zipf) sizes, from ~19% of the pool down to
10 items (HAM10000's classes are as skewed), so the table also shows what each strategy covers: the number of
planted clusters with at least one selected item, and of the 10 smallest. Target (issue 20): seconds on a CPU
for >= 10,000 items. Each budget is a separate call (as `medssl select` runs); scikit-learn is imported before
the clock starts (its first import alone takes seconds). On a shared 2-core machine run it with
OMP_NUM_THREADS=1: OpenMP threads spinning against other processes made k-means 5x slower there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from medssl_monai.selection import STRATEGIES, select


def planted_pool(items: int, dim: int, clusters: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, clusters + 1) ** 1.1  # Zipf-like class sizes
    sizes = np.maximum(10, np.floor(weights / weights.sum() * items)).astype(int)
    sizes[0] += items - sizes.sum()
    centers = rng.normal(size=(clusters, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    label = np.repeat(np.arange(clusters), sizes)
    x = centers[label] + rng.normal(scale=0.6 / np.sqrt(dim), size=(items, dim)) * rng.uniform(0.5, 1.5, (items, 1))
    perm = rng.permutation(items)
    return x[perm].astype(np.float32), label[perm]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--budgets", default="0.01,0.05,0.1")
    ap.add_argument("--strategies", default="random,kcenter,typiclust")
    ap.add_argument("--json", default="bench/results/select.json")
    args = ap.parse_args()
    import sklearn.cluster  # noqa: F401  (imported before the clock starts)

    x, label = planted_pool(args.items, args.dim)
    sizes = np.bincount(label)
    rare = set(np.argsort(sizes)[:10].tolist())
    rows = []
    for f in (float(b) for b in args.budgets.split(",")):
        base = None
        for strategy in args.strategies.split(","):
            if strategy not in STRATEGIES:
                raise SystemExit(f"unknown strategy {strategy!r}")
            t0 = time.perf_counter()
            order = select(x, fraction=f, strategy=strategy, seed=0)
            seconds = time.perf_counter() - t0
            base = seconds if strategy == "random" else base
            covered = set(label[np.asarray(order)].tolist())
            rows.append({"budget": f, "items": len(order), "strategy": strategy, "seconds": round(seconds, 3),
                         "vs_random": round(seconds / base, 1) if base else None, "clusters_covered": len(covered),
                         "rare_covered": len(covered & rare)})
            r = rows[-1]
            print(f"{f:>6.0%} {r['items']:>5} {strategy:<10} {seconds:>8.2f} s  clusters {len(covered):>2}/{len(sizes)}"
                  f"  rarest-10 {r['rare_covered']:>2}", flush=True)
    meta = {"items": args.items, "dim": args.dim, "clusters": len(sizes), "cpu_count": os.cpu_count(),
            "load_average_at_end": [round(v, 1) for v in os.getloadavg()], "machine": platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print("\n| budget | items | strategy | seconds | x random | clusters covered | rarest 10 covered |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']:.0%} | {r['items']} | {r['strategy']} | {r['seconds']:.2f} | {r['vs_random'] or '-'} | "
              f"{r['clusters_covered']}/{len(sizes)} | {r['rare_covered']}/10 |")
    print(f"\n{meta}\n-> {out}")


if __name__ == "__main__":
    main()
