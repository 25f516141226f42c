"""``make demo``: the main job on the generated sample data, end to end.

Generates ``sample_data/`` (a small DICOM study tree with labels), then runs ``configs/pipeline_demo.json``:
index (pseudonymised) -> patient split -> MICLe pretraining -> fine-tuning -> evaluation on the test split,
each phase through its MONAI bundle. ``--config`` runs another pipeline config (e.g. a real DICOM folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .pipeline import load_pipeline_config, run_pipeline
from .sample_data import make_sample_data

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "pipeline_demo.json"))
    ap.add_argument("--patients", type=int, default=30, help="patients in the generated sample")
    ap.add_argument("--force", action="store_true", help="re-run every phase")
    args = ap.parse_args(argv)
    t0 = time.time()
    cfg = load_pipeline_config(args.config)
    if Path(args.config).resolve() == (REPO / "configs" / "pipeline_demo.json").resolve():
        info = make_sample_data(REPO / "sample_data", n_patients=args.patients)
        print(f"sample data: {info['files']} files, {info['patients']} labelled patients -> sample_data/")
        args.force = True  # a regenerated sample invalidates earlier results
    roots = run_pipeline(cfg, force=args.force)
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
