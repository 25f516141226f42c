"""``make demo``: the main job on the generated sample data, end to end.

Generates ``sample_data/`` (a small DICOM study tree with labels), then runs ``configs/pipeline_demo.json``:
index (pseudonymised) -> patient split -> MICLe pretraining -> fine-tuning -> evaluation on the test split,
each phase through its MONAI bundle. ``--config`` runs another pipeline config (e.g. a real DICOM folder).

The demo config ships inside the package (``medssl_monai/configs`` is a link to the top-level ``configs/``),
so an installed wheel runs the demo too; its sample data and run folder go under ``--workdir`` (the current
folder: the repository root for ``make demo``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from .experiments.config import load_config
from .reporting.pipeline_report import DEMO_NOTE, run_pipeline_and_report
from .sample_data import make_sample_data


def demo_config() -> Path:
    """The shipped ``pipeline_demo.json`` (package data, in a checkout and in a wheel alike)."""
    return Path(str(resources.files("medssl_monai").joinpath("configs", "pipeline_demo.json")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="a pipeline config (default: the shipped demo config)")
    ap.add_argument("--workdir", default=".", help="where the demo's sample_data/ and runs/demo/ go")
    ap.add_argument("--patients", type=int, default=30, help="patients in the generated sample")
    ap.add_argument("--force", action="store_true", help="re-run every phase")
    args = ap.parse_args(argv)
    t0 = time.time()
    cfg = load_config(args.config or demo_config())
    if args.config is None:
        workdir = Path(args.workdir).resolve()
        # the demo config's @ paths (@../sample_data, @../runs/demo) are written from a configs/ folder beside
        # them: resolve them from <workdir>/configs, wherever the package (and so the file) is installed
        cfg["_base"] = str(workdir / "configs")
        info = make_sample_data(workdir / "sample_data", n_patients=args.patients)
        print(f"sample data: {info['files']} files, {info['patients']} labelled patients -> "
              f"{workdir / 'sample_data'}")
        args.force = True  # a regenerated sample invalidates earlier results
    # the shipped config runs on generated images: its report says so before any number
    roots = run_pipeline_and_report(cfg, force=args.force, note=DEMO_NOTE if args.config is None else None)
    if "evaluate" in roots:
        ev = next(iter(roots.values())).parents[1]
        metrics_file = roots["evaluate"] / "output" / f"eval_{cfg['phases']['evaluate'].get('eval_split', 'test')}" \
            / "metrics.json"
        metrics = json.loads(metrics_file.read_text())
        print("\ntest-split metrics: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items())
                                                  if not k.startswith("auc_") or k == "auc_macro"))
        print(f"run folder: {ev}  (configs/, logs/, data/, and one bundle copy per phase with its "
              f"models/, output/tensorboard, output/checkpoints)")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
