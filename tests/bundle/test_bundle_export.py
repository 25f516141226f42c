"""`medssl bundles list|export`: the shipped bundles, found through the package, copied out whole."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from medssl_monai.bundle.export import export_bundles
from medssl_monai.bundle.locate import BUNDLE_NAMES, bundle_path, bundles_root
from medssl_monai.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_bundles_are_found_through_the_package_in_a_checkout() -> None:
    # a checkout (on PYTHONPATH or editable) resolves the package's bundles to its own top-level bundles/
    assert bundles_root() == (REPO / "bundles").resolve()
    assert [p.name for p in sorted(bundles_root().iterdir()) if (p / "configs").is_dir()] == sorted(BUNDLE_NAMES)
    with pytest.raises(ValueError, match=r"unknown bundle 'nope'.*finetune_classification"):
        bundle_path("nope")


def test_export_writes_monai_label_model_layout(tmp_path: Path, capsys) -> None:
    assert main(["bundles", "export", str(tmp_path / "model"), "--bundle", "finetune_classification"]) == 0
    out = tmp_path / "model" / "finetune_classification"
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["finetune_classification"]
    src = bundle_path("finetune_classification")
    for rel in ("configs/train.json", "configs/inference.json", "configs/evaluate.json", "configs/metadata.json",
                "configs/logging.conf", "docs/README.md", "LICENSE"):
        assert filecmp.cmp(src / rel, out / rel, shallow=False), rel
    assert (out / "models").is_dir() and not list(out.rglob("*.pt"))
    assert str(out) in capsys.readouterr().out

    # an existing bundle folder is refused (a trained bundle never gets fresh configs mixed in) ...
    (out / "models" / "model.pt").write_bytes(b"trained")
    assert main(["bundles", "export", str(tmp_path / "model"), "--bundle", "finetune_classification"]) == 1
    assert "already there" in capsys.readouterr().err
    assert (out / "models" / "model.pt").read_bytes() == b"trained"
    # ... unless --overwrite, which replaces it whole
    assert main(["bundles", "export", str(tmp_path / "model"), "--bundle", "finetune_classification",
                 "--overwrite"]) == 0
    assert not (out / "models" / "model.pt").exists()


def test_export_all_and_unknown_name(tmp_path: Path, capsys) -> None:
    written = export_bundles(tmp_path / "all")
    assert [p.name for p in written] == list(BUNDLE_NAMES)
    assert all((p / "configs" / "train.json").is_file() for p in written)
    # a bad name writes nothing at all, and says which names exist
    assert main(["bundles", "export", str(tmp_path / "none"), "--bundle", "micle_medical", "--bundle", "nope"]) == 1
    assert "unknown bundle 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
