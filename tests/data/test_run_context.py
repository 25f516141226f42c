"""Run-scoped state (issue 17.5): two bundle runs in one process share nothing. Each ``setup_run`` starts a
:class:`RunContext`; the second run's log redacts its own manifest's paths and not the first's, its bad-image
count starts afresh in its own errors file, and the first run's log file receives nothing of the second."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pandas as pd
import pytest

from medssl_monai.bundle import setup_run
from medssl_monai.data import read_manifest
from medssl_monai.data.bad_images import BadImageLog
from medssl_monai.data.manifest import pathmap_path
from medssl_monai.data.privacy import REDACTED_PATH
from medssl_monai.data.run_context import RunContext, current_run, start_run

logger = logging.getLogger("medssl_monai.test_run_context")


def pseudonymised_manifest(folder: Path, tag: str, n: int = 3) -> tuple[Path, dict[str, str]]:
    """A manifest of ``pm:`` keys beside its private path map, over patient-named files; ``{real path: key}``."""
    real = {}
    for i in range(n):
        f = folder / "export" / f"PATIENT_{tag.upper()}{i}" / f"IM{i:03d}"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
        real[str(f)] = f"pm:{tag}{i:04d}"
    manifest = folder / "manifest.csv"
    pd.DataFrame({"path": list(real.values()), "patient_id": [f"P{i}" for i in range(n)]}).to_csv(manifest,
                                                                                                  index=False)
    pd.DataFrame({"key": list(real.values()), "path": list(real)}).to_csv(pathmap_path(manifest), index=False)
    return manifest, real


@pytest.fixture
def restore_run():
    yield
    start_run(RunContext())  # detaches and closes the last test run's log file


def test_two_runs_in_one_process_share_no_keys_counts_or_log(tmp_path: Path, restore_run) -> None:
    m1, real1 = pseudonymised_manifest(tmp_path / "a", "a")
    m2, real2 = pseudonymised_manifest(tmp_path / "b", "b")
    (p1, k1), (p2, k2) = next(iter(real1.items())), next(iter(real2.items()))

    out1 = setup_run(tmp_path / "run1", max_bad_images=5)
    df1 = read_manifest(m1)
    assert df1["path"].tolist() == list(real1)  # resolved to the real files
    logger.warning("run 1 reads %s", p1)
    bad1 = BadImageLog("train", 10)
    assert bad1.record(k1, f"truncated file {p1}") == 1
    assert bad1.record(next(iter(list(real1.values())[1:])), "truncated") == 2
    first_run = current_run()

    out2 = setup_run(tmp_path / "run2", max_bad_images=5)
    assert current_run() is not first_run and set(current_run().redactor.keys) == set()  # nothing carried over
    read_manifest(m2)
    assert current_run().redactor.keys == real2  # only its own manifest's keys
    logger.warning("run 2 reads %s and mentions %s", p2, p1)
    bad2 = BadImageLog("train", 10)
    assert bad2.path == str(out2 / "bad_images.csv") and bad2.run != bad1.run
    assert bad2.record(k2, "truncated") == 1  # counted afresh, not 3

    log1, log2 = (out1 / "train.log").read_text(), (out2 / "train.log").read_text()
    assert f"run 1 reads {k1}" in log1 and p1 not in log1
    assert "run 2" not in log1  # the first run's log file was detached when the second started
    # the second run's redactor knows its own paths only: the first run's path passes through as text
    assert f"run 2 reads {k2} and mentions {p1}" in log2 and p2 not in log2 and REDACTED_PATH not in log2
    rows1 = list(csv.DictReader((out1 / "bad_images.csv").open()))
    rows2 = list(csv.DictReader((out2 / "bad_images.csv").open()))
    assert [r["key"] for r in rows1] == [k1, list(real1.values())[1]]
    assert [r["key"] for r in rows2] == [k2]
    assert p1 not in (out1 / "bad_images.csv").read_text()  # the reason was redacted by run 1's keys


def test_a_manifest_read_before_any_run_is_redacted_by_the_run_that_follows(tmp_path: Path, restore_run) -> None:
    from medssl_monai.data import run_context

    start_run(RunContext())  # detach any earlier test run's log file, then be a fresh process: no run yet
    run_context._current[0] = run_context._NO_RUN
    manifest, real = pseudonymised_manifest(tmp_path / "c", "c")
    read_manifest(manifest)  # before setup_run: e.g. a config that reads the manifest first
    out = setup_run(tmp_path / "run3")
    (path, key), = list(real.items())[:1]
    logger.warning("late %s", path)
    text = (out / "train.log").read_text()
    assert f"late {key}" in text and path not in text
