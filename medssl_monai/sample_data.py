"""Generate ``sample_data/``: a small, label-bearing DICOM study tree with the traps of a real PACS export.

The images are synthetic (so they can be shipped and regenerated anywhere) but the headers are real DICOM:
several patients, several studies and images per patient, opaque file names, one patient split across two
folders, mixed studies in one folder, MONOCHROME1 and rescaled 16-bit images, an RLE-compressed and a
multi-frame instance, pydicom's own sample files, and a few files an index must skip. Each class has its
own structure and each patient its own texture, so two images of one patient share something (MICLe's
premise) and labels are learnable.

    python -m medssl_monai.sample_data sample_data
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

__all__ = ["CLASSES", "make_sample_data", "synthetic_image", "write_dicom"]

CLASSES = ("normal", "nodule", "effusion")
CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")  # Computed Radiography Image Storage
_ROOT = "1.2.826.0.1.3680043.10.1431."  # a UID prefix for generated sample objects


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    patient_id: str | None,
    patient_name: str = "",
    birth_date: str = "",
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    instance_number: int = 1,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    view_position: str = "",
    body_part: str = "",
    sop_class: str = CR_STORAGE,
    compress_rle: bool = False,
    include_pixels: bool = True,
) -> Path:
    """Write a real DICOM Part 10 file (preamble, file meta, explicit VR little endian or RLE)."""
    pixels = np.asarray(pixels)
    frames = pixels.shape[0] if pixels.ndim == 3 and photometric.startswith("MONO") else 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(sop_uid)
    ds.StudyInstanceUID = UID(study_uid)
    ds.SeriesInstanceUID = UID(series_uid)
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = birth_date
    ds.Modality = modality
    ds.InstanceNumber = instance_number
    ds.SeriesNumber = 1
    ds.ViewPosition = view_position
    ds.BodyPartExamined = body_part
    ds.StudyDate = "20240101"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if photometric == "RGB" else pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelSpacing = [0.5, 0.5]
    if include_pixels:
        ds.PixelData = pixels.tobytes()
        if compress_rle:
            ds.compress(RLELossless, arr=pixels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def synthetic_image(label: int, patient_seed: int, image_seed: int, size: int = 64) -> np.ndarray:
    """A 12-bit radiograph-like image: a class-specific structure on a patient-specific texture."""
    prng = np.random.default_rng(patient_seed)
    irng = np.random.default_rng(image_seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    # patient texture: a few fixed low-frequency waves (shared by every image of that patient)
    texture = sum(np.sin(2 * np.pi * (prng.uniform(1, 4) * xx + prng.uniform(1, 4) * yy) + prng.uniform(0, 6))
                  for _ in range(3)) / 3
    img = 0.35 + 0.15 * texture + 0.05 * irng.standard_normal((size, size))
    cx, cy = 0.5 + irng.uniform(-0.15, 0.15, 2)  # pose differs between images of one patient
    if label == 1:  # nodule: a bright compact blob
        r2 = (xx - cx) ** 2 + (yy - cy) ** 2
        img += 0.45 * np.exp(-r2 / (2 * 0.06**2))
    elif label == 2:  # effusion: a bright band at the bottom with a meniscus
        level = 0.65 + irng.uniform(-0.08, 0.08)
        img += 0.4 / (1 + np.exp(-(yy - level - 0.1 * (xx - 0.5) ** 2) * 40))
    return (np.clip(img, 0, 1) * 4095).astype(np.uint16)


def make_sample_data(out: str | Path, n_patients: int = 12, seed: int = 0, size: int = 64) -> dict[str, int]:
    """Write the sample tree and ``labels.csv`` under ``out`` (replacing a previous sample)."""
    out = Path(out)
    tree = out / "dicom"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = []
    n_files = 0
    for p in range(n_patients):
        label = p % len(CLASSES)
        pid = f"SMP{p + 1:03d}"
        name = f"SAMPLE^PATIENT{p + 1:03d}"
        birth = f"19{50 + p:02d}0{1 + p % 9}1{p % 10}"
        labels.append({"patient_id": pid, "label": CLASSES[label]})
        n_studies = 1 + (p % 3 == 0)  # some patients come back for a second study
        for s in range(n_studies):
            study_uid = generate_uid(_ROOT, entropy_srcs=[pid, str(s), str(seed)])
            series_uid = generate_uid(_ROOT, entropy_srcs=[pid, str(s), "series", str(seed)])
            # the export's folder layout: numbered "exam" folders, several patients' studies interleaved,
            # one patient's second study in a different folder (group by tags, never by folder)
            folder = tree / f"EXAM{(p * 7 + s * 3) % 5:02d}"
            n_images = int(rng.integers(2, 5))
            for i in range(n_images):
                img = synthetic_image(label, patient_seed=seed * 1000 + p, image_seed=seed * 100000 + p * 100 + s * 10 + i,
                                      size=size)
                mono1 = (p + i) % 5 == 0
                stored = (4095 - img) if mono1 else img
                sop_uid = generate_uid(_ROOT, entropy_srcs=[pid, str(s), str(i), str(seed)])
                write_dicom(
                    folder / f"IM{n_files:05X}", stored.astype(np.uint16), patient_id=pid, patient_name=name,
                    birth_date=birth, study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid,
                    instance_number=i + 1, photometric="MONOCHROME1" if mono1 else "MONOCHROME2",
                    rescale=(1.0, -1024.0) if p % 2 else None, view_position="PA" if i % 2 == 0 else "AP",
                    body_part="CHEST", compress_rle=(i == 1 and p % 4 == 1),
                )
                n_files += 1
    # a multi-frame secondary capture for the first patient: frames are extra views of that patient
    frames = np.stack([synthetic_image(0, seed * 1000, 999 + k, size) for k in range(3)]).astype(np.uint16)
    write_dicom(tree / "EXAM00" / "MF00001", frames, patient_id="SMP001", patient_name="SAMPLE^PATIENT001",
                study_uid=generate_uid(_ROOT, entropy_srcs=["SMP001", "mf", str(seed)]),
                series_uid=generate_uid(_ROOT, entropy_srcs=["SMP001", "mf-series", str(seed)]),
                sop_uid=generate_uid(_ROOT, entropy_srcs=["SMP001", "mf-sop", str(seed)]),
                modality="OT", sop_class="1.2.840.10008.5.1.4.1.1.7.3")  # multi-frame grayscale word SC
    n_files += 1
    # pydicom's own sample files (shipped inside the pydicom wheel): real CT/MR headers, unlabelled
    from pydicom.data import get_testdata_file

    extra = tree / "EXTERNAL"
    extra.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "test-SR.dcm"):
        src = get_testdata_file(name, download=False)
        if src is not None:
            shutil.copy(src, extra / f"X{n_files:05X}")
            n_files += 1
    # files an index has to skip without stopping
    (extra / "NOTES.TXT").write_text("export notes: not an image\n")
    (extra / "EMPTY").write_bytes(b"")
    lab = pd.DataFrame(labels)
    lab.to_csv(out / "labels.csv", index=False)
    return {"patients": n_patients, "files": n_files}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="sample_data")
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    info = make_sample_data(args.out, args.patients, args.seed, args.size)
    print(f"sample data: {info['files']} files, {info['patients']} labelled patients -> {args.out}/dicom, "
          f"{args.out}/labels.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
