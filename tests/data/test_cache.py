"""The decoded-image cache: contents per reader path, disk reuse and rebuild, budget, bad files, shards.

The reference for every reader path is the loader's own output (``LoadManifestImage`` + the [0, 1] scaling
of ``EnsureFloatImage``, what the per-item path feeds the views), resized here by block means (area
interpolation at an integer factor) and rounded to uint8: computed without the cache's resize.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import medssl_monai.data.reader as reader_module
from medssl_monai.data import CacheBudgetError, LoadManifestImage, build_image_cache
from medssl_monai.sample_data import synthetic_image, write_dicom
from medssl_monai.transforms import EnsureFloatImage


def reference(row: dict, h: int, w: int) -> np.ndarray:
    img = EnsureFloatImage(in_channels=3)(LoadManifestImage(in_channels=3)(row))
    x = torch.as_tensor(img).as_subclass(torch.Tensor).double().numpy()
    c, hh, ww = x.shape
    blocks = x.reshape(c, h, hh // h, w, ww // w).mean(axis=(2, 4))
    return np.clip(np.rint(blocks * 255.0), 0, 255)


def reader_rows(tmp_path: Path, pydicom_test_file) -> list[dict]:
    m1 = synthetic_image(1, 3, 4, 32)
    write_dicom(tmp_path / "m1.dcm", (4095 - m1).astype(np.uint16), patient_id="P", study_uid="1.2",
                series_uid="1.2.1", sop_uid="1.2.1.2", photometric="MONOCHROME1", rescale=(1.0, -1024.0))
    rng = np.random.default_rng(0)
    photo = (rng.uniform(0, 1, (40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "p.png")
    Image.fromarray(photo).save(tmp_path / "p.jpg", quality=90)
    vol = rng.normal(100.0, 30.0, (20, 24, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    return [
        {"path": str(tmp_path / "m1.dcm"), "sop_uid": "mono1"},
        {"path": pydicom_test_file("SC_rgb_dcmtk_+eb+cy+np.dcm"), "sop_uid": "ybr"},
        {"path": pydicom_test_file("SC_rgb_rle_2frame.dcm"), "sop_uid": "frames", "frame_index": 1},
        {"path": str(tmp_path / "p.jpg"), "sop_uid": "jpeg"},
        {"path": str(tmp_path / "p.png"), "sop_uid": "png"},
        {"path": str(tmp_path / "v.nii.gz"), "sop_uid": "nifti", "slice_index": 3},
    ]


def test_cache_equals_loader_output_for_every_reader_path(tmp_path: Path, pydicom_test_file) -> None:
    rows = reader_rows(tmp_path, pydicom_test_file)
    for row in rows:
        full = LoadManifestImage(in_channels=3)(row)
        h, w = full.shape[1] // 2, full.shape[2] // 2
        cache = build_image_cache([row], (h, w), in_channels=3, cache_dir=tmp_path / "cache", progress=False)
        assert not cache.failures, cache.failures
        got = cache.images[0].numpy().astype(np.float64)
        assert cache.images.dtype == torch.uint8 and got.shape == (3, h, w)
        want = reference(row, h, w)
        assert np.abs(got - want).max() <= 1, row["sop_uid"]  # rounding only
        assert got.std() > 5, row["sop_uid"]  # a real picture, not a constant
    # the frame really is the one asked for: frame 0 differs
    frame0 = build_image_cache([{**rows[2], "frame_index": 0}], (50, 50), progress=False).images[0]
    frame1 = build_image_cache([rows[2]], (50, 50), progress=False).images[0]
    assert not torch.equal(frame0, frame1)


def _pngs(folder: Path, n: int, size: tuple[int, int] = (24, 32)) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray((rng.uniform(0, 255, (*size, 3))).astype(np.uint8)).save(p)
        rows.append({"path": str(p), "sop_uid": f"uid{i}", "patient_id": f"pat{i // 2}"})
    return pd.DataFrame(rows)


@pytest.fixture
def count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = reader_module.LoadManifestImage.__call__

    def counting(self, row):
        calls.append(str(row["path"]) if isinstance(row, dict) else str(row))
        return original(self, row)

    monkeypatch.setattr(reader_module.LoadManifestImage, "__call__", counting)
    return calls


def test_disk_cache_reused_and_changed_row_rebuilt(tmp_path: Path, count_decodes: list[str]) -> None:
    rows = _pngs(tmp_path / "img", 6)
    store = tmp_path / "cache"
    first = build_image_cache(rows, (12, 16), cache_dir=store, progress=False)
    assert len(count_decodes) == 6 and first.decoded == 6
    count_decodes.clear()
    second = build_image_cache(rows, (12, 16), cache_dir=store, progress=False)
    assert count_decodes == [] and second.decoded == 0  # read, not decoded
    assert torch.equal(first.images, second.images)
    # a subset in another order (another split, the k-NN monitor's sample) is served from the same store
    sub = build_image_cache(rows.iloc[[4, 1]], (12, 16), cache_dir=store, progress=False)
    assert count_decodes == [] and torch.equal(sub.images, first.images[[4, 1]])
    # another source size is another store: decoded again
    build_image_cache(rows, (6, 8), cache_dir=store, progress=False)
    assert len(count_decodes) == 6
    count_decodes.clear()
    # change one file: only that row is decoded again, and it holds the new picture
    changed = Path(rows.loc[3, "path"])
    Image.fromarray(np.full((24, 32, 3), 200, dtype=np.uint8)).save(changed)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = build_image_cache(rows, (12, 16), cache_dir=store, progress=False)
    assert count_decodes == [str(changed)] and third.decoded == 1
    assert (third.images[3] == 200).all()
    keep = [0, 1, 2, 4, 5]
    assert torch.equal(third.images[keep], first.images[keep])
    assert len(list(next(store.iterdir()).glob("images-*.npy"))) == 1  # old generations removed
    # the index holds digests, not paths
    index_text = (next(p for p in store.iterdir() if (p / "index.json").is_file()) / "index.json").read_text()
    assert str(tmp_path) not in index_text


def test_budget_refusal_is_one_clear_line(tmp_path: Path, count_decodes: list[str]) -> None:
    rows = _pngs(tmp_path / "img", 4)
    with pytest.raises(CacheBudgetError) as err:
        build_image_cache(rows, (512, 512), budget_gib=0.001, cache_dir=tmp_path / "c", progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    need = 4 * 3 * 512 * 512 / 2**30
    assert f"needs {need:.2f} GiB" in msg and "allowed 0.00 GiB" in msg and "cache_budget_gib" in msg
    assert "source_size" in msg and "cache: none" in msg
    assert count_decodes == [] and not (tmp_path / "c").exists()  # refused before any work


def test_undecodable_rows_reported_by_key_and_left_out(tmp_path: Path) -> None:
    rows = _pngs(tmp_path / "secret_folder", 3)
    bad = tmp_path / "secret_folder" / "broken.png"
    bad.write_bytes(b"not a png at all")
    rows = pd.concat([rows, pd.DataFrame([
        {"path": str(bad), "sop_uid": "pseudo-key-1", "patient_id": "x"},
        {"path": str(tmp_path / "secret_folder" / "gone.png"), "sop_uid": "pseudo-key-2", "patient_id": "y"},
    ])], ignore_index=True)
    for cache_dir in (None, tmp_path / "cache", tmp_path / "cache"):  # in RAM, built, then read back
        cache = build_image_cache(rows, (12, 16), cache_dir=cache_dir, progress=False)
        assert cache.slots.tolist() == [0, 1, 2, -1, -1] and len(cache.images) == 3
        assert [f["key"] for f in cache.failures] == ["pseudo-key-1", "pseudo-key-2"]
        for f in cache.failures:
            assert "secret_folder" not in f["reason"] and f["reason"]


def test_take_keeps_a_shard_on_a_device(tmp_path: Path) -> None:
    rows = _pngs(tmp_path / "img", 5)
    cache = build_image_cache(rows, (12, 16), progress=False)
    part = cache.take([3, 1], device="cpu")
    assert torch.equal(part.images, cache.images[[3, 1]]) and part.slots.tolist() == [0, 1]
    dev = build_image_cache(rows, (12, 16), mode="device", device="cpu", progress=False)
    assert torch.equal(dev.images, cache.images)


@pytest.mark.parametrize(("field", "value"), [
    ("mode", "disk"), ("source_size", 0), ("source_size", [24, 0, 3]), ("source_size", "big"), ("image_size", 0),
    ("image_size", True), ("in_channels", 2), ("cache_dir", ""), ("budget_gib", 0), ("budget_gib", "lots"),
])
def test_cache_spec_refuses_a_bad_field_in_one_line_naming_it(field: str, value) -> None:
    from medssl_monai.data import ImageCacheSpec

    with pytest.raises(ValueError) as err:
        ImageCacheSpec(**{field: value})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"ImageCacheSpec.{field}: ") and repr(value) in msg


def test_cache_spec_normalises_and_writes_the_source_default_once(tmp_path: Path) -> None:
    from medssl_monai.data import ImageCacheSpec

    spec = ImageCacheSpec("host", source_size=[24, 32], image_size=16, cache_dir=tmp_path)
    assert spec.source_size == (24, 32) and spec.cache_dir == str(tmp_path) and hash(spec) == hash(spec)
    assert spec.enabled and not ImageCacheSpec().enabled
    assert ImageCacheSpec(image_size=20).source_shape() == (40, 40)
    assert ImageCacheSpec(source_size=9).source_shape() == (9, 9)
    with pytest.raises(ValueError, match=r"ImageCacheSpec\.mode"):
        ImageCacheSpec().build([])
    with pytest.raises(AttributeError):
        spec.mode = "device"  # frozen: every consumer sees the one spec the config declared


def test_bundles_train_one_epoch_from_the_cache(tmp_path: Path, ham10000: Path) -> None:
    """micle_medical (views per batch from the host cache, k-NN monitor from it too), then a fine-tune."""
    import shutil
    import subprocess
    import sys

    from medssl_monai.data import table_to_manifest, write_manifest

    repo = Path(__file__).resolve().parents[2]
    m = table_to_manifest(ham10000 / "metadata.csv", group_col="lesion_id", label_col="dx", instance_col="image_id")
    manifest = tmp_path / "ham_mini.csv"
    write_manifest(m[m["mini"]], manifest)
    store = tmp_path / "image_cache"
    common = ["--manifest", str(manifest), "--max_epochs", "1", "--batch_size", "16", "--image_size", "16",
              "--backbone", "resnet18", "--cache", "host", "--source_size", "[24, 32]", "--cache_dir", str(store)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    roots = {}
    for name, extra in (("micle_medical", ["--views_on", "device", "--limit", "64", "--knn_interval", "1"]),
                        ("finetune_classification", ["--label_fraction", "1.0"])):
        root = tmp_path / name
        shutil.copytree(repo / "bundles" / name, root, ignore=shutil.ignore_patterns("*.pt", "output"))
        if name == "finetune_classification":
            extra += ["--pretrained_ckpt", str(roots["micle_medical"] / "models" / "model.pt")]
        r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(root), "--config_file",
                            str(root / "configs" / "train.json"), *common, *extra], cwd=repo, capture_output=True,
                           text=True, timeout=600, env=env)
        assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        assert (root / "models" / "model.pt").is_file()
        roots[name] = root
    log = (roots["micle_medical"] / "output" / "train.log").read_text()
    assert "image cache (host): 64 images at (24, 32)" in log and "views made on the training device" in log
    assert "Epoch[1]" in log or "Epoch: 1" in log
    ft_log = (roots["finetune_classification"] / "output" / "train.log").read_text()
    assert "image cache (host)" in ft_log
    assert len(list(store.glob("*/index.json"))) == 1  # one store, shared by both bundles


def test_cache_failures_count_as_bad_images(tmp_path: Path) -> None:
    """Rows the cache cannot decode are recorded in the run's ``bad_images.csv`` and count towards
    ``max_bad_images``, as unreadable images do without the cache."""
    import csv

    from medssl_monai.bundle import classification_items
    from medssl_monai.data import ImageCacheSpec
    from medssl_monai.data.bad_images import TooManyBadImagesError, configure_bad_images

    rows = _pngs(tmp_path / "img", 4).assign(label="a")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    rows = pd.concat([rows, pd.DataFrame([{"path": str(tmp_path / "img" / "broken.png"), "sop_uid": "pm:bad1",
                                           "patient_id": "x", "label": "a"}])], ignore_index=True)
    errors = tmp_path / "out" / "bad_images.csv"
    try:
        configure_bad_images(errors, max_bad=2)
        spec = ImageCacheSpec("host", source_size=[12, 16], image_size=8, in_channels=3, cache_dir=tmp_path / "cache")
        items = classification_items(rows, spec, phase="eval")
        assert len(items) == 4 and all(isinstance(i["image"], torch.Tensor) for i in items)
        recorded = list(csv.DictReader(errors.open()))
        assert [(r["key"], r["phase"]) for r in recorded] == [("pm:bad1", "eval")]
        assert str(tmp_path) not in errors.read_text()
        configure_bad_images(tmp_path / "out2" / "bad_images.csv", max_bad=0)
        with pytest.raises(TooManyBadImagesError):
            classification_items(rows, spec, phase="train")
    finally:
        configure_bad_images(None)


# --- content keys, checked stores, private files (issue 19 items 3 and 12) ---------------------------------


def _served_equals_decoding(cache, rows: pd.DataFrame, hw: tuple[int, int] = (12, 16)) -> None:
    """Every row served equals decoding its file now (the loader's output, block-mean resized): never stale."""
    assert cache.kept.all(), cache.failures
    for i, row in enumerate(rows.to_dict("records")):
        got = cache.images[cache.slots[i]].numpy().astype(np.float64)
        assert np.abs(got - reference(row, *hw)).max() <= 1, i


def _store(cache_dir: Path) -> Path:
    (folder,) = [p for p in cache_dir.iterdir() if (p / "index.json").is_file()]
    return folder


def _png(path: Path, seed: int, size: tuple[int, int] = (24, 32)) -> None:
    """An uncompressed PNG: its byte size depends on its dimensions only, so two of them have the same size."""
    pixels = np.random.default_rng(seed).uniform(0, 255, (*size, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path, compress_level=0)


def test_same_size_replacement_with_mtime_restored_is_decoded_again(tmp_path: Path, count_decodes: list[str]) -> None:
    folder = tmp_path / "img"
    folder.mkdir()
    paths = [folder / f"x{i}.png" for i in range(4)]
    for i, p in enumerate(paths):
        _png(p, i)
    rows = pd.DataFrame({"path": [str(p) for p in paths], "sop_uid": [f"u{i}" for i in range(4)]})
    store = tmp_path / "cache"
    _served_equals_decoding(build_image_cache(rows, (12, 16), cache_dir=store, progress=False), rows)
    count_decodes.clear()

    def replace_keeping_stat(path: Path, data: bytes) -> None:
        st = path.stat()
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)  # stat says: same

    new = tmp_path / "new.png"
    _png(new, 99)
    replace_keeping_stat(paths[1], new.read_bytes())
    a, b = paths[2].read_bytes(), paths[3].read_bytes()  # a re-export that swapped two files' contents
    replace_keeping_stat(paths[2], b)
    replace_keeping_stat(paths[3], a)
    again = build_image_cache(rows, (12, 16), cache_dir=store, progress=False)
    assert sorted(count_decodes) == sorted(str(p) for p in paths[1:]) and again.decoded == 3
    _served_equals_decoding(again, rows)


def _zero_data(npy: Path) -> None:
    offset = np.load(npy, mmap_mode="r").offset
    with npy.open("r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(npy.stat().st_size - offset))


def _short_store(npy: Path) -> None:
    np.save(npy, np.load(npy)[:3])  # a valid array, 3 rows fewer than the index says


def _edited_index(index: Path) -> None:
    import json

    idx = json.loads(index.read_text())
    a, b = list(idx["entries"])[:2]
    idx["entries"][a]["slot"], idx["entries"][b]["slot"] = idx["entries"][b]["slot"], idx["entries"][a]["slot"]
    index.write_text(json.dumps(idx))  # two rows' pixels swapped, the checksum left as it was


CORRUPTIONS = {
    "npy overwritten with zeros": lambda f: f.write_bytes(bytes(f.stat().st_size)),
    "npy pixels zeroed, header kept": _zero_data,
    "npy truncated": lambda f: os.truncate(f, f.stat().st_size // 2),
    "npy missing": lambda f: f.unlink(),
    "npy short (fewer rows)": _short_store,
    "index truncated": lambda f: os.truncate(f, f.stat().st_size // 2),
    "index garbage": lambda f: f.write_bytes(np.random.default_rng(0).bytes(300)),
    "index valid JSON, not an index": lambda f: f.write_text('{"version": 2, "entries": []}'),
    "index a list": lambda f: f.write_text("[1, 2, 3]"),
    "index edited (slots swapped)": _edited_index,
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_store_is_rebuilt_never_served(tmp_path: Path, case: str, count_decodes: list[str], caplog) -> None:
    rows = _pngs(tmp_path / "img", 6)
    cache_dir = tmp_path / "cache"
    build_image_cache(rows, (12, 16), cache_dir=cache_dir, progress=False)
    folder = _store(cache_dir)
    (npy,) = folder.glob("images-*.npy")
    CORRUPTIONS[case](folder / "index.json" if case.startswith("index") else npy)
    count_decodes.clear()
    with caplog.at_level("WARNING", logger="medssl_monai.data.cache"):
        again = build_image_cache(rows, (12, 16), cache_dir=cache_dir, progress=False)  # no traceback
    assert again.decoded > 0 and len(count_decodes) == again.decoded
    _served_equals_decoding(again, rows)
    warnings = [r.getMessage() for r in caplog.records if r.name == "medssl_monai.data.cache" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and folder.name in warnings[0] and "\n" not in warnings[0], warnings
    assert str(tmp_path) not in warnings[0]  # names the store, not a path
    count_decodes.clear()
    third = build_image_cache(rows, (12, 16), cache_dir=cache_dir, progress=False)  # healthy again: read
    assert count_decodes == [] and third.decoded == 0
    _served_equals_decoding(third, rows)
    assert len(list(folder.glob("images-*.npy"))) == 1 and not list(folder.glob(".*.tmp"))


def test_a_bad_chunk_decodes_only_its_rows_again(tmp_path: Path, monkeypatch, count_decodes: list[str]) -> None:
    import medssl_monai.data.cache as cache_module

    monkeypatch.setattr(cache_module, "CHUNK_BYTES", 2 * 3 * 12 * 16)  # two rows per checksummed chunk
    rows = _pngs(tmp_path / "img", 6)
    cache_dir = tmp_path / "cache"
    build_image_cache(rows, (12, 16), cache_dir=cache_dir, progress=False)
    (npy,) = _store(cache_dir).glob("images-*.npy")
    offset = np.load(npy, mmap_mode="r").offset
    with npy.open("r+b") as fh:  # one byte of row 2 (chunk 1 = rows 2 and 3) flipped
        fh.seek(offset + 2 * 3 * 12 * 16 + 100)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    count_decodes.clear()
    again = build_image_cache(rows, (12, 16), cache_dir=cache_dir, progress=False)
    assert sorted(count_decodes) == sorted(rows.loc[[2, 3], "path"]) and again.decoded == 2
    _served_equals_decoding(again, rows)
    # a subset is checked too: row 0's chunk zeroed, the subset [0, 5] decodes row 0 again, not row 5
    (npy,) = _store(cache_dir).glob("images-*.npy")
    offset = np.load(npy, mmap_mode="r").offset
    with npy.open("r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(2 * 3 * 12 * 16))
    count_decodes.clear()
    sub = build_image_cache(rows.iloc[[0, 5]], (12, 16), cache_dir=cache_dir, progress=False)
    assert count_decodes == [str(rows.loc[0, "path"])]
    _served_equals_decoding(sub, rows.iloc[[0, 5]].reset_index(drop=True))


def test_store_is_private_whatever_the_umask(tmp_path: Path) -> None:
    rows = _pngs(tmp_path / "img", 3)
    cache_dir = tmp_path / "output" / "image_cache"

    def modes() -> dict[str, int]:
        folder = _store(cache_dir)
        return {p.name: p.stat().st_mode & 0o777 for p in [cache_dir, folder, *folder.iterdir()]}

    old = os.umask(0)
    try:
        build_image_cache(rows, (12, 16), cache_dir=cache_dir, progress=False)
        got = modes()
        assert {"index.json", ".lock"} <= set(got) and any(n.endswith(".npy") for n in got)
        assert got == {n: 0o700 if n in ("image_cache", _store(cache_dir).name) else 0o600 for n in got}
        for p in _store(cache_dir).iterdir():  # a store an older version wrote: 0755 / 0644
            os.chmod(p, 0o644)
        os.chmod(_store(cache_dir), 0o755)
        rows.loc[0, "path"] = str(tmp_path / "img" / "img1.png")  # and a second generation written
        build_image_cache(rows, (12, 16), cache_dir=cache_dir, progress=False)
        assert modes() == got
        shared = tmp_path / "shared_cache"  # an existing folder is not changed: its store folders are private
        shared.mkdir(mode=0o755)
        build_image_cache(rows, (12, 16), cache_dir=shared, progress=False)
        assert shared.stat().st_mode & 0o777 == 0o755 and _store(shared).stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(old)


def test_a_store_hashed_otherwise_is_rebuilt(tmp_path: Path, monkeypatch, count_decodes: list[str]) -> None:
    """Without ``xxhash`` (an offline machine) the cache hashes with blake2b: a store written with the other
    hash is rebuilt, then read."""
    import hashlib

    import medssl_monai.data.cache as cache_module

    rows = _pngs(tmp_path / "img", 3)
    build_image_cache(rows, (12, 16), cache_dir=tmp_path / "cache", progress=False)
    monkeypatch.setattr(cache_module, "HASH", "blake2b_128")
    monkeypatch.setattr(cache_module, "_hasher", lambda: hashlib.blake2b(digest_size=16))
    count_decodes.clear()
    again = build_image_cache(rows, (12, 16), cache_dir=tmp_path / "cache", progress=False)
    assert again.decoded == 3 and len(count_decodes) == 3
    count_decodes.clear()
    third = build_image_cache(rows, (12, 16), cache_dir=tmp_path / "cache", progress=False)
    assert third.decoded == 0 and count_decodes == []
    _served_equals_decoding(third, rows)


def test_a_build_killed_midway_leaves_the_previous_store_whole(tmp_path: Path, monkeypatch) -> None:
    rows = _pngs(tmp_path / "img", 4)
    cache_dir = tmp_path / "cache"
    build_image_cache(rows.iloc[:2], (12, 16), cache_dir=cache_dir, progress=False)
    folder = _store(cache_dir)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".lock"}
    original = reader_module.LoadManifestImage.__call__
    calls = []

    def killed(self, row):
        calls.append(row)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill (not an Exception: no row failure recorded)
        return original(self, row)

    monkeypatch.setattr(reader_module.LoadManifestImage, "__call__", killed)
    with pytest.raises(KeyboardInterrupt):
        build_image_cache(rows, (12, 16), cache_dir=cache_dir, progress=False)
    monkeypatch.setattr(reader_module.LoadManifestImage, "__call__", original)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".lock"} == before  # no temp file left
    _served_equals_decoding(build_image_cache(rows, (12, 16), cache_dir=cache_dir, progress=False), rows)
