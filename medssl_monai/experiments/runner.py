"""Run one bundle config through MONAI's own CLI (``python -m monai.bundle run``) on a copy of the bundle.

The command runs forked from a server that has imported MONAI once (:mod:`.bundle_process`: the same
module and arguments, without ~8 s of imports per run), or as a subprocess (``MEDSSL_BUNDLE_FORK=0``).

The run folder keeps, per run (``tag``): ``configs/<tag>.json`` (bundle, config files, overrides, command),
``logs/<tag>.log`` (everything the run printed) and ``logs/<tag>.json`` (exit status and wall seconds,
measured here rather than read back from log timestamps; the run's CPU seconds and whether it was forked).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils.atomic import atomic_write_text
from .bundle_process import run_command
from .config import bundle_config_files, unknown_overrides

__all__ = ["bundle_minutes", "check_overrides", "run_bundle", "run_seconds"]

logger = logging.getLogger(__name__)


def _cli_value(v: Any) -> str:
    """A value as MONAI's CLI (``fire``) reads it back: Python literals. JSON's ``true``/``false``/``null``
    would arrive as the *strings* 'true'/'false'/'null', and the string 'false' is truthy."""
    if isinstance(v, (bool, list, tuple, dict)) or v is None:
        return repr(v)
    return str(v)


def check_overrides(bundle_src: Path, config_file: str | Sequence[str], overrides: Mapping[str, Any], tag: str,
                    allow_expressions: bool = False) -> None:
    """Refuse, before launching, overrides that name no key of the bundle config (a typo would silently
    add an unused key) and values MONAI would run or resolve (unless ``allow_expressions``)."""
    problems = unknown_overrides(overrides, bundle_config_files(bundle_src, config_file), tag)
    if not allow_expressions:
        from ..bundle.overrides import interpreted_values

        problems += [f"{tag}: override {f}" for f in interpreted_values(dict(overrides))]
    if problems:
        raise ValueError("; ".join(problems))


def failure_line(log: Path) -> str:
    """The root cause of a bundle's failure from its log (``ValueError: unknown backbone ...``), for a
    one-line message: the first exception of the last traceback chain (MONAI wraps the real error in
    ``RuntimeError: Failed to instantiate ...``)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    chained = ("The above exception was the direct cause", "During handling of the above exception")
    head = 0
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            before = next((x for x in reversed(lines[:i]) if x.strip()), "")
            if not before.startswith(chained):
                head = i
    hits = [x.strip() for x in lines[head:] if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b:?", x)]
    return f": {hits[0][:300]}" if hits else ""


def run_bundle(bundle_src: Path, config_file: str | Sequence[str], root: Path, overrides: Mapping[str, Any],
               run_dir: Path, tag: str, done: Path, copy: bool = True, force: bool = False,
               allow_expressions: bool = False) -> Path:
    """Run ``config_file`` of a bundle copied to ``root`` (or already there) through MONAI's CLI.

    Skipped when ``done`` exists (unless ``force``); the overrides and the command go to
    ``run_dir/configs/<tag>.json``, the output to ``run_dir/logs/<tag>.log``, the exit status and seconds to
    ``run_dir/logs/<tag>.json``. Overrides are checked first (:func:`check_overrides`): ``allow_expressions``
    is the experiment config's opt-in.
    """
    check_overrides(bundle_src, config_file, overrides, tag, allow_expressions)
    if done.is_file() and not force:
        logger.info("%s: %s exists, skipped (use --force to re-run)", tag, done)
        return root
    if copy:
        if force and root.exists():
            shutil.rmtree(root)
        if not root.exists():
            shutil.copytree(bundle_src, root, ignore=shutil.ignore_patterns("*.pt", "output", "classes.json",
                                                                     "architecture.json"))
    files = [config_file] if isinstance(config_file, str) else list(config_file)
    paths = [str(root / "configs" / f) for f in files]  # several: merged in order by MONAI's CLI
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(root),
           "--config_file", paths[0] if len(paths) == 1 else repr(paths)]
    for k, v in overrides.items():
        cmd += [f"--{k}", _cli_value(v)]
    (run_dir / "configs").mkdir(parents=True, exist_ok=True)
    (run_dir / "configs" / f"{tag}.json").write_text(json.dumps(
        {"bundle": bundle_src.name, "config_file": files if len(files) > 1 else files[0],
         "overrides": dict(overrides), "command": cmd}, indent=1))
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[{tag}] {bundle_src.name}/{'+'.join(files)} ...", flush=True)
    stats: dict[str, Any] = {}
    returncode = run_command(cmd, logs / f"{tag}.log", cwd=os.getcwd(), stats=stats)
    seconds = time.time() - t0
    atomic_write_text(logs / f"{tag}.json", json.dumps({"exit": returncode, "seconds": seconds, **stats}) + "\n")
    if returncode != 0:
        raise RuntimeError(f"phase {tag} failed (exit {returncode}); see {logs / f'{tag}.log'}"
                           f"{failure_line(logs / f'{tag}.log')}")
    print(f"[{tag}] done in {seconds:.0f} s", flush=True)
    if not done.is_file():  # config files that leave no model behind (evaluation) mark completion here
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"seconds": seconds}) + "\n")
    return root


def run_seconds(run_dir: Path, tag: str) -> float | None:
    """Wall seconds of a bundle run as :func:`run_bundle` recorded them (None: never run to an end here)."""
    record = run_dir / "logs" / f"{tag}.json"
    try:
        return float(json.loads(record.read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def bundle_minutes(run_dir: Path) -> float:
    """Minutes spent in the bundle runs of a run folder: unlike the wall time of one invocation, it survives
    resuming (a run resumed after a kill counts from its resume)."""
    return sum(run_seconds(run_dir, rec.stem) or 0.0 for rec in (run_dir / "logs").glob("*.json")) / 60
