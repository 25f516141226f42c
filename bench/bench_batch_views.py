"""Contrastive views per item in DataLoader workers (``views_on="host"``) vs per batch on the device
(``views_on="device"``: workers only decode and resize, ``BatchViews`` augments), same preset, same data.

    python bench/bench_batch_views.py [--device cuda] [--workers 2] [--batches 20] [--size 64] \
        [--model resnet50] [--json bench/results/batch_views.json]

Reads HAM10000 (MICLe pairs of a lesion's images, ``dermatology`` preset) from ``--data`` (default
``../shared/data/ham10000``). Prints pairs/s for each path and their ratio, measured in the same run; the
device path's time includes moving the batch to the device and synchronising after the views. With
``--model`` each batch also trains that backbone (SimCLR step, bf16 on CUDA): pairs/s of training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from medssl_monai.bundle import contrastive_dataset, make_loader
from medssl_monai.data import ImageCacheSpec, table_to_manifest
from medssl_monai.transforms import batch_views_for

SHARED = Path(os.environ.get("MEDSSL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _rate(loader, batches: int, views=None, device: str = "cpu", step=None) -> float:
    """Pairs per second through the loader (+ the device views) (+ a training step when ``step``)."""
    it = iter(loader)
    n, t0 = 0, time.perf_counter()
    for i in range(batches + 1):
        if i == 1:  # the first batch (workers starting, kernels being chosen) is not timed
            n, t0 = 0, time.perf_counter()
        b = next(it, None)
        if b is None:  # an epoch ended: the next one starts (its cost is part of training too)
            it = iter(loader)
            b = next(it)
        x1 = b["view_1"].to(device, non_blocking=True)
        x2 = b["view_2"].to(device, non_blocking=True)
        if views is not None:
            x1, x2 = views(x1), views(x2)
        if step is not None:
            step({"view_1": x1, "view_2": x2})
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        n += b["view_1"].shape[0]
    return n / (time.perf_counter() - t0)


def _step(model: str, device: str):
    """A SimCLR step of ``model`` + projection head (bf16 on CUDA, channels-last), as the bundles train."""
    from medssl_monai.engines import ContrastiveStep
    from medssl_monai.losses import NTXentLoss
    from medssl_monai.networks import ProjectionHead, SSLModel, get_backbone

    bb = get_backbone(model, in_channels=3)
    net = SSLModel(bb, ProjectionHead(bb.feature_dim, bb.feature_dim, 128, num_layers=3)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    cuda = device.startswith("cuda")
    return ContrastiveStep(net, NTXentLoss(0.1), opt, device=device, amp="bf16" if cuda else None,
                           channels_last=cuda, group_key=None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=SHARED / "ham10000")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--source-size", type=int, nargs=2, default=[150, 200], help="H W the device path resizes to")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default=None, help="also train this backbone on the pairs (e.g. resnet50)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "batch_views.json"))
    a = ap.parse_args()
    if not (a.data / "metadata.csv").is_file():
        raise SystemExit(f"HAM10000 not found at {a.data} (set --data or MEDSSL_SHARED_DATA)")
    m = table_to_manifest(a.data / "metadata.csv", group_col="lesion_id", label_col="dx", instance_col="image_id")
    rows = m[m["split"] == "train"].reset_index(drop=True)
    common = dict(rows=rows, pairing="micle", preset="dermatology", seed=0)
    spec = ImageCacheSpec(source_size=a.source_size, image_size=a.size, in_channels=3)
    cpu = make_loader(contrastive_dataset(**common, views_on="host", image_cache=spec), a.batch, a.workers,
                      shuffle=True, drop_last=True)
    dev = make_loader(contrastive_dataset(**common, views_on="device", image_cache=spec), a.batch,
                      a.workers, shuffle=True, drop_last=True)
    views = batch_views_for("dermatology", a.size, views_on="device", seed=0).to(a.device)
    step = _step(a.model, a.device) if a.model else None
    res: dict[str, list[float]] = {"cpu_views": [], "device_views": []}
    for _ in range(a.rounds):  # alternate, so drift in the machine's speed hits both
        res["cpu_views"].append(_rate(cpu, a.batches, None, a.device, step))
        res["device_views"].append(_rate(dev, a.batches, views, a.device, step))
    best = {k: max(v) for k, v in res.items()}
    ratio = best["device_views"] / best["cpu_views"]
    print(f"{'path':<14}{'pairs/s (best of rounds)':>26}")
    for k, v in best.items():
        print(f"{k:<14}{v:>26.1f}")
    print(f"device/cpu ratio: {ratio:.2f}x  (device={a.device}, workers={a.workers}, {a.size} px, batch {a.batch}, "
          f"training step: {a.model or 'none'})")
    out = {"device": a.device, "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else
           platform.processor() or platform.machine(), "workers": a.workers, "batch": a.batch, "size": a.size,
           "source_size": a.source_size, "batches": a.batches, "model": a.model, "rounds": res, "best_pairs_per_s": best,
           "ratio_device_vs_cpu": ratio, "torch": torch.__version__, "cpus": os.cpu_count()}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {a.json}")


if __name__ == "__main__":
    main()
