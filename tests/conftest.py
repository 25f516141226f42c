"""Shared fixtures: where the real data lives, and how its absence is handled.

Tests read ``../shared/data`` beside the checkout (or ``$MEDSSL_SHARED_DATA``). In a user's clone without it
they skip with a clear message; under ``CI=true`` its absence is a failure, because CI always has it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    env = os.environ.get("MEDSSL_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def require_data(*parts: str) -> Path:
    """Path under the shared data folder; skip (or fail under CI=true) when it is missing."""
    path = _shared_data().joinpath(*parts)
    if not path.exists():
        msg = f"shared data not found at {path} (set MEDSSL_SHARED_DATA or place ../shared/data beside the repo)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " — required under CI=true")
        pytest.skip(msg)
    return path


@pytest.fixture
def dicom_data() -> Path:
    return require_data("dicom")


@pytest.fixture
def ham10000() -> Path:
    return require_data("ham10000")


@pytest.fixture
def natural_data() -> Path:
    return require_data("natural")


@pytest.fixture
def pydicom_test_file():
    """Files shipped inside the pydicom wheel (no download)."""
    from pydicom.data import get_testdata_file

    def get(name: str) -> str:
        path = get_testdata_file(name, download=False)
        if path is None:
            pytest.fail(f"{name} is not in the installed pydicom package")
        return str(path)

    return get


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread: on a 2-core CI machine oversubscription costs more than it gains (3x in tests)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def multiclass_data():
    """4 classes, noisy but informative probabilities rounded to create ties (``references.multiclass_probs``)."""
    from references import multiclass_probs

    return multiclass_probs()
