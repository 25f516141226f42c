"""What MONAI's bundle CLI does with override ids and values, checked before it does it.

``python -m monai.bundle run --max_epoch 1`` adds a new, unused key ``max_epoch`` and trains for the
configured epochs: MONAI accepts any id. And every override value goes through MONAI's ``ConfigParser``,
which runs ``$`` strings as Python, reads ``%`` macros from other files (which may hold ``$`` strings) and
resolves ``@`` references; ``_target_`` (with ``_requires_``, ``_mode_``, ``_disabled_``) instantiates any
importable callable. A bundle config is code by design; an experiment config (pipeline, study) that feeds
overrides is data, so the drivers refuse those forms there (:func:`interpreted_values`), and both the
drivers and the bundles themselves (:func:`check_cli_overrides`) refuse override ids the config does not have.
"""

from __future__ import annotations

import ast
import difflib
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MONAI_RUN_ARGS",
    "check_cli_overrides",
    "did_you_mean",
    "interpreted_values",
    "load_bundle_config",
    "unknown_override",
]

#: keyword arguments of ``monai.bundle run`` / ``create_workflow`` / ``ConfigWorkflow``: not config overrides
MONAI_RUN_ARGS = frozenset({"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking",
                            "args_file", "workflow_name", "workflow_type", "properties_path"})
#: keys that make MONAI instantiate, order or skip components: code, not data
COMPONENT_KEYS = frozenset({"_target_", "_requires_", "_mode_", "_disabled_"})
_KINDS = {"$": "a Python expression (MONAI evaluates it)",
          "%": "a macro (MONAI reads it from another config file, which may hold expressions)",
          "@": "a reference to another config item (MONAI resolves it)"}


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known name, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _split_id(id: str) -> list[str]:
    return str(id).lstrip("+").replace("#", "::").split("::")


def interpreted_values(value: Any, path: str = "", at_paths: bool = False) -> list[str]:
    """Every place in ``value`` (a config or an override mapping) that MONAI's ``ConfigParser`` would treat
    as code or as a reference rather than as data, as ``"<key path>: <why>"``.

    ``at_paths``: a single leading ``@`` is this project's "path relative to the config file" (resolved
    before anything reaches MONAI); ``@@`` and every ``@`` in an override still is a MONAI reference.
    """
    found: list[str] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            reserved = sorted(COMPONENT_KEYS & set(_split_id(str(k))))
            if reserved:
                found.append(f"{sub}: {reserved[0]!r} makes MONAI instantiate or control a component (code)")
            found += interpreted_values(v, sub, at_paths)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += interpreted_values(v, f"{path}[{i}]", at_paths)
    elif isinstance(value, str) and value[:1] in _KINDS:
        if not (at_paths and value.startswith("@") and not value.startswith("@@")):
            shown = value if len(value) <= 60 else value[:57] + "..."
            found.append(f"{path or '<value>'}: {shown!r} is {_KINDS[value[0]]}")
    return found


def load_bundle_config(config_files: str | Path | Sequence[str | Path]) -> dict[str, Any]:
    """The merged content of a bundle's config file(s), read only (nothing parsed, nothing evaluated)."""
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files(config_files if isinstance(config_files, (str, Path))
                                          else [str(f) for f in config_files])


def unknown_override(id: str, config: Mapping[str, Any], name: str = "the config") -> str | None:
    """Why override ``id`` (``key`` or ``key#sub#...``) names nothing in ``config`` (called ``name`` in the
    message); ``None`` when it does.

    A new argument of a component (a mapping with ``_target_``) is allowed: ``network_def#dropout``.
    """
    parts = _split_id(id)
    cur: Any = config
    for i, seg in enumerate(parts):
        where = "::".join(parts[:i])
        if isinstance(cur, Mapping):
            if seg in cur:
                cur = cur[seg]
                continue
            if i == len(parts) - 1 and "_target_" in cur:
                return None
            if not where:
                return f"{id!r} is not a key of {name}{did_you_mean(seg, cur)}"
            return f"{id!r}: {seg!r} is not a key of {where!r} in {name}{did_you_mean(seg, cur)}"
        if isinstance(cur, list):
            if seg.isdigit() and int(seg) < len(cur):
                cur = cur[int(seg)]
                continue
            return f"{id!r}: {where!r} in {name} is a list of {len(cur)}; {seg!r} is not an index of it"
        return f"{id!r}: {where!r} in {name} is a value, not a section"
    return None


def _argv_value(argv: Sequence[str], flag: str) -> str | None:
    for i, t in enumerate(argv):
        if t == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
        if t.startswith(f"--{flag}="):
            return t.split("=", 1)[1]
    return None


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_cli_overrides(argv: Sequence[str] | None = None) -> None:
    """The bundles' first ``initialize`` step: refuse ``--<id>`` overrides that name nothing in the config.

    MONAI hands the parsed config no record of which keys came from the command line, so this reads
    ``sys.argv`` of ``python -m monai.bundle run`` (also under ``torchrun``) and compares its ``--<id>``
    flags, and the override keys of an ``--args_file``, with the config file(s) as they are on disk.
    Called any other way (the Python API, another command), it checks nothing.
    """
    argv = list(sys.argv if argv is None else argv)
    main = Path(argv[0]) if argv else Path()
    if main.name != "__main__.py" or main.parent.name != "bundle" or len(argv) < 2 or argv[1] != "run":
        return
    args = argv[2:argv.index("--")] if "--" in argv[2:] else argv[2:]
    ids = [t[2:].split("=", 1)[0].replace("-", "_") for t in args if t.startswith("--") and len(t) > 2]
    files: Any = _argv_value(args, "config_file")
    args_file = _argv_value(args, "args_file")
    if args_file:
        from monai.bundle import ConfigParser

        extra = ConfigParser.load_config_file(args_file)
        ids += [k for k in extra if k not in ids]
        files = files or extra.get("config_file")
    if not files:
        return
    files = _literal(files) if isinstance(files, str) else files
    config = load_bundle_config(files)
    problems = [f"--{i}: {why}" for i in ids if i not in MONAI_RUN_ARGS and not i.startswith("_meta_")
                and (why := unknown_override(i, config, str(files)))]
    if problems:
        raise ValueError("unknown override(s), MONAI would add them as new keys and ignore them: "
                         + "; ".join(problems))
