"""``python -m monai.bundle ...`` without paying the interpreter's imports for every run.

Importing MONAI, torch, Ignite, SciPy and this package costs about 8 s of CPU per process on a 2-core
machine: more than a whole 10-epoch fine-tune of the demo's 62 images. A pipeline or study that runs
dozens of bundles paid it dozens of times. Here the runs are forked from one server process that imported
those modules once (``monai.bundle`` and the bundles' ``imports``: :data:`PRELOAD`). The child runs the very
module the command names (``runpy``, with ``sys.argv`` as ``python -m`` sets it: the bundles' own override
check reads it) in the caller's working folder and environment, its output going to the run's log, and
exits with the command's status: the same code on the same arguments, less the start-up.

How: the server (``python -c ...serve()``, one per calling process, started on first use or by
:func:`warm_up`) listens on a Unix socket in a private folder. A request is one connection; the server
forks a watcher, which forks the run and reports its pid and then its exit status (``-signal`` when killed,
as ``subprocess`` does); a caller that dies mid-run takes its run along (the watcher sees the hang-up). The server is single-threaded and has run no torch op when it forks (no thread pool
to inherit); it exits with its parent. Several runs may be in flight at once (``run_grid(parallel=...)``).

Falls back to a plain subprocess when Unix sockets or ``fork`` are missing (Windows), when
``MEDSSL_BUNDLE_FORK=0``, for any other command, when an environment variable read at import time
(``PYTHON*``, thread counts, device visibility) differs from the server's, and when the server is gone.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PRELOAD", "fork_enabled", "run_command", "serve", "warm_up"]

logger = logging.getLogger(__name__)

#: what the server imports once: MONAI's bundle CLI and what the bundles' ``imports`` sections import
PRELOAD = ("torch", "monai.bundle", "monai.bundle.__main__", "medssl_monai.bundle", "medssl_monai.data",
           "medssl_monai.engines", "medssl_monai.handlers", "medssl_monai.losses", "medssl_monai.metrics",
           "medssl_monai.networks", "medssl_monai.optim", "medssl_monai.transforms")
#: environment variables consulted when modules are imported (or a thread pool starts): a run whose
#: environment differs in these from the server's gets a fresh interpreter
_IMPORT_TIME_ENV = ("PYTHON", "OMP_", "MKL_", "OPENBLAS_", "CUDA_", "TORCH", "MONAI", "LD_", "KMP_")


#: set by libraries as they run, not by the user: scikit-learn and joblib set the two KMP flags for Intel
#: OpenMP when imported (torch's CPU wheel uses GNU OpenMP); torch sets its inductor cache folder to the
#: default when an optimiser step first touches it. Comparing them would make every run after the first
#: ``import sklearn`` or training step in the caller (a study's label selection, a benchmark's bare loop) a
#: fresh interpreter
_SET_BY_IMPORTS = frozenset({"KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "TORCHINDUCTOR_CACHE_DIR"})


def _import_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_IMPORT_TIME_ENV) and k not in _SET_BY_IMPORTS}


def fork_enabled() -> bool:
    """Whether bundle commands run forked from the preloaded server (``MEDSSL_BUNDLE_FORK=0``: never)."""
    return os.environ.get("MEDSSL_BUNDLE_FORK", "1") != "0" and hasattr(os, "fork") and hasattr(socket, "AF_UNIX")


# ------------------------------------------------------------------------------------------ the server
def _run_child(req: Mapping[str, Any]) -> None:
    """In the forked run: what ``python -m <module> <args>`` does, output to the log; never returns."""
    import runpy
    import traceback

    code: int | str | None = 1
    try:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = ["-m", *req["argv"][1:]]  # runpy puts the module's file first, as ``python -m`` does
        code = 0
        runpy.run_module(req["argv"][0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        if isinstance(code, str):  # sys.exit("message"): printed, status 1
            print(code, file=sys.stderr)
            code = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(int(code or 0) & 0xFF)  # no atexit of the server's state: a fresh interpreter has none


def _watch(conn: socket.socket, listener: socket.socket) -> None:
    """In the watcher (a child of the server): fork the run, report its pid and then its exit status."""
    listener.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    status = 1
    try:
        with conn.makefile("rb") as f:
            req = json.loads(f.readline())
        pid = os.fork()
        if pid == 0:
            conn.close()
            _run_child(req)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        raw, usage = _wait_unless_hung_up(pid, conn)
        status = os.waitstatus_to_exitcode(raw)
        conn.sendall(json.dumps({"exit": status, "cpu_s": usage.ru_utime + usage.ru_stime}).encode() + b"\n")
    finally:
        os._exit(0)


def _wait_unless_hung_up(pid: int, conn: socket.socket, grace: float = 5.0) -> tuple[int, Any]:
    """The run's wait status and resource usage. If the caller hangs up first (it was killed: nobody will
    read the status), the run is stopped too (SIGTERM, SIGKILL after ``grace`` s): a study killed and
    started again must not find the previous run still writing into the same folder."""
    import time

    while True:
        done, raw, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return raw, usage
        ready, _, _ = select.select([conn], [], [], 0.2)
        if ready and not conn.recv(1, socket.MSG_PEEK):
            os.kill(pid, signal.SIGTERM)
            end = time.monotonic() + grace
            while time.monotonic() < end:
                done, raw, usage = os.wait4(pid, os.WNOHANG)
                if done:
                    return raw, usage
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            _, raw, usage = os.wait4(pid, 0)
            return raw, usage


def serve(path: str, parent: int) -> None:
    """The server's main: bind ``path``, import :data:`PRELOAD`, fork a watcher per connection; exits when
    ``parent`` is gone."""
    import importlib

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    for name in PRELOAD:  # connections queue meanwhile
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # watchers are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the runs; the server goes with its parent
    try:
        while os.getppid() == parent:
            ready, _, _ = select.select([listener], [], [], 1.0)
            if not ready:
                continue
            conn, _ = listener.accept()
            if os.fork() == 0:
                _watch(conn, listener)
            conn.close()
    finally:  # the parent is gone (or killed without its atexit): take the socket's folder along
        listener.close()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        os._exit(0)  # skip the interpreter's slow tear-down of everything it imported


# ------------------------------------------------------------------------------------------ the client
class _Server:
    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="medssl-bundles-")  # 0700: only this user can connect
        self.path = os.path.join(self.folder, "socket")
        self.env = _import_env(os.environ)
        code = f"from medssl_monai.experiments.bundle_process import serve; serve({self.path!r}, {os.getpid()})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.folder)

    def connect(self, timeout: float = 60.0) -> socket.socket | None:
        """A connection, once the server listens; ``None`` when it died or never came up."""
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return s
            except OSError:
                s.close()
                time.sleep(0.05)
        return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


_server: _Server | None = None
_lock = threading.Lock()


def _get_server() -> _Server:
    global _server
    with _lock:
        if _server is None or _server.proc.poll() is not None:
            if _server is not None:
                _server.close()
            _server = _Server()
            atexit.register(_server.close)
        return _server


def warm_up() -> None:
    """Start the server now, so that its imports overlap whatever the caller does next; no-op when off."""
    if fork_enabled():
        _get_server()


def _forked(module_args: list[str], log: str, cwd: str, stats: dict[str, Any]) -> int | None:
    """The exit status of the run forked from the server; ``None`` when the server could not take it."""
    server = _get_server()
    if _import_env(os.environ) != server.env:
        logger.info("bundle run: the environment changed since the fork server started; a fresh interpreter")
        return None
    conn = server.connect()
    if conn is None:
        return None
    pid = None
    try:
        with conn, conn.makefile("rb") as f:
            conn.sendall(json.dumps({"argv": module_args, "log": log, "cwd": cwd, "env": dict(os.environ)}).encode()
                         + b"\n")
            line = f.readline()
            if not line:
                return None  # the request was not taken: nothing ran
            pid = int(json.loads(line)["pid"])
            line = f.readline()
            if not line:  # the watcher is gone, and with it the status
                raise RuntimeError(f"bundle run (pid {pid}) lost its watcher")
            pid = None
            done = json.loads(line)
            stats.update(cpu_s=float(done["cpu_s"]), forked=True)
            return int(done["exit"])
    finally:
        if pid is not None:  # interrupted while it runs: as subprocess.run does, kill it
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def run_command(cmd: Sequence[str], log: str | os.PathLike, cwd: str | os.PathLike | None = None,
                stats: dict[str, Any] | None = None) -> int:
    """Run ``cmd`` with its output (stdout and stderr) written to ``log`` (truncated first); its exit status.

    ``[sys.executable, "-m", "monai.bundle", ...]`` is forked from the preloaded server when
    :func:`fork_enabled`; anything else (or when the server cannot take it) runs as a subprocess.
    ``stats`` (a dict) receives ``cpu_s`` (the run's user + system CPU seconds; for a subprocess, of this
    process's waited-for children meanwhile) and ``forked``.
    """
    stats = {} if stats is None else stats
    cwd = str(cwd or os.getcwd())
    cmd = [str(c) for c in cmd]
    Path(log).write_bytes(b"")
    if fork_enabled() and len(cmd) >= 3 and cmd[0] == sys.executable and cmd[1:3] == ["-m", "monai.bundle"]:
        status = _forked(cmd[2:], str(log), cwd, stats)
        if status is not None:
            return status
    before = _children_cpu()
    with open(log, "ab") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd).returncode
    stats.update(cpu_s=_children_cpu() - before, forked=False)
    return code


def _children_cpu() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
