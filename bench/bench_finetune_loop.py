"""The fine-tune bundle end to end (as a study runs it) vs a bare PyTorch loop on the same decoded images.

    python bench/bench_finetune_loop.py [--epochs 10] [--batch 64] [--json bench/results/finetune_loop.json]

About 3 minutes on 2 idle CPU cores. Target (issue 20, item 6): images/s of the bundle >= 0.9x the bare loop.

How:

* Data: HAM10000's ``mini`` rows (312 train / 65 val images, 7 classes) from ``../shared/data`` beside the
  checkout or ``$MEDSSL_SHARED_DATA`` (a worktree elsewhere needs it); generated PNGs without it. 3 channels at 64 px, the study's fine-tune recipe (``configs/experiments/ham10000_label_efficiency
  .json``): ResNet-18, batch 64, SGD (Nesterov, momentum 0.9) at lr 0.05 with the cosine epoch schedule,
  inverse-frequency class weights, the ``dermatology`` preset's flips, validation once at the end
  (``val_interval`` = ``--epochs``), random init. ``num_workers=0`` for both (the study uses 2; with 2
  cores the bare loop would need the same workers to compare, and spawning them is part of what is timed).
* Both read the decoded-image cache (``cache: host``, built once before the clock starts, untimed): the
  comparison is of the loop around the same uint8 images, not of JPEG decoding.
* The bundle: ``experiments.runner.run_bundle`` on ``bundles/finetune_classification`` ``train.json``,
  exactly as ``medssl study`` / ``run_grid`` call it: a bundle copy, ``python -m monai.bundle run`` with the
  overrides (forked from the preloaded server, :mod:`medssl_monai.experiments.bundle_process`), parse,
  cache read, training with every default handler (validation, TensorBoard, checkpoints every epoch, metrics
  CSV, confusion matrix), the final validation and ``models/`` written. Timed: ``run_bundle`` from call to
  return. The first bundle run (untimed in the ratio) also starts the fork server; its time is reported
  as ``cold``. The same bundle with ``MEDSSL_BUNDLE_FORK=0`` (a fresh interpreter, the old way) is timed once.
* The bare loop, in this process: the cache read (``classification_items``), the same transform objects'
  classes (``EnsureFloatImaged``, ``RandomResizedCropd``, ``RandFlipd``, ``EncodeLabeld``, ``ToTensord``),
  a ``DataLoader`` with the same batch and shuffling, ``classifier_def`` (the same network), the same
  optimiser, schedule and weighted loss, the same number of steps; no validation, no handler, no file.
* Reported per contender: wall seconds, CPU seconds (user + system, all threads; the bundle's from
  ``wait4``), training images/s, and the ratio bare/bundle. Rounds whose timed window saw other processes
  keep more than ``--max-foreign`` cores busy are flagged (``/proc/stat``; the machine is shared): the
  CPU-seconds ratio is then the better estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bundle_loop import CpuWindow, write_manifest_for_knn

from medssl_monai.bundle import finetune_bundle_dir
from medssl_monai.experiments.runner import run_bundle

TARGET = 0.9
PRESET = "dermatology"


def recipe(args: argparse.Namespace, manifest: Path, cache_dir: Path) -> dict[str, Any]:
    """The bundle overrides (the study's fine-tune, this benchmark's data)."""
    return {"manifest": str(manifest), "backbone": "resnet18", "image_size": args.size, "in_channels": 3,
            "num_workers": 0, "batch_size": args.batch, "max_epochs": args.epochs, "val_interval": args.epochs,
            "lr": args.lr, "preset": PRESET, "cache": "host", "cache_dir": str(cache_dir), "seed": 0}


def bundle_once(args: argparse.Namespace, manifest: Path, cache_dir: Path, work: Path, tag: str) -> dict[str, Any]:
    root = work / tag / "finetune_classification"
    with CpuWindow() as w:
        run_bundle(finetune_bundle_dir(), "train.json", root, recipe(args, manifest, cache_dir), work, tag,
                   root / "models" / "model.pt", force=True)
    rec = json.loads((work / "logs" / f"{tag}.json").read_text())
    cpu_s = rec.get("cpu_s", float("nan"))
    # CpuWindow counts every process but this one: the bundle's own process (forked or a subprocess) is not
    # foreign load, so its CPU seconds are taken back out
    foreign = max(0.0, w.foreign_cores * w.wall - cpu_s) / w.wall if w.wall > 0 and cpu_s == cpu_s else float("nan")
    out = {"wall_s": w.wall, "cpu_s": cpu_s, "forked": rec.get("forked"), "foreign_cores": foreign}
    out.update(log_split(work / "logs" / f"{tag}.log"))
    shutil.rmtree(root, ignore_errors=True)
    return out


def log_split(log: Path) -> dict[str, float]:
    """Seconds between the bundle log's landmarks: the first line -> trainer start (parse, cache read, model)
    -> trainer end ("Engine run finished" of the trainer) -> last line (``finalize``)."""
    stamps: dict[str, datetime] = {}
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        m = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        stamps.setdefault("first", t)
        if "SupervisedTrainer - INFO - Engine run resuming" in line:
            stamps["train_start"] = t
        if "SupervisedTrainer - INFO - Engine run finished" in line:
            stamps["train_end"] = t
        stamps["last"] = t
    if not {"first", "train_start", "train_end", "last"} <= set(stamps):
        return {}
    d = {k: v.timestamp() for k, v in stamps.items()}
    return {"log_setup_s": d["train_start"] - d["first"], "log_train_s": d["train_end"] - d["train_start"],
            "log_finalize_s": d["last"] - d["train_end"]}


def bare_once(args: argparse.Namespace, manifest: Path, cache_dir: Path) -> dict[str, Any]:
    """The bare loop: the same cache, transforms, network, optimiser, schedule, loss and steps."""
    from monai.transforms import Compose, RandFlipd, ToTensord
    from monai.utils import set_determinism

    from medssl_monai.bundle import classification_items, classifier_def, flip_prob, item_classes, load_rows
    from medssl_monai.data import ImageCacheSpec, select_labelled
    from medssl_monai.data.labels import EncodeLabeld, LabelEncoder
    from medssl_monai.losses import class_weights, classification_loss
    from medssl_monai.optim import epoch_scheduler, finetune_param_groups
    from medssl_monai.transforms import EnsureFloatImaged, RandomResizedCropd

    c0 = time.process_time()
    with CpuWindow() as w:
        set_determinism(seed=0)
        rows = load_rows(manifest=str(manifest), split=["train", "val"])
        train = select_labelled(rows, 1.0, split_col="split", train_value="train", seed=0)
        val = rows[(rows["split"] == "val") & rows["label"].notna()]
        spec = ImageCacheSpec("host", image_size=args.size, in_channels=3, cache_dir=str(cache_dir))
        items = classification_items(train, spec)
        val_items = classification_items(val, spec, phase="eval")
        classes = item_classes([items, val_items])
        enc = LabelEncoder(classes)
        flips = [RandFlipd(keys="image", spatial_axis=a, prob=flip_prob(PRESET, f))
                 for a, f in ((1, "hflip"), (0, "vflip")) if flip_prob(PRESET, f)]
        transform = Compose([EnsureFloatImaged(keys="image", in_channels=3),
                             RandomResizedCropd(keys="image", spatial_size=[args.size] * 2, scale=[0.5, 1.0]),
                             *flips, EncodeLabeld(keys="label", encoder=enc),
                             ToTensord(keys="image", track_meta=False)])
        from monai.data import Dataset

        loader = torch.utils.data.DataLoader(Dataset(items, transform), batch_size=args.batch, shuffle=True,
                                             num_workers=0)
        net = classifier_def(backbone="resnet18", in_channels=3, num_classes=len(classes))
        opt = torch.optim.SGD(finetune_param_groups(net, 1e-4, args.lr), lr=args.lr, momentum=0.9, nesterov=True)
        sched = epoch_scheduler(opt, "cosine", args.epochs)
        labels = torch.as_tensor([enc.encode(d["label"]) for d in items])
        loss_fn = classification_loss(False, class_weights(labels, len(classes), "inverse", 0.999), "cpu")
        net.train()
        steps = 0
        for _ in range(args.epochs):
            for batch in loader:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(batch["image"]), batch["label"])
                loss.backward()
                opt.step()
                steps += 1
            sched.step()
    return {"wall_s": w.wall, "cpu_s": time.process_time() - c0, "foreign_cores": w.foreign_cores,
            "steps": steps, "images": len(items)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="timed (bare, bundle) pairs")
    ap.add_argument("--max-foreign", type=float, default=0.1)
    ap.add_argument("--no-subprocess", action="store_true", help="skip the MEDSSL_BUNDLE_FORK=0 run")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "finetune_loop.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_loop_"))
    try:
        manifest, what = write_manifest_for_knn(work)
        cache_dir = work / "image_cache"
        from medssl_monai.bundle import classification_items, load_rows
        from medssl_monai.data import ImageCacheSpec

        rows = load_rows(manifest=str(manifest), split=["train", "val"])  # decode once into the cache, untimed
        classification_items(rows, ImageCacheSpec("host", image_size=args.size, cache_dir=str(cache_dir)))
        cold = bundle_once(args, manifest, cache_dir, work, "cold")  # starts the fork server too
        print(f"cold bundle run (fork server start included): {cold['wall_s']:.1f} s", flush=True)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            pair = {"bare": bare_once(args, manifest, cache_dir), "bundle": bundle_once(args, manifest, cache_dir,
                                                                                        work, f"warm{r}")}
            if not pair["bundle"]["forked"]:
                print("warning: the warm bundle run was not forked from the server (see its log)", flush=True)
            rounds.append(pair)
            print(f"round {r + 1}: bare {pair['bare']['wall_s']:.1f} s, bundle {pair['bundle']['wall_s']:.1f} s "
                  f"(foreign cores {max(p['foreign_cores'] for p in pair.values()):.2f})", flush=True)
        sub = None
        if not args.no_subprocess:
            os.environ["MEDSSL_BUNDLE_FORK"] = "0"
            sub = bundle_once(args, manifest, cache_dir, work, "subprocess")
            del os.environ["MEDSSL_BUNDLE_FORK"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    steps = rounds[0]["bare"]["steps"]
    n_img = rounds[0]["bare"]["images"] * args.epochs
    med = {k: sorted(r[k]["wall_s"] for r in rounds)[len(rounds) // 2] for k in ("bare", "bundle")}
    cpu = {k: sorted(r[k]["cpu_s"] for r in rounds)[len(rounds) // 2] for k in ("bare", "bundle")}
    ratio = med["bare"] / med["bundle"]
    ratio_cpu = cpu["bare"] / cpu["bundle"]
    foreign = max(p["foreign_cores"] for r in rounds for p in r.values())
    contended = foreign > args.max_foreign
    b = rounds[len(rounds) // 2]["bundle"]
    print(f"\n{what}; ResNet-18, 3 x {args.size} px, batch {args.batch}, {args.epochs} epochs = {steps} steps "
          f"({n_img} training images), SGD lr {args.lr} cosine, {PRESET} flips, cache: host, num_workers 0, "
          f"{args.threads} threads\n")
    print("| contender | wall s | CPU s | train images/s (wall) | vs bare (wall) | vs bare (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| bare PyTorch loop | {med['bare']:.1f} | {cpu['bare']:.1f} | {n_img / med['bare']:.1f} | 1.000x | "
          "1.000x |")
    print(f"| bundle via run_bundle (forked, warm server) | {med['bundle']:.1f} | {cpu['bundle']:.1f} | "
          f"{n_img / med['bundle']:.1f} | {ratio:.3f}x | {ratio_cpu:.3f}x |")
    print(f"| bundle, first run (server start) | {cold['wall_s']:.1f} | {cold['cpu_s']:.1f} | "
          f"{n_img / cold['wall_s']:.1f} | {med['bare'] / cold['wall_s']:.3f}x | |")
    if sub is not None:
        print(f"| bundle, MEDSSL_BUNDLE_FORK=0 (fresh interpreter) | {sub['wall_s']:.1f} | {sub['cpu_s']:.1f} | "
              f"{n_img / sub['wall_s']:.1f} | {med['bare'] / sub['wall_s']:.3f}x | "
              f"{cpu['bare'] / sub['cpu_s']:.3f}x |")
    if b.get("log_setup_s") is not None:
        print(f"\nbundle log split (warm run): setup (parse, cache read, model) {b['log_setup_s']:.1f} s, "
              f"training incl. validation and handlers {b['log_train_s']:.1f} s, finalize {b['log_finalize_s']:.1f} s")
    verdict = "yes" if ratio >= TARGET else "NO"
    print(f"target bundle >= {TARGET}x bare (wall): {verdict}"
          + (f"  [contended: other processes used up to {foreign:.2f} cores; see the CPU ratio]" if contended else ""))
    wall = time.perf_counter() - t_start
    print(f"wall time {wall:.0f} s")
    result = {
        "data": what, "epochs": args.epochs, "batch": args.batch, "size": args.size, "lr": args.lr,
        "steps": steps, "train_images_per_run": n_img, "threads": args.threads, "torch": torch.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
        "wall_s": {**med, "bundle_cold": cold["wall_s"], "bundle_subprocess": sub["wall_s"] if sub else None},
        "cpu_s": {**cpu, "bundle_cold": cold["cpu_s"], "bundle_subprocess": sub["cpu_s"] if sub else None},
        "images_per_s": {k: n_img / v for k, v in med.items()},
        "ratio_bare_over_bundle_wall": ratio, "ratio_bare_over_bundle_cpu": ratio_cpu,
        "ratio_bare_over_bundle_subprocess_wall": med["bare"] / sub["wall_s"] if sub else None,
        "max_foreign_cores": foreign, "contended": contended, "bundle_log_split": {k: v for k, v in b.items()
                                                                                    if k.startswith("log_")},
        "rounds_raw": rounds, "cold_raw": cold, "subprocess_raw": sub,
        "target_bundle>=0.9x_bare": ratio >= TARGET and not math.isnan(ratio), "bench_wall_s": wall,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
