"""Load one manifest row as a 2-D channel-first ``MetaTensor`` (MONAI array and dictionary transforms).

DICOM pixel data needs more than a raw array to be comparable across scanners: the Modality LUT (rescale
slope/intercept) gives physical units, MONOCHROME1 must be inverted so that bright means dense everywhere,
YBR must become RGB, and one frame must be chosen from a multi-frame object. MONAI's ``PydicomReader``
loads volumes; this reader does the 2-D, per-instance work the contrastive pipeline needs and falls back
to SimpleITK (GDCM inside) when no pydicom plugin can decode a transfer syntax.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import UID

from ..utils.deprecation import renamed_arg
from .bad_images import UnreadableImageError
from .privacy import silence_pydicom_logger
from .run_context import image_key

__all__ = [
    "LoadManifestImage",
    "LoadManifestImaged",
    "MissingCodecError",
    "read_dicom_frame",
    "read_series",
    "series_folder_image",
]

_CODEC_HINT = "pip install 'medssl-monai[codecs]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, python-gdcm)"


class MissingCodecError(RuntimeError):
    """No installed decoder handles a file's transfer syntax."""


def _frame_rescale(ds: pydicom.Dataset, frame: int) -> tuple[float, float] | None:
    """Slope/intercept of enhanced multi-frame objects, stored per frame or shared in functional groups."""
    for seq_name, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_name)
        if seq and len(seq) > idx:
            pvt = seq[idx].get("PixelValueTransformationSequence")
            if pvt:
                return float(pvt[0].get("RescaleSlope", 1.0)), float(pvt[0].get("RescaleIntercept", 0.0))
    return None


def _apply_lut(arr: np.ndarray, ds: pydicom.Dataset, frame: int) -> tuple[np.ndarray, float, float]:
    """Modality LUT -> float32, plus the transformed range of possible stored values (for MONOCHROME1)."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    per_frame = _frame_rescale(ds, frame) if "RescaleSlope" not in ds else None
    if per_frame is not None:
        slope, intercept = per_frame
        out = arr.astype(np.float32) * slope + intercept
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
        return out, lo, hi
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        out = apply_modality_lut(arr, ds).astype(np.float32)
        bounds = apply_modality_lut(np.array([lo, hi], dtype=np.int64), ds).astype(np.float64)
        return out, float(bounds.min()), float(bounds.max())
    return arr.astype(np.float32), float(lo), float(hi)


def _decode_with_sitk(path: str, frame: int) -> np.ndarray:
    import SimpleITK as sitk

    img = sitk.ReadImage(path)  # GDCM applies rescale slope/intercept and converts YBR to RGB itself
    arr = sitk.GetArrayFromImage(img)
    if img.GetDimension() == 3:
        arr = arr[frame]
    return arr


def read_dicom_frame(path: str | os.PathLike, frame: int | None = None, sitk_fallback: bool = True
                     ) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode one frame of a DICOM file as float32 ``(C, H, W)`` plus a small, identifier-free meta dict."""
    path = str(path)
    silence_pydicom_logger()
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ValueError(f"{path}: DICOM without pixel data")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frame = 0 if frame is None else int(frame)
    if not 0 <= frame < n_frames:
        raise IndexError(f"{path}: frame {frame} out of range (the object has {n_frames} frame(s))")
    tsyntax = UID(ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    decoder = get_decoder(tsyntax) if tsyntax.is_compressed else None
    via_sitk = False
    if decoder is not None and not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        message = (f"{path}: cannot decode transfer syntax '{tsyntax.name}' ({tsyntax}): no pydicom decoding "
                   f"plugin is installed for it ({missing}). Install one: {_CODEC_HINT}")
        if not sitk_fallback:
            raise MissingCodecError(message)
        try:
            arr = _decode_with_sitk(path, frame)
            via_sitk = True
        except Exception as err:
            raise MissingCodecError(message + f"; the SimpleITK/GDCM fallback failed too ({err})") from None
    else:
        try:
            arr = pixel_array(ds, index=frame if n_frames > 1 else None)  # YBR -> RGB is pydicom's default
        except Exception as err:  # pydicom's messages ("bytes of pixel data ... less than expected") lack the file
            raise ValueError(f"{path}: cannot decode pixel data ({err})") from err
    if photometric == "PALETTE COLOR" and not via_sitk:
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # (H, W, 3) colour
        img = np.moveaxis(arr.astype(np.float32), -1, 0)
    else:
        if via_sitk:
            img, lo, hi = arr.astype(np.float32), float(arr.min()), float(arr.max())
        else:
            img, lo, hi = _apply_lut(arr, ds, frame)
        if photometric == "MONOCHROME1":
            img = (lo + hi) - img
        img = img[None]
    meta = {
        "filename_or_obj": path,
        "frame_index": frame,
        "frames": n_frames,
        "photometric": photometric,
        "modality": str(ds.get("Modality", "")),
        "transfer_syntax": str(tsyntax),
        "decoded_by": "simpleitk" if via_sitk else "pydicom",
    }
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is not None and len(spacing) == 2:
        meta["pixdim"] = [float(spacing[0]), float(spacing[1])]
    return np.ascontiguousarray(img), meta


def read_series(paths: Sequence[str | os.PathLike]) -> MetaTensor:
    """Read one series as a ``(1, D, H, W)`` volume with SimpleITK, slices ordered by position.

    For what pydicom alone does not do: sorting slices by Image Position along the normal and building the
    3-D geometry (spacing, direction) that a 2-D slice pipeline never needs.
    """
    import SimpleITK as sitk

    if not paths:
        raise ValueError("read_series: no files given")
    reader = sitk.ImageSeriesReader()
    folder = str(Path(paths[0]).parent)
    wanted = {os.path.abspath(p) for p in paths}
    ordered: list[str] = []
    for sid in reader.GetGDCMSeriesIDs(folder) or []:
        ordered += [f for f in reader.GetGDCMSeriesFileNames(folder, sid) if os.path.abspath(f) in wanted]
    if len(ordered) != len(wanted):  # files spread over folders: fall back to the given order
        ordered = [str(p) for p in paths]
    reader.SetFileNames(ordered)
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    spacing = img.GetSpacing()[::-1]
    affine = np.diag([*spacing, 1.0])
    return MetaTensor(torch.from_numpy(arr[None]), affine=torch.as_tensor(affine),
                      meta={"filename_or_obj": ordered[0], "spacing": list(spacing), "files": len(ordered)})


def series_folder_image(folder: str | os.PathLike) -> str:
    """The DICOM file that stands for a series folder: its only image, or the middle one by Instance Number.

    DICOMweb clients (MONAI Label's DICOMweb datastore among them) hand a series over as a folder of its
    instances; radiographs are one image per series, and for a stack the middle instance matches the middle
    slice this reader takes from a volume. Files that are not DICOM images (no pixel data) are ignored.
    """
    folder = str(folder)
    silence_pydicom_logger()
    found: list[tuple[int, str, str]] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            ds = pydicom.dcmread(entry.path, defer_size=1024)  # pixel data stays on disk
        except Exception:
            continue
        if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            continue
        number = ds.get("InstanceNumber")
        found.append((int(number) if number not in (None, "") else 0, str(ds.get("SOPInstanceUID", "")),
                      entry.path))
    if not found:
        raise FileNotFoundError(f"{folder}: a folder without DICOM images (a series folder holds one DICOM "
                                "file per instance)")
    found.sort()
    return found[len(found) // 2][2]


def _to_channels(img: torch.Tensor, in_channels: int | None, where: str) -> torch.Tensor:
    if in_channels is None or img.shape[0] == in_channels:
        return img
    if img.shape[0] == 4:  # RGBA -> RGB
        img = img[:3]
    if in_channels == 3 and img.shape[0] == 1:
        return img.repeat(3, 1, 1)
    if in_channels == 1 and img.shape[0] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=img.dtype).view(3, 1, 1)
        return (img * w).sum(0, keepdim=True)
    if img.shape[0] == in_channels:
        return img
    raise ValueError(f"{where}: cannot convert a {img.shape[0]}-channel image to {in_channels} channels")


class LoadManifestImage(Transform):
    """Load a manifest row (or a file path) as a 2-D channel-first float32 ``MetaTensor``.

    A path may also be a DICOM series folder (:func:`series_folder_image` picks its image), which is what
    MONAI Label's DICOMweb datastore passes for an image id.

    Args:
        in_channels: force 1 (luma) or 3 (grey replicated, alpha dropped) channels; ``None`` keeps the file's.
        frame: frame of a multi-frame DICOM when the row names none (default 0).
        sitk_fallback: decode through SimpleITK when no pydicom plugin handles the transfer syntax.
        channels: former name of ``in_channels`` (accepted with a ``FutureWarning``).
    """

    @renamed_arg("channels", "in_channels")
    def __init__(self, in_channels: int | None = None, frame: int | None = None, sitk_fallback: bool = True,
                 channels: int | None = None) -> None:
        self.in_channels = in_channels
        self.frame = frame
        self.sitk_fallback = sitk_fallback
        self._image_loader = LoadImage(reader="PILReader", image_only=True, ensure_channel_first=True,
                                       reverse_indexing=False)
        self._nifti_loader = LoadImage(reader="NibabelReader", image_only=True)

    @staticmethod
    def _source(path: str, row: Mapping[Hashable, Any]) -> str:
        src = row.get("source")
        if isinstance(src, str) and src:
            return src
        lower = path.lower()
        if lower.endswith((".nii", ".nii.gz")):
            return "nifti"
        if lower.endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")):
            return "image"
        return "dicom"

    @staticmethod
    def _int(row: Mapping[Hashable, Any], key: str) -> int | None:
        v = row.get(key)
        return None if v is None or pd.isna(v) else int(v)

    def __call__(self, row: Mapping[Hashable, Any] | str | os.PathLike) -> MetaTensor:
        if not isinstance(row, Mapping):
            row = {"path": str(row)}
        path = row.get("path")
        if not isinstance(path, str) or not path:
            raise KeyError(f"manifest row without a 'path': {sorted(map(str, row))}")
        if path.startswith("pm:"):
            raise ValueError(f"{path}: an opaque pseudonymised key: read the manifest with read_manifest() so "
                             "that keys resolve through its private path map")
        if os.path.isdir(path):  # a DICOM series folder (e.g. MONAI Label's DICOMweb datastore): one image of it
            path, row = series_folder_image(path), {**row, "source": "dicom"}
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: image file not found")
        source = self._source(path, row)
        if source == "dicom":
            frame = self._int(row, "frame_index")
            arr, meta = read_dicom_frame(path, frame if frame is not None else self.frame, self.sitk_fallback)
            img = MetaTensor(torch.from_numpy(arr), meta=meta)
        elif source == "nifti":
            vol = self._nifti_loader(path)
            k = self._int(row, "slice_index")
            if vol.ndim >= 3:
                k = vol.shape[2] // 2 if k is None else k
                if not 0 <= k < vol.shape[2]:
                    raise IndexError(f"{path}: slice {k} out of range (volume has {vol.shape[2]} slices)")
                sl = vol[:, :, k]
                sl = sl[..., 0] if sl.ndim == 3 else sl  # drop a time axis
            else:
                sl = vol
            img = MetaTensor(torch.as_tensor(np.asarray(sl), dtype=torch.float32)[None].clone(),
                             meta={"filename_or_obj": path, "slice_index": k})
        else:
            try:
                img = self._image_loader(path)
            except Exception as err:
                raise ValueError(f"{path}: cannot read image ({err})") from err
            img = MetaTensor(img.as_tensor().float(), meta={"filename_or_obj": path})
        out = _to_channels(img.as_tensor(), self.in_channels, path)
        return MetaTensor(out.contiguous(), meta=img.meta)


class LoadManifestImaged(MapTransform):
    """Dictionary version: ``d[key]`` is a path or a manifest row dict and becomes the loaded image.

    For MICLe pairs, ``keys=("image_1", "image_2")`` with one row dict under each key. Any failure to load
    raises :class:`~.bad_images.UnreadableImageError` naming the image by its manifest key (never the resolved
    path of a pseudonymised image), which the ``bad_images`` wrappers turn into a skip. ``channels`` is the
    former name of ``in_channels``.
    """

    @renamed_arg("channels", "in_channels")
    def __init__(self, keys: KeysCollection, in_channels: int | None = None, frame: int | None = None,
                 sitk_fallback: bool = True, allow_missing_keys: bool = False, channels: int | None = None) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadManifestImage(in_channels=in_channels, frame=frame, sitk_fallback=sitk_fallback)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (str, os.PathLike)) and not isinstance(value, Mapping):
                # a bare path: let the row's own frame/slice/source columns (if the dict has them) apply
                row = {k: d[k] for k in ("source", "frame_index", "slice_index") if k in d}
                row["path"] = str(value)
                value = row
            try:
                d[key] = self.loader(value)
            except Exception as err:
                path = value.get("path") if isinstance(value, Mapping) else value
                name = image_key(path) if isinstance(path, str) else str(key)
                reason = str(err)
                if isinstance(path, str) and reason.startswith(f"{path}: "):
                    reason = reason[len(path) + 2:]
                raise UnreadableImageError(name, f"{type(err).__name__}: {reason}") from err
        return d
