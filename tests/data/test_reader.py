"""Pixel loading: Modality LUT, MONOCHROME1, YBR->RGB, frames, codecs, PNG/JPEG/NIfTI, series, MONAI pipelines.

Expected values are computed in the tests from pydicom's raw stored values and the header formulas, not by
calling the reader's own helpers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, ScaleIntensityd
from PIL import Image

from medssl_monai.data import (
    LoadManifestImage,
    LoadManifestImaged,
    MissingCodecError,
    index_tree,
    read_dicom_frame,
    read_series,
    series_folder_image,
)
from medssl_monai.sample_data import synthetic_image, write_dicom


def _raw(path: str) -> tuple[np.ndarray, pydicom.Dataset]:
    ds = pydicom.dcmread(path)
    return ds.pixel_array, ds


def test_modality_lut_ct(pydicom_test_file) -> None:
    path = pydicom_test_file("CT_small.dcm")
    raw, ds = _raw(path)
    expected = raw.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img = LoadManifestImage()(path)
    assert isinstance(img, MetaTensor) and img.shape == (1, ds.Rows, ds.Columns) and img.dtype == torch.float32
    np.testing.assert_allclose(img[0].numpy(), expected, atol=1e-3)
    assert img.min() < 0  # Hounsfield units, not stored values


def test_monochrome1_inverted_with_rescale(dicom_data: Path) -> None:
    path = str(dicom_data / "pydicom_dicomdirtests" / "77654033" / "CR1" / "6154")
    raw, ds = _raw(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    slope, intercept, bits = float(ds.RescaleSlope), float(ds.RescaleIntercept), int(ds.BitsStored)
    hu = raw * slope + intercept
    lo, hi = intercept, (2**bits - 1) * slope + intercept
    expected = lo + hi - hu  # the brightest stored value becomes the darkest
    img = LoadManifestImage()(path)
    np.testing.assert_allclose(img[0].numpy(), expected, rtol=1e-5, atol=1e-3)
    assert np.corrcoef(img[0].numpy().ravel(), raw.ravel())[0, 1] < -0.99


def test_monochrome1_matches_monochrome2_twin(tmp_path: Path) -> None:
    """The same picture stored as MONOCHROME1 and as MONOCHROME2 must load identically."""
    img = synthetic_image(1, 3, 4, 32)
    common = dict(patient_id="P", study_uid="1.2", series_uid="1.2.1", rescale=(1.0, -1024.0))
    a = write_dicom(tmp_path / "m2.dcm", img, sop_uid="1.2.1.1", **common)
    b = write_dicom(tmp_path / "m1.dcm", (4095 - img).astype(np.uint16), sop_uid="1.2.1.2",
                    photometric="MONOCHROME1", **common)
    np.testing.assert_allclose(LoadManifestImage()(str(a)).numpy(), LoadManifestImage()(str(b)).numpy())
    np.testing.assert_allclose(LoadManifestImage()(str(a))[0].numpy(), img - 1024.0)


def test_ybr_to_rgb(pydicom_test_file) -> None:
    rgb = LoadManifestImage()(pydicom_test_file("SC_rgb_dcmtk_+eb+cr.dcm"))
    for name in ("SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        ybr = LoadManifestImage()(pydicom_test_file(name))
        assert ybr.shape == rgb.shape == (3, 100, 100)
        assert (ybr - rgb).abs().mean() < 3.0, name  # chroma subsampling / JPEG loss only
    # and the raw YBR values really are far from RGB (so the test above is not vacuous)
    raw = pydicom.pixels.pixel_array(pydicom_test_file("SC_rgb_dcmtk_+eb+cy+np.dcm"), raw=True)
    assert np.abs(np.moveaxis(raw, -1, 0).astype(float) - rgb.numpy()).mean() > 30


def test_frame_selection(pydicom_test_file, tmp_path: Path) -> None:
    path = pydicom_test_file("SC_rgb_rle_2frame.dcm")
    full = pydicom.dcmread(path).pixel_array  # (2, H, W, 3)
    for k in (0, 1):
        img = LoadManifestImage()({"path": path, "frame_index": k})
        np.testing.assert_array_equal(img.numpy(), np.moveaxis(full[k], -1, 0).astype(np.float32))
    with pytest.raises(IndexError, match="frame 2 out of range"):
        read_dicom_frame(path, 2)
    # expanded multi-frame manifest rows load their own frame
    frames = np.stack([synthetic_image(k % 3, 5, k, 16) for k in range(3)])
    write_dicom(tmp_path / "t" / "mf.dcm", frames, patient_id="MF", study_uid="1.9", series_uid="1.9.1",
                sop_uid="1.9.1.1", sop_class="1.2.840.10008.5.1.4.1.1.7.3")
    m = index_tree(tmp_path / "t", expand_frames=True).manifest
    loaded = LoadManifestImaged(keys="image")({"image": m.iloc[2].to_dict()})["image"]
    np.testing.assert_array_equal(loaded[0].numpy(), frames[2].astype(np.float32))


def test_rle_compressed_matches_uncompressed(tmp_path: Path) -> None:
    img = synthetic_image(2, 1, 1, 32)
    kw = dict(patient_id="P", study_uid="1.2", series_uid="1.2.1")
    a = write_dicom(tmp_path / "a.dcm", img, sop_uid="1.2.1.1", **kw)
    b = write_dicom(tmp_path / "b.dcm", img, sop_uid="1.2.1.2", compress_rle=True, **kw)
    assert pydicom.dcmread(b).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    np.testing.assert_array_equal(LoadManifestImage()(str(a)).numpy(), LoadManifestImage()(str(b)).numpy())


def test_missing_codec_error_and_sitk_fallback(pydicom_test_file) -> None:
    path = pydicom_test_file("MR_small_jpeg_ls_lossless.dcm")
    if pydicom.pixels.get_decoder(pydicom.uid.JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here; the missing-codec path cannot be exercised")
    with pytest.raises(MissingCodecError) as err:
        read_dicom_frame(path, sitk_fallback=False)
    msg = str(err.value)
    assert path in msg and "JPEG-LS Lossless" in msg and "1.2.840.10008.1.2.4.80" in msg and "pip install" in msg
    # SimpleITK (GDCM) decodes it: lossless, so it equals the uncompressed twin exactly
    decoded = LoadManifestImage()(path)
    assert decoded.meta["decoded_by"] == "simpleitk"
    np.testing.assert_array_equal(decoded.numpy(), LoadManifestImage()(pydicom_test_file("MR_small.dcm")).numpy())


def test_jpeg_png_via_monai(ham10000: Path, tmp_path: Path) -> None:
    from PIL import Image

    jpg = next((ham10000 / "images").glob("*.jpg"))
    ref = np.asarray(Image.open(jpg).convert("RGB"), dtype=np.float32)  # (H, W, 3)
    img = LoadManifestImage()({"path": str(jpg), "source": "image"})
    assert img.shape == (3, ref.shape[0], ref.shape[1])
    np.testing.assert_array_equal(img.numpy(), np.moveaxis(ref, -1, 0))
    gray = (np.arange(20 * 30) % 256).astype(np.uint8).reshape(20, 30)
    Image.fromarray(gray).save(tmp_path / "g.png")
    g1 = LoadManifestImage()(str(tmp_path / "g.png"))
    g3 = LoadManifestImage(in_channels=3)(str(tmp_path / "g.png"))
    assert g1.shape == (1, 20, 30) and g3.shape == (3, 20, 30)
    np.testing.assert_array_equal(g1[0].numpy(), gray)
    assert torch.equal(g3[0], g3[2])


def test_nifti_slices(tmp_path: Path) -> None:
    import nibabel as nib

    vol = np.random.default_rng(0).random((10, 12, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    m = index_tree(tmp_path).manifest
    for k in range(4):
        img = LoadManifestImage()(m.iloc[k].to_dict())
        np.testing.assert_allclose(img[0].numpy(), vol[:, :, k])


def test_series_volume_sorted_by_position(dicom_data: Path) -> None:
    folder = dicom_data / "pydicom_dicomdirtests" / "77654033" / "CT2"
    files = sorted(folder.iterdir())
    vol = read_series(files)
    assert vol.shape == (1, len(files), 16, 16)
    # independent order: ImagePositionPatient along the slice normal, read with pydicom
    dss = [pydicom.dcmread(f) for f in files]
    normal = np.cross(*np.array(dss[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    order = np.argsort([float(np.dot(normal, np.array(d.ImagePositionPatient, dtype=float))) for d in dss])
    for z, i in enumerate(order):
        expected = dss[i].pixel_array * float(dss[i].RescaleSlope) + float(dss[i].RescaleIntercept)
        np.testing.assert_allclose(vol[0, z].numpy(), expected)


def test_manifest_in_monai_dataset(dicom_data: Path) -> None:
    m = index_tree(dicom_data).manifest
    rows = [{"image": r} for r in m.to_dict("records")]
    pipeline = Compose([LoadManifestImaged(keys="image", in_channels=1), ScaleIntensityd(keys="image")])
    batch = next(iter(DataLoader(Dataset(rows[:8], pipeline), batch_size=4)))
    assert batch["image"].shape[:2] == (4, 1) and float(batch["image"].max()) <= 1.0


def test_bad_path_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.dcm"):
        LoadManifestImage()(str(tmp_path / "nope.dcm"))
    with pytest.raises(ValueError, match="read_manifest"):
        LoadManifestImage()({"path": "pm:abc"})


def test_dicom_series_folder(tmp_path: Path) -> None:
    """A series folder (how MONAI Label's DICOMweb datastore hands over an image id) loads as its one image,
    or as the middle instance by Instance Number; other files in the folder are ignored."""
    one = tmp_path / "one"
    one.mkdir()
    img = synthetic_image(2, 1, 0, 24)
    write_dicom(one / "1.2.3.1.dcm", img, patient_id="P", study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.1")
    (one / "notes.txt").write_text("not DICOM")
    folder = LoadManifestImaged(keys="image", in_channels=1)({"image": str(one)})["image"]
    np.testing.assert_array_equal(folder.numpy(), LoadManifestImage(in_channels=1)(str(one / "1.2.3.1.dcm")).numpy())

    stack = tmp_path / "stack"
    stack.mkdir()
    for n in (3, 1, 2):  # file names in another order than the Instance Numbers
        write_dicom(stack / f"z{4 - n}.dcm", synthetic_image(0, n, 0, 16), patient_id="P", study_uid="1.2",
                    series_uid="1.2.4", sop_uid=f"1.2.4.{n}", instance_number=n)
    assert Path(series_folder_image(stack)).name == "z2.dcm"  # instance 2 of 1..3
    np.testing.assert_array_equal(LoadManifestImage()(str(stack))[0].numpy(), synthetic_image(0, 2, 0, 16))

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"empty: a folder without DICOM images"):
        LoadManifestImage()(str(empty))


def test_former_channel_and_cache_keywords_still_work_with_a_warning(tmp_path: Path) -> None:
    """``channels`` (the loaders, ``eval_dataset``) is the former name of ``in_channels`` and
    ``eval_dataset(cache=)`` of ``in_memory`` ("cache" is the decoded-image cache only): same result, a warning."""
    import pandas as pd
    from monai.data import CacheDataset

    from medssl_monai.bundle.data import eval_dataset

    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.warns(FutureWarning, match="channels.*in_channels"):
        old = LoadManifestImage(channels=1)(str(tmp_path / "c.png"))
    np.testing.assert_array_equal(old.numpy(), LoadManifestImage(in_channels=1)(str(tmp_path / "c.png")).numpy())
    with pytest.warns(FutureWarning, match="channels.*in_channels"):
        assert LoadManifestImaged(keys="image", channels=3).loader.in_channels == 3
    rows = pd.DataFrame({"path": [str(tmp_path / "c.png")], "sop_uid": ["1.2.3"], "patient_id": ["p"]})
    with pytest.warns(FutureWarning, match="cache.*in_memory"):
        ds = eval_dataset(rows, 4, in_channels=1, cache=True)
    assert isinstance(ds, CacheDataset)
    new = eval_dataset(rows, 4, in_channels=1, in_memory=True)
    assert isinstance(new, CacheDataset) and torch.equal(ds[0]["image"], new[0]["image"])
    assert not isinstance(eval_dataset(rows, 4, 1), CacheDataset) and ds[0]["image"].shape == (1, 4, 4)
