"""Bundle commands forked from the preloaded server behave as ``python -m monai.bundle`` in a subprocess:
the same log text, exit status, working folder, environment and ``sys.argv``; failures, concurrent runs and
a kill come back as a subprocess's would. One subprocess run is the reference (about 8 s of imports)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from medssl_monai.experiments import bundle_process
from medssl_monai.experiments.bundle_process import run_command

pytestmark = pytest.mark.skipif(not bundle_process.fork_enabled(), reason="needs fork and Unix sockets")

CONFIG = {
    "imports": ["$import os", "$import sys", "$import time"],
    "value": 1,
    "fail": False,
    "sleep": 0,
    "run": ["$time.sleep(@sleep)",
            "$print('argv0', os.path.basename(sys.argv[0]), 'argv1', sys.argv[1], 'cwd', os.getcwd(), "
            "'env', os.environ.get('MEDSSL_T'), 'value', @value, 'pid', os.getpid(), flush=True)",
            "$medssl_monai.bundle.check_cli_overrides()",
            "$(_ for _ in ()).throw(ValueError('planted failure')) if @fail else None"],
}


def _cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config), *extra]


def _printed(log: Path) -> str:
    """The run's own line (MONAI's log lines carry time stamps)."""
    return next(x for x in log.read_text().splitlines() if x.startswith("argv0"))


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    cfg = dict(CONFIG, imports=[*CONFIG["imports"], "$import medssl_monai", "$import medssl_monai.bundle"])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    return path


def test_forked_run_matches_a_subprocess(tmp_path: Path, config: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("MEDSSL_T", "x")
    stats: dict = {}
    assert run_command(_cmd(config, "--value", "7"), tmp_path / "fork.log", cwd=work, stats=stats) == 0
    assert stats["forked"] is True and stats["cpu_s"] > 0
    monkeypatch.setenv("MEDSSL_BUNDLE_FORK", "0")
    ref: dict = {}
    assert run_command(_cmd(config, "--value", "7"), tmp_path / "sub.log", cwd=work, stats=ref) == 0
    assert ref["forked"] is False
    fork, sub = _printed(tmp_path / "fork.log"), _printed(tmp_path / "sub.log")
    strip = re.compile(r" pid \d+")
    assert strip.sub("", fork) == strip.sub("", sub) == f"argv0 __main__.py argv1 run cwd {work} env x value 7"
    # a failure: the same status, and the root cause in the log for runner.failure_line
    monkeypatch.delenv("MEDSSL_BUNDLE_FORK")
    assert run_command(_cmd(config, "--fail", "True"), tmp_path / "fail.log") == 1
    text = (tmp_path / "fail.log").read_text()
    assert "Traceback (most recent call last)" in text and "ValueError: planted failure" in text
    # the bundles' own override check sees the command line through sys.argv
    assert run_command(_cmd(config, "--valeu", "3"), tmp_path / "typo.log") == 1
    assert "--valeu" in (tmp_path / "typo.log").read_text()


def test_concurrent_runs_and_kill(tmp_path: Path, config: Path) -> None:
    results: dict[int, int] = {}

    def go(i: int) -> None:
        results[i] = run_command(_cmd(config, "--value", str(i)), tmp_path / f"c{i}.log")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {0: 0, 1: 0, 2: 0}
    pids = {_printed(tmp_path / f"c{i}.log").split()[-1] for i in range(3)}
    assert len(pids) == 3 and str(os.getpid()) not in pids
    assert all(f"value {i}" in _printed(tmp_path / f"c{i}.log") for i in range(3))

    # a run killed by a signal reports -signal, as subprocess does
    out: dict[str, int] = {}
    log = tmp_path / "slow.log"
    t = threading.Thread(target=lambda: out.update(code=run_command(_cmd(config, "--sleep", "30"), log)))
    t.start()
    pid = None
    for _ in range(600):
        time.sleep(0.05)
        pid = _child_of_log(log) if log.exists() and "input summary" in log.read_text() else None
        if pid:
            break
    assert pid, "the slow run never started"
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    assert out["code"] == -signal.SIGKILL


def _child_of_log(log: Path) -> int | None:
    """The pid of the process writing ``log`` (it sleeps before printing its pid)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == str(log) for fd in (entry / "fd").iterdir()):
                if int(entry.name) != os.getpid():
                    return int(entry.name)
        except OSError:
            continue
    return None


def test_changed_import_time_environment_gets_a_fresh_interpreter(tmp_path: Path, config: Path,
                                                                   monkeypatch) -> None:
    bundle_process.warm_up()
    monkeypatch.setenv("OMP_NUM_THREADS", str(int(os.environ.get("OMP_NUM_THREADS", "2")) + 1))
    stats: dict = {}
    assert run_command(_cmd(config), tmp_path / "env.log", stats=stats) == 0
    assert stats["forked"] is False


def test_importing_sklearn_after_the_server_started_keeps_runs_forked(tmp_path: Path, config: Path,
                                                                     monkeypatch) -> None:
    """scikit-learn sets KMP_* flags when imported (a study's selection imports it after phase 1 started the
    server) and torch its inductor cache folder on a first optimiser step (a benchmark's bare loop): later
    runs must still be forked, as with the user's own OMP_* settings they would not be."""
    bundle_process.warm_up()
    for key in ("KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(key, raising=False)
    bundle_process._get_server().env = bundle_process._import_env(os.environ)
    import sklearn  # noqa: F401  (sets them, if not set yet)

    monkeypatch.setenv("KMP_INIT_AT_FORK", "FALSE")
    monkeypatch.setenv("KMP_DUPLICATE_LIB_OK", "True")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    stats: dict = {}
    assert run_command(_cmd(config), tmp_path / "sk.log", stats=stats) == 0
    assert stats["forked"] is True


def test_a_killed_caller_takes_its_run_along(tmp_path: Path) -> None:
    """``kill -9`` of a study mid-run: the forked bundle run stops too (not left writing into the run folder
    while a restarted study runs the same bundle there)."""
    import subprocess

    cfg = tmp_path / "slow.json"
    cfg.write_text(json.dumps({"imports": ["$import os", "$import time"],
                               "run": ["$print('pid', os.getpid(), flush=True)", "$time.sleep(120)"]}))
    log = tmp_path / "slow.log"
    caller = subprocess.Popen([sys.executable, "-c", (
        "import sys; from medssl_monai.experiments.bundle_process import run_command; "
        f"run_command([sys.executable, '-m', 'monai.bundle', 'run', '--config_file', {str(cfg)!r}], {str(log)!r})")])
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and "pid " not in (log.read_text() if log.exists() else ""):
            time.sleep(0.1)
        run_pid = int(next(x for x in log.read_text().splitlines() if x.startswith("pid ")).split()[1])
        assert run_pid != caller.pid  # forked from the server, not the caller itself
        os.kill(caller.pid, signal.SIGKILL)
        caller.wait(10)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            try:
                os.kill(run_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(run_pid, signal.SIGKILL)
            pytest.fail("the run outlived its killed caller")
    finally:
        if caller.poll() is None:
            caller.kill()
