"""SimCLR training step through medssl_monai's components vs a bare PyTorch loop, and view throughput.

    python bench/bench_simclr_step.py [--rounds 5] [--steps 3] [--json bench/results/simclr_step.json]

Target (issue 3): ContrastiveStep >= 0.97x the bare loop's speed (ResNet-18 + SimCLRv2 head, batch 64,
two 64x64 views, LARS + warm-up/cosine, NT-Xent), and the view pipeline (real JPEG decode + the `natural`
preset, DataLoader with 2 workers) produces pairs faster than the step consumes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from medssl_monai.engines import ContrastiveStep
from medssl_monai.losses import NTXentLoss
from medssl_monai.networks import ProjectionHead, SSLModel, get_backbone
from medssl_monai.optim import LARS, lars_param_groups, warmup_cosine_scheduler

SHARED = Path(os.environ.get("MEDSSL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_model() -> SSLModel:
    torch.manual_seed(0)
    bb = get_backbone("resnet18", in_channels=3)
    return SSLModel(bb, ProjectionHead(bb.feature_dim, bb.feature_dim, 128, num_layers=3))


def make_opt(model: torch.nn.Module, total: int):
    opt = LARS(lars_param_groups(model, 1e-6), lr=0.3 * 64 / 256)
    return opt, warmup_cosine_scheduler(opt, total, total // 10)


def bare_loop(model, opt, sched, loss_fn, batches):
    """The reference: nothing but PyTorch calls."""
    for b in batches:
        model.train()
        _, z = model(torch.cat([b["view_1"], b["view_2"]]))
        z1, z2 = z.chunk(2)
        loss = loss_fn(z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def view_throughput(n_pairs: int, workers: int) -> tuple[float, str]:
    """Pairs/s of file loading + `natural` views at 64x64 through a MONAI DataLoader."""
    import pandas as pd
    from monai.data import DataLoader
    from monai.transforms import Compose

    from medssl_monai.data import ContrastivePairDataset, LoadManifestImaged, MultiInstanceIndex
    from medssl_monai.transforms import ContrastiveViewsd

    index_csv = SHARED / "imagenette" / "index.csv"
    if index_csv.is_file():
        df = pd.read_csv(index_csv).head(n_pairs)
        rows = pd.DataFrame({"path": [str(SHARED / "imagenette" / p) for p in df["path"]],
                             "patient_id": [str(i) for i in range(len(df))], "source": "image"})
        what = f"imagenette JPEGs ({len(rows)} files, 224 px)"
    else:  # a user's clone without the shared data: synthetic PNGs
        import tempfile

        import numpy as np
        from PIL import Image

        tmp = Path(tempfile.mkdtemp())
        paths = []
        for i in range(n_pairs):
            p = tmp / f"{i}.png"
            Image.fromarray((np.random.default_rng(i).random((224, 224, 3)) * 255).astype("uint8")).save(p)
            paths.append(str(p))
        rows = pd.DataFrame({"path": paths, "patient_id": [str(i) for i in range(n_pairs)], "source": "image"})
        what = f"synthetic PNGs ({n_pairs}, 224 px)"
    transform = Compose([LoadManifestImaged(keys=("image_1", "image_2"), in_channels=3),
                         ContrastiveViewsd(keys=("image_1", "image_2"), transform="natural", spatial_size=(64, 64))])
    ds = ContrastivePairDataset(MultiInstanceIndex(rows), transform, pairing="simclr")
    loader = DataLoader(ds, batch_size=64, num_workers=workers, persistent_workers=False)
    t = time.perf_counter()
    n = sum(b["view_1"].shape[0] for b in loader)
    return n / (time.perf_counter() - t), what


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per contender per round")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "simclr_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batches = [{"view_1": torch.rand(args.batch, 3, args.size, args.size, generator=g),
                "view_2": torch.rand(args.batch, 3, args.size, args.size, generator=g)} for _ in range(args.steps)]
    total = (args.rounds + 1) * args.steps
    m_ours, m_bare = make_model(), make_model()
    opt_ours, sched_ours = make_opt(m_ours, total)
    opt_bare, sched_bare = make_opt(m_bare, total)
    loss_fn = NTXentLoss(temperature=0.1)
    step = ContrastiveStep(m_ours, NTXentLoss(temperature=0.1), opt_ours, sched_ours, group_key=None)
    # warm-up round (allocator, lazy init), not timed
    bare_loop(m_bare, opt_bare, sched_bare, loss_fn, batches[:1])
    step(batches[0])
    t_bare, t_ours = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        bare_loop(m_bare, opt_bare, sched_bare, loss_fn, batches)
        t_bare.append((time.perf_counter() - t) / args.steps)
        t = time.perf_counter()
        for b in batches:
            step(b)
        t_ours.append((time.perf_counter() - t) / args.steps)
    ratio = statistics.median(b / o for b, o in zip(t_bare, t_ours))
    step_pairs_s = args.batch / statistics.median(t_ours)
    views_s, what = view_throughput(n_pairs=256, workers=2)
    print(f"\nResNet-18 + 3-layer head, batch {args.batch}, two {args.size}x{args.size} views, LARS, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds x {args.steps} steps\n")
    print("| what | s/step | pairs/s | vs bare |")
    print("|---|---:|---:|---:|")
    print(f"| bare PyTorch loop | {statistics.median(t_bare):.3f} | {args.batch / statistics.median(t_bare):.1f} | 1.00x |")
    print(f"| ContrastiveStep | {statistics.median(t_ours):.3f} | {step_pairs_s:.1f} | {ratio:.3f}x |")
    print(f"\nview pipeline ({what}, natural preset, 2 DataLoader workers): {views_s:.1f} pairs/s "
          f"= {views_s / step_pairs_s:.1f}x what the step consumes")
    result = {
        "batch": args.batch, "size": args.size, "threads": args.threads, "rounds": args.rounds,
        "steps": args.steps, "torch": torch.__version__, "python": platform.python_version(),
        "bare_s_per_step": statistics.median(t_bare), "ours_s_per_step": statistics.median(t_ours),
        "ratio_vs_bare": ratio, "step_pairs_per_s": step_pairs_s, "view_pairs_per_s": views_s,
        "view_source": what, "targets": {"ratio>=0.97": ratio >= 0.97, "views_faster_than_step": views_s > step_pairs_s},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
