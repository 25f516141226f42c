"""``make demo``: the main job on the generated sample data.

Today it runs the data-layer stages of the pipeline: generate ``sample_data/`` -> index the DICOM tree
(pseudonymised, labels joined) -> patient-level split with nested label fractions -> summary. MICLe
pretraining, fine-tuning and the report are added to this same command as the engines land.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import main as cli_main
from .data import MultiInstanceIndex, check_no_leakage, read_manifest
from .sample_data import make_sample_data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="sample_data", help="a DICOM folder, or where to generate the sample")
    ap.add_argument("--labels", default=None, help="labels CSV (patient_id,label); default: the sample's")
    ap.add_argument("--run-dir", default="runs/demo")
    args = ap.parse_args(argv)

    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    if args.data == "sample_data":
        info = make_sample_data(data)
        print(f"[1/3] generated sample data: {info['files']} files, {info['patients']} labelled patients")
        tree, labels = data / "dicom", data / "labels.csv"
    else:
        tree, labels = data, Path(args.labels) if args.labels else None
    manifest = run / "manifest.csv"
    print(f"[2/3] indexing {tree} (pseudonymised; salt in {run / 'salt.key'})")
    index_args = ["index", str(tree), "--out", str(manifest), "--pseudonymize", str(run / "salt.key"), "--full"]
    if labels is not None:
        index_args += ["--labels", str(labels)]
    rc = cli_main(index_args)
    if rc != 0:
        return rc
    print("[3/3] patient-level split with nested label fractions")
    rc = cli_main(["split", str(manifest), "--fractions", "train=0.6,val=0.2,test=0.2",
                   "--label-fractions", "0.1,0.2,1.0", "--seed", "0"])
    if rc != 0:
        return rc
    df = read_manifest(manifest)
    check_no_leakage(df)
    idx = MultiInstanceIndex(df)
    s = idx.summary()
    print(f"\nMICLe-ready groups: {s['multi_image_groups']} of {s['groups']} patients have 2+ images "
          f"({s['images']} images). Manifest: {manifest} (paths resolve through {manifest.stem}.pathmap.csv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
