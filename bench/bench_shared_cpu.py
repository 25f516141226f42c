"""Shared-CPU oversubscription: one fine-tuning step while another PyTorch job trains on the same cores.

Runs a background training loop (default threads), then times a ResNet-18 step (batch 8, 64 px) in a fresh
process with the default thread count and with ``OMP_NUM_THREADS=1``; prints a table and writes JSON.

    python bench/bench_shared_cpu.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STEP = """
import sys, time, torch
from medssl_monai.bundle import classifier_def
torch.manual_seed(0)
net = classifier_def("resnet18", 1, 3)
x = torch.randn(8, 1, 64, 64)
net(x).sum().backward()
t = time.perf_counter()
for _ in range(int(sys.argv[1])):
    net(x).sum().backward()
print((time.perf_counter() - t) / int(sys.argv[1]), torch.get_num_threads())
"""

BACKGROUND = """
import torch
from medssl_monai.bundle import classifier_def
net = classifier_def("resnet18", 3, 7)
x = torch.randn(32, 3, 64, 64)
while True:
    net(x).sum().backward()
"""


def _step(steps: int, env: dict[str, str]) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", STEP, str(steps)], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "shared_cpu.json"))
    args = p.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    one = {**base, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = {"alone, default threads": _step(args.steps, base)}
    bg = subprocess.Popen([sys.executable, "-c", BACKGROUND], env=base)
    try:
        time.sleep(5)  # let the background job reach steady state
        rows["beside a training job, default threads"] = _step(args.steps, base)
        rows["beside a training job, OMP_NUM_THREADS=1"] = _step(args.steps, one)
    finally:
        bg.kill()
        bg.wait()
    ref = rows["beside a training job, OMP_NUM_THREADS=1"][0]
    print(f"{'setting':<45} {'threads':>7} {'s/step':>8} {'x vs 1 thread shared':>21}")
    for name, (sec, threads) in rows.items():
        print(f"{name:<45} {threads:>7} {sec:>8.3f} {sec / ref:>21.1f}")
    result = {"cpu_count": os.cpu_count(), "steps": args.steps,
              "s_per_step": {k: v[0] for k, v in rows.items()}, "threads": {k: v[1] for k, v in rows.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
