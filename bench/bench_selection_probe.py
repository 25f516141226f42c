"""What a cold-start selection buys on a frozen embedding: a linear probe per selection.

The fine-tune of a tiny budget (1% of HAM10000's lesions: about 70 images, a handful of optimiser steps) says
more about the fine-tuning recipe than about which images were chosen. A logistic regression on the frozen
backbone's features of exactly the selected images (TypiClust's "supervised on a self-supervised embedding"
setting) isolates the selection. Reads a finished selection study's run folder: its MICLe checkpoint, the
training pool's cached embedding, every ``selection/<strategy>_s<seed>/manifest.csv``; embeds ``val`` (never
the blind set) and prints, per strategy and budget, val balanced accuracy and macro AUC (mean ± std over
seeds). Writes ``bench/results/selection_probe.json``.

    python bench/bench_selection_probe.py runs/ham10000_selection --image-size 32
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from medssl_monai.data import read_manifest
from medssl_monai.experiments.select import embed_manifest, pool_mask, row_keys

OUT = Path(__file__).resolve().parent / "results" / "selection_probe.json"


def probe(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, classes: list[str]) -> dict:
    """Balanced accuracy and macro AUC (one-vs-rest over every class; a class absent from the selection gets
    probability 0) of an L2-regularised logistic regression on L2-normalised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    norm = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
    present = sorted(set(y_tr))
    if len(present) == 1:  # one class only: it is predicted for everything
        prob = np.zeros((len(y_va), len(classes)))
        prob[:, classes.index(present[0])] = 1.0
    else:
        model = LogisticRegression(max_iter=3000, C=1.0).fit(norm(x_tr), y_tr)
        prob = np.zeros((len(y_va), len(classes)))
        prob[:, [classes.index(c) for c in model.classes_]] = model.predict_proba(norm(x_va))
    pred = np.asarray(classes)[prob.argmax(1)]
    onehot = (np.asarray(y_va)[:, None] == np.asarray(classes)[None, :]).astype(int)
    aucs = [roc_auc_score(onehot[:, i], prob[:, i]) for i in range(len(classes)) if 0 < onehot[:, i].sum() < len(y_va)]
    return {"balanced_accuracy": float(balanced_accuracy_score(y_va, pred)), "auc_macro": float(np.mean(aucs)),
            "classes_in_selection": len(present)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--checkpoint", default="pretrain/phase1_micle/micle_medical/models/model.pt")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    args = ap.parse_args()
    run, t0 = args.run, time.perf_counter()
    manifest, ckpt = run / "data" / "manifest.csv", run / args.checkpoint
    arch = {"backbone": args.backbone, "in_channels": args.in_channels, "image_size": args.image_size,
            "cache_dir": run / "selection" / "embedding_cache"}
    raw = read_manifest(manifest, resolve_paths=False)
    label = dict(zip(row_keys(raw), raw["label"]))
    keys_tr, x_tr = embed_manifest(manifest, ckpt, split="train", **arch)
    keys_va, x_va = embed_manifest(manifest, ckpt, split="val", **arch)
    y_va = np.asarray([label[k] for k in keys_va])
    classes = sorted(raw["label"].dropna().unique())
    pos = {k: i for i, k in enumerate(keys_tr)}
    rows = []
    for sel in sorted((run / "selection").glob("*_s*/manifest.csv")):
        strategy, seed = re.match(r"(.+)_s(\d+)$", sel.parent.name).groups()
        copy = read_manifest(sel, resolve_paths=False)
        train = copy[pool_mask(copy, "train")]
        for col in sorted(c for c in copy.columns if re.fullmatch(r"labeled_\d+pct", c)):
            chosen = [pos[k] for k, on in zip(row_keys(train), train[col].astype(str).str.lower() == "true")
                      if on and k in pos and pd.notna(label[k])]
            m = probe(x_tr[chosen], np.asarray([label[keys_tr[i]] for i in chosen]), x_va, y_va, classes)
            rows.append({"strategy": strategy, "seed": int(seed), "fraction": int(col[8:-3]) / 100,
                         "images": len(chosen), **m})
    all_rows = probe(x_tr, np.asarray([label[k] for k in keys_tr]), x_va, y_va, classes)
    df = pd.DataFrame(rows)
    g = df.groupby(["strategy", "fraction"])
    summ = g[["balanced_accuracy", "auc_macro", "images", "classes_in_selection"]].agg(["mean", "std"])
    print(f"{'strategy':<10} {'budget':>6} {'images':>7} {'classes':>7} {'balanced acc':>16} {'macro AUC':>16} seeds")
    for (strategy, frac), r in summ.iterrows():
        print(f"{strategy:<10} {frac:>6.0%} {r[('images', 'mean')]:>7.0f} {r[('classes_in_selection', 'mean')]:>7.1f} "
              f"{r[('balanced_accuracy', 'mean')]:>8.3f} ± {r[('balanced_accuracy', 'std')]:.3f} "
              f"{r[('auc_macro', 'mean')]:>8.3f} ± {r[('auc_macro', 'std')]:.3f} {g.size()[(strategy, frac)]}")
    print(f"every training image ({len(keys_tr)}): balanced acc {all_rows['balanced_accuracy']:.3f}, "
          f"macro AUC {all_rows['auc_macro']:.3f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": {"run": str(run), "checkpoint_sha256": None, "val_images": len(keys_va),
                                        "train_images": len(keys_tr), "seconds": round(time.perf_counter() - t0, 1)},
                               "all_training_images": all_rows, "rows": rows}, indent=1) + "\n")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
