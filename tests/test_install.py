"""The built wheel, installed in a fresh venv outside the repository, is the whole product.

``pip wheel`` builds from a copy of the tracked files (so a stale ``build/`` or an untracked file in the
checkout cannot leak in); ``pip install`` puts it in a new venv with ``PIP_CONSTRAINT=constraints.txt``
(torch from the local CPU wheel; the rest from pip's cache, filled by the Makefile's own install). Then,
with the repository off ``sys.path`` and the working directory outside it: sample data -> ``medssl
pipeline`` -> report, ``build_finetune`` (its train.json from the package), and ``medssl bundles export`` ->
``python -m monai.bundle run`` on an exported bundle, all without the ``pacs`` extra (a PACS command then
names it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # wall time under a loaded machine

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "schema" / "meta_schema_20240725.json"
BUNDLES = ("simclr_natural", "micle_medical", "finetune_classification")


def _env() -> dict[str, str]:
    """No trace of the checkout or the dev venv: the installed wheel must stand alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PIP_CONSTRAINT": str(REPO / "constraints.txt"), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def _tracked_files() -> list[str] | None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    r = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, text=True)
    return [f for f in r.stdout.split("\0") if f] if r.returncode == 0 else None


def _copy_source(dst: Path) -> None:
    tracked = _tracked_files()
    if tracked is None:  # not a git checkout (e.g. an unpacked sdist): everything but local state
        shutil.copytree(REPO, dst, symlinks=True, ignore=shutil.ignore_patterns(
            ".venv", "build", "*.egg-info", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "sample_data"))
        return
    for rel in tracked:
        src, out = REPO / rel, dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            out.symlink_to(os.readlink(src))
        elif src.is_file():  # a tracked file deleted in the working tree is not part of it
            shutil.copy2(src, out)


_BUILD_FINETUNE = """
import torch
from monai.data import DataLoader, Dataset

from medssl_monai.bundle import build_finetune
from medssl_monai.bundle.finetune import finetune_bundle_dir
from medssl_monai.networks import get_backbone
from medssl_monai.networks.heads import Classifier

torch.manual_seed(0)
items = [{"image": torch.randn(3, 16, 16) + (i % 2), "label": i % 2} for i in range(8)]
dl = DataLoader(Dataset(items), batch_size=4)
trainer, evaluator = build_finetune(Classifier(get_backbone("cbr_tiny", in_channels=3), 2), dl, dl, 2, max_epochs=1)
trainer.run()
print(finetune_bundle_dir())
print(trainer.state.epoch, sorted(evaluator.state.metrics))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("wheel_install")
    assert REPO not in tmp.resolve().parents
    _copy_source(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(tmp / "src"), "-w", str(tmp / "dist")], tmp)
    (wheel,) = (tmp / "dist").glob("medssl_monai-*.whl")
    _run([sys.executable, "-m", "venv", str(tmp / "venv")], tmp)
    bin_dir = tmp / "venv" / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-compile", str(wheel)], tmp)
    return {"tmp": tmp, "wheel": wheel, "bin": bin_dir}


def test_wheel_ships_every_bundle_file_and_no_weights(installed) -> None:
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    shipped = {n[len("medssl_monai/"):] for n in names if n.startswith("medssl_monai/bundles/")}
    assert not [n for n in shipped if n.endswith((".pt", ".ts"))]
    assert "medssl_monai/transforms/preset_configs/chest_xray.json" in names
    # of configs/, only the demo's ships (experiment configs point at data beside a checkout)
    assert [n for n in names if n.startswith("medssl_monai/configs/")] == ["medssl_monai/configs/pipeline_demo.json"]
    tracked = _tracked_files()
    if tracked is None:
        pytest.skip("not a git checkout: the wheel's bundle files cannot be compared with the tracked ones")
    expected = {f for f in tracked if f.startswith("bundles/") and not f.endswith(".gitignore")}
    assert shipped == expected  # every tracked bundle file ships, nothing else does


def test_installed_wheel_runs_pipeline_and_exported_bundle(installed) -> None:
    tmp, bin_dir = installed["tmp"], installed["bin"]
    work = tmp / "work"
    work.mkdir()
    py = str(bin_dir / "python")
    # the CLI finds its bundles inside the venv's package, not in the checkout
    listed = _run([str(bin_dir / "medssl"), "bundles", "list"], work).stdout.split()
    site = (tmp / "venv").resolve()
    assert listed[::2] == list(BUNDLES) and all(site in Path(p).parents for p in listed[1::2]), listed
    # installed without the pacs extra (as pip does by default): a PACS command names the extra, in one line,
    # before writing anything; everything below (pipeline, report, bundles) runs without it
    nopacs = work / "nopacs"
    nopacs.mkdir()
    r = subprocess.run([str(bin_dir / "medssl"), "index", "--dimse", "127.0.0.1:9", "--out", "m.csv"], cwd=nopacs,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert (r.returncode, r.stderr) == (1, "medssl index: error: DIMSE (C-FIND/C-GET) needs the PACS extra: pip "
                                           "install 'medssl-monai[pacs]' (pynetdicom is not installed)\n"), r.stderr
    assert not list(nopacs.iterdir())
    # build_finetune (the Python API) reads the shipped train.json from the installed package: one epoch
    script = work / "build_finetune.py"
    script.write_text(_BUILD_FINETUNE)
    lines = _run([py, str(script)], work).stdout.strip().splitlines()
    assert site in Path(lines[-2]).parents and Path(lines[-2]).name == "finetune_classification", lines
    assert lines[-1] == "1 ['accuracy', 'auc_0', 'auc_1', 'auc_macro', 'balanced_accuracy']", lines
    # generated sample data -> medssl pipeline (tiny: 1 epoch each, 32 px) -> report
    _run([py, "-m", "medssl_monai.sample_data", "data", "--patients", "12"], work)
    cfg = {
        "run_dir": "@run",
        "data": {"dicom_root": "@data/dicom", "labels": "@data/labels.csv",
                 "split": {"train": 0.5, "val": 0.25, "test": 0.25}, "label_fractions": [1.0]},
        "common": {"backbone": "cbr_tiny", "image_size": 32, "in_channels": 1, "num_workers": 0},
        "phases": {"phase1": None, "micle": {"preset": "chest_xray", "max_epochs": 1, "batch_size": 4},
                   "finetune": {"max_epochs": 1, "batch_size": 4}, "evaluate": {"eval_split": "test"}},
    }
    (work / "tiny.json").write_text(json.dumps(cfg))
    _run([str(bin_dir / "medssl"), "-q", "pipeline", "tiny.json"], work)
    report = (work / "run" / "report" / "report.md").read_text()
    metrics = json.loads((work / "run" / "finetune" / "finetune_classification" / "output" / "eval_test"
                          / "metrics.json").read_text())
    assert "## Evaluation on the `test` split" in report
    assert f"| {metrics['balanced_accuracy']:.3f} |" in report
    micle = json.loads((work / "run" / "configs" / "micle.json").read_text())
    assert micle["command"][0] == py  # the bundle ran with the venv's interpreter

    # medssl bundles export -> MONAI Label's model folder layout, metadata valid against the schema
    _run([str(bin_dir / "medssl"), "bundles", "export", "models"], work)
    assert sorted(p.name for p in (work / "models").iterdir()) == sorted(BUNDLES)
    for name in BUNDLES:
        root = work / "models" / name
        for rel in ("configs/metadata.json", "configs/train.json", "configs/inference.json", "docs/README.md",
                    "LICENSE"):
            assert (root / rel).is_file(), f"{name}: {rel}"
        assert (root / "models").is_dir() and not list(root.rglob("*.pt"))
    # what `python -m monai.bundle verify_metadata --meta_file M --filepath SCHEMA` runs, once for all three
    # (one interpreter start instead of three); the schema file is local, so nothing is downloaded
    if SCHEMA.is_file() or os.environ.get("CI", "").lower() == "true":  # CI always has ../shared
        metas = [str(work / "models" / n / "configs" / "metadata.json") for n in BUNDLES]
        _run([py, "-c", "import sys; from monai.bundle import verify_metadata\n"
              "for m in sys.argv[2:]: verify_metadata(meta_file=m, filepath=sys.argv[1])", str(SCHEMA), *metas], work)

    # python -m monai.bundle run on an exported bundle, outside the pipeline's run folder: fine-tune 1 epoch
    ft = work / "models" / "finetune_classification"
    _run([py, "-m", "monai.bundle", "run", "--bundle_root", str(ft), "--config_file", str(ft / "configs/train.json"),
          "--manifest", str(work / "run" / "data" / "manifest.csv"), "--image_size", "32", "--in_channels", "1",
          "--backbone", "cbr_tiny", "--num_workers", "0", "--max_epochs", "1", "--batch_size", "4"], work)
    import torch

    state = torch.load(ft / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
