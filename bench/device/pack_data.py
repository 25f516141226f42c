"""Pack a compact copy of HAM10000 and imagenette's train half for a run on the lent GPU machine.

The device tool sends at most 64 MiB (repository included) and cannot see ``../shared``; the GPU study
reads this copy instead: HAM10000 re-encoded at its own 200x150 size (JPEG quality ``--ham-quality``), and
imagenette's train images (224x224) resized to ``--natural-size`` px squares. Same files, same metadata
and splits; what changes is the JPEG encoding and, for imagenette, the resolution.

    python bench/device/pack_data.py ../shared/data .gpu_data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from PIL import Image


def _save(src: Path, dst: Path, size: tuple[int, int] | None, quality: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im = im.convert("RGB")
        if size is not None and im.size != size:
            im = im.resize(size, Image.BICUBIC)
        im.save(dst, quality=quality)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shared", type=Path, help="the shared data folder (holds ham10000/ and imagenette/)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--ham-quality", type=int, default=80)
    ap.add_argument("--natural-size", type=int, default=128)
    ap.add_argument("--natural-quality", type=int, default=85)
    ap.add_argument("--no-blind", action="store_true",
                    help="leave out the blind test set (blind/ham10000_test: predicted by every fine-tuned model)")
    ap.add_argument("--natural-val-per-class", type=int, default=0,
                    help="also pack this many imagenette val images per class (phase 1's k-NN, supervised arm)")
    a = ap.parse_args()
    meta = pd.read_csv(a.shared / "ham10000" / "metadata.csv")
    for p in meta["path"]:
        out = a.out / "ham10000" / p
        if not out.is_file():
            _save(a.shared / "ham10000" / p, out, None, a.ham_quality)
    meta.to_csv(a.out / "ham10000" / "metadata.csv", index=False)
    n = 0
    for src in sorted((a.shared / "imagenette" / "train").rglob("*.JPEG")):
        out = a.out / "imagenette" / src.relative_to(a.shared / "imagenette")
        if not out.is_file():
            _save(src, out, (a.natural_size, a.natural_size), a.natural_quality)
        n += 1
    if a.natural_val_per_class > 0:
        for cls in sorted(p for p in (a.shared / "imagenette" / "val").iterdir() if p.is_dir()):
            for src in sorted(cls.glob("*.JPEG"))[: a.natural_val_per_class]:
                out = a.out / "imagenette" / src.relative_to(a.shared / "imagenette")
                if not out.is_file():
                    _save(src, out, (a.natural_size, a.natural_size), a.natural_quality)
                n += 1
    blind = a.shared / "blind" / "ham10000_test"
    if not a.no_blind and (blind / "images.csv").is_file():  # same JPEG re-encoding as HAM10000's own images
        images = pd.read_csv(blind / "images.csv", dtype=str)
        for p in images["path"]:
            out = a.out / "blind" / "ham10000_test" / p
            if not out.is_file():
                _save(blind / p, out, None, a.ham_quality)
        images.to_csv(a.out / "blind" / "ham10000_test" / "images.csv", index=False)
        print(f"{len(images)} blind test images (predicted only, never trained or chosen on)")
    size = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file()) / 2**20
    print(f"{len(meta)} HAM10000 images, {n} imagenette images -> {a.out} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
