"""Pairs/s of contrastive pretraining on one GPU: the ceiling, our bundle from the device cache, our bundle
with per-item CPU views, and lightly 1.6.0's SimCLR path on the same JPEGs (issue 11).

    python bench/bench_gpu_pretrain.py --data .gpu_data/ham10000 [--seconds 20] [--models r50 r18]
    python bench/bench_gpu_pretrain.py --smoke          # CPU: (a)-(c) tiny, to check the script runs

(a) ``ContrastiveStep`` on synthetic views already on the GPU (the ceiling: no data path at all);
(b) the ``micle_medical`` bundle end to end (``ConfigWorkflow`` on its real ``train.json``, every default
    handler but the k-NN monitor) with ``cache: device``, ``views_on: device``: MICLe pairs gathered on the
    GPU, ``BatchViews`` augmenting there;
(c) the same bundle with ``cache: none``, ``views_on: host`` (per-item decode + views in cores-2 workers);
(d) lightly 1.6.0: ``SimCLRTransform`` in DataLoader workers (cores-2) + torchvision ``resnet50``/``resnet18``
    (fc removed) + ``SimCLRProjectionHead`` + ``lightly.loss.NTXentLoss``, same batch, size, bf16,
    channels-last, SGD; one image twice (lightly has no MICLe pairs).
Models: ResNet-50 at 128 px, batch 256, and ResNet-18 at 64 px, batch 512. Each contender trains for a few
warm-up iterations, then ``--seconds`` timed (the epoch boundaries that fall inside are part of it), with
``nvidia-smi`` sampled every 0.5 s beside it. The bundle's ``initialize`` calls ``set_determinism`` (cuDNN
deterministic, no autotuning); (a) and (d) run under the same cuDNN flags, recorded in the JSON.
Output: a table and ``bench/results/gpu_pretrain_<gpu>.json`` with, per model, ``ceiling_pairs_per_s``,
``bundle_device_cache_pairs_per_s``, ``bundle_cpu_views_pairs_per_s``, ``lightly_pairs_per_s``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "micle_medical"
SHARED = Path(os.environ.get("MEDSSL_SHARED_DATA", REPO.parent / "shared" / "data"))
MODELS = {"r50": ("resnet50", 128, 256, [150, 200]), "r18": ("resnet18", 64, 512, [96, 128])}


class GpuSampler(threading.Thread):
    """``nvidia-smi`` utilisation every ``period`` s, tagged with the current phase."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period, self.phase, self.samples, self.stop = period, None, [], threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        while self.available and not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                if self.phase is not None:
                    self.samples.append((self.phase, float(out.split()[0])))
            except (subprocess.SubprocessError, ValueError, IndexError, OSError):
                pass
            time.sleep(self.period)

    def mean(self, phase: str) -> float | None:
        v = [u for p, u in self.samples if p == phase]
        return round(sum(v) / len(v), 1) if v else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Counts pairs after ``warmup`` iterations and stops the loop after ``seconds``."""

    def __init__(self, device: torch.device, batch: int, warmup: int, seconds: float) -> None:
        self.device, self.batch, self.warmup, self.seconds = device, batch, warmup, seconds
        self.i, self.t0, self.t1, self.n = 0, None, None, 0

    def tick(self) -> bool:
        """Call after each iteration; ``True`` when the measurement is complete."""
        self.i += 1
        if self.i == self.warmup:
            sync(self.device)
            self.t0 = time.perf_counter()
        elif self.i > self.warmup:
            self.n += self.batch
            if time.perf_counter() - self.t0 >= self.seconds:
                sync(self.device)
                self.t1 = time.perf_counter()
                return True
        return False

    def rate(self) -> float:
        if self.t1 is None:
            sync(self.device)
            self.t1 = time.perf_counter()
        return self.n / (self.t1 - self.t0) if self.t0 and self.n else float("nan")


def ceiling(backbone: str, size: int, batch: int, device: torch.device, amp: str | None, warmup: int,
            seconds: float) -> float:
    from medssl_monai.engines import ContrastiveStep
    from medssl_monai.losses import NTXentLoss
    from medssl_monai.networks import ProjectionHead, SSLModel, get_backbone

    bb = get_backbone(backbone, in_channels=3)
    net = SSLModel(bb, ProjectionHead(bb.feature_dim, out_features=128, num_layers=3)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    step = ContrastiveStep(net, NTXentLoss(0.1), opt, device=device, amp=amp, channels_last=device.type == "cuda")
    x = {"view_1": torch.rand(batch, 3, size, size, device=device), "view_2": torch.rand(batch, 3, size, size,
         device=device), "group_index": torch.arange(batch, device=device)}
    t = Timer(device, batch, warmup, seconds)
    while not t.tick():
        step(x)
    return t.rate()


def bundle(manifest: Path, backbone: str, size: int, batch: int, source: list[int], device: torch.device,
           amp: str | None, device_cache: bool, workers: int, work: Path, warmup: int, seconds: float,
           limit: int | None) -> tuple[float, float]:
    """Pairs/s of the bundle's trainer (``run`` timed after instantiation) and the cache build seconds."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    out = Path(tempfile.mkdtemp(prefix="bundle_", dir=work))
    overrides: dict[str, Any] = {
        "output_dir": str(out / "output"), "models_dir": str(out / "models"), "manifest": str(manifest),
        "backbone": backbone, "batch_size": batch, "image_size": size, "max_epochs": 1000, "knn_interval": 0,
        "device": f"$torch.device('{device}')", "amp": amp, "channels_last": device.type == "cuda",
        "num_workers": workers, "limit": limit, "resume": False,
        "views_on": "device" if device_cache else "host", "cache": "device" if device_cache else "none",
        "source_size": source, "cache_dir": str(work / "image_cache"),
    }
    wf = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "train.json"),
                        meta_file=str(BUNDLE / "configs" / "metadata.json"), workflow_type="train", **overrides)
    wf.initialize()
    t0 = time.perf_counter()
    trainer = wf.parser.get_parsed_content("train#trainer")  # the cache is built (or read) here
    build = time.perf_counter() - t0
    t = Timer(device, batch, warmup, seconds)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _tick(engine: Any) -> None:
        if t.tick():
            engine.terminate()

    wf.run()
    rate = t.rate()
    for h in list(logging.getLogger().handlers):
        if isinstance(h, logging.FileHandler) and str(out) in h.baseFilename:
            logging.getLogger().removeHandler(h)
            h.close()
    del wf, trainer
    return rate, build


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], transform: Any) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB"))


def lightly_rate(paths: list[str], backbone: str, size: int, batch: int, device: torch.device, workers: int,
                 warmup: int, seconds: float) -> float:
    """lightly 1.6.0's SimCLR recipe (imported here: only the GPU machine has torchvision and lightly)."""
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    net = getattr(torchvision.models, backbone)()
    dim = net.fc.in_features
    net.fc = torch.nn.Identity()
    model = torch.nn.Sequential(net, SimCLRProjectionHead(dim, dim, 128)).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.06 * batch / 256, momentum=0.9, weight_decay=5e-4)
    crit = NTXentLoss(temperature=0.1)
    loader = torch.utils.data.DataLoader(_Files(paths, SimCLRTransform(input_size=size)), batch_size=batch,
                                         shuffle=True, num_workers=workers, drop_last=True, pin_memory=cuda,
                                         persistent_workers=workers > 0)
    t = Timer(device, batch, warmup, seconds)
    model.train()
    while True:
        for (x0, x1) in loader:
            x = torch.cat([x0, x1]).to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                z = model(x)
            z0, z1 = z.float().chunk(2)
            loss = crit(z0, z1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if t.tick():
                return t.rate()


def _is_number(r: dict[str, Any], key: str) -> bool:
    return isinstance(r.get(key), float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "ham10000")
    ap.add_argument("--models", nargs="+", default=["r50", "r18"], choices=sorted(MODELS))
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 4) - 2))
    ap.add_argument("--smoke", action="store_true", help="CPU check: resnet18, 32 px, batch 8, 64 images, 2 s")
    ap.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c", "d"])
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    from medssl_monai.data import table_to_manifest, write_manifest

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    amp = "bf16" if device.type == "cuda" else None
    models = {k: MODELS[k] for k in a.models}
    limit = None
    if a.smoke:
        models, limit, a.seconds, a.warmup, a.workers = {"smoke": ("resnet18", 32, 8, [24, 32])}, 64, 2.0, 2, 1
        a.skip = sorted(set(a.skip) | {"d"})
    work = Path(tempfile.mkdtemp(prefix="gpu_pretrain_"))
    sampler = GpuSampler()
    sampler.start()
    results: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "cpus": os.cpu_count(), "workers": a.workers,
                               "seconds_timed": a.seconds, "warmup_iterations": a.warmup, "smoke": a.smoke}
    try:
        meta = table_to_manifest(a.data / "metadata.csv", group_col="lesion_id", label_col="dx",
                                 instance_col="image_id")
        write_manifest(meta, work / "manifest.csv")
        paths = [str(p) for p in meta.loc[meta["split"] == "train", "path"]][: limit or None]
        for key, (backbone, size, batch, source) in models.items():
            r: dict[str, Any] = {"backbone": backbone, "image_size": size, "batch": batch, "source_size": source}
            m = work / "manifest.csv"
            contenders = {  # called at once, inside this iteration
                "a": ("ceiling_pairs_per_s", partial(ceiling, backbone, size, batch, device, amp, a.warmup, a.seconds)),
                "b": ("bundle_device_cache_pairs_per_s", partial(bundle, m, backbone, size, batch, source, device, amp,
                                                                 True, a.workers, work, a.warmup, a.seconds, limit)),
                "c": ("bundle_cpu_views_pairs_per_s", partial(bundle, m, backbone, size, batch, source, device, amp,
                                                              False, a.workers, work, a.warmup, a.seconds, limit)),
                "d": ("lightly_pairs_per_s", partial(lightly_rate, paths, backbone, size, batch, device, a.workers,
                                                     a.warmup, a.seconds)),
            }
            for tag, (name, fn) in contenders.items():
                if tag in a.skip:
                    r[name] = None
                    continue
                sampler.phase = f"{key}_{tag}"
                try:
                    value = fn()
                    if isinstance(value, tuple):
                        value, r[f"{name.replace('_pairs_per_s', '')}_startup_s"] = value[0], round(value[1], 1)
                    r[name] = round(value, 1)
                except Exception as err:  # one contender failing (e.g. lightly missing) keeps the others
                    r[name] = None
                    r[f"{name}_error"] = f"{type(err).__name__}: {err}"[:400]
                sampler.phase = None
                r[f"{name.replace('_pairs_per_s', '')}_gpu_util_mean"] = sampler.mean(f"{key}_{tag}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            ok = partial(_is_number, r)
            if ok("ceiling_pairs_per_s") and ok("bundle_device_cache_pairs_per_s"):
                r["ratio_b_vs_a"] = round(r["bundle_device_cache_pairs_per_s"] / r["ceiling_pairs_per_s"], 3)
            if ok("lightly_pairs_per_s") and ok("bundle_device_cache_pairs_per_s"):
                r["ratio_b_vs_d"] = round(r["bundle_device_cache_pairs_per_s"] / r["lightly_pairs_per_s"], 3)
            if ok("bundle_cpu_views_pairs_per_s") and ok("bundle_device_cache_pairs_per_s"):
                r["ratio_b_vs_c"] = round(r["bundle_device_cache_pairs_per_s"] / r["bundle_cpu_views_pairs_per_s"], 3)
            results[key] = r
        results["cudnn"] = {"deterministic": torch.backends.cudnn.deterministic,
                            "benchmark": torch.backends.cudnn.benchmark}
    finally:
        sampler.stop.set()
        shutil.rmtree(work, ignore_errors=True)
    cols = ["ceiling_pairs_per_s", "bundle_device_cache_pairs_per_s", "bundle_cpu_views_pairs_per_s",
            "lightly_pairs_per_s", "ratio_b_vs_a", "ratio_b_vs_d"]
    print(f"GPU: {gpu}\n| model | " + " | ".join(c.replace("_pairs_per_s", "") for c in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for key in models:
        r = results[key]
        print(f"| {r['backbone']} {r['image_size']} px b{r['batch']} | " + " | ".join(str(r.get(c)) for c in cols) + " |")
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    out = a.json or REPO / "bench" / "results" / f"gpu_pretrain_{slug}{'_smoke' if a.smoke else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
