"""Experiment configs (pipeline, study, transfusion): read, ``extends``, ``@`` paths, key checks.

An experiment config is data: its values go to ``python -m monai.bundle run`` as overrides, so anything
MONAI would run or resolve is refused unless the file opts in (:func:`check_data_config`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "bundle_config_files",
    "bundles_dir",
    "check_data_config",
    "check_types",
    "current_names",
    "for_config",
    "load_config",
    "resolve_path",
    "unknown_keys",
    "unknown_overrides",
    "without_bad_keys",
    "wrong_values",
]


def load_config(path: str | os.PathLike, required: str = "phases") -> dict[str, Any]:
    """Read a pipeline (``required="phases"``), study (``"arms"``) or transfusion (``"models"``) config, JSON
    or YAML; ``@`` paths in it are relative to the config file. A file holding MONAI expressions, macros or
    references is refused unless it says ``allow_expressions: true`` (:func:`check_data_config`)."""
    cfg = _read_config(Path(path), ())
    if required not in cfg:
        raise ValueError(f"{path}: this config needs a {required!r} entry")
    return cfg


def check_data_config(cfg: Mapping[str, Any], source: str, at_paths: bool = True) -> None:
    """Refuse what MONAI would run or resolve (``$`` expressions, ``%`` macros, ``@@``/MONAI ``@`` references,
    ``_target_`` keys) anywhere in an experiment config, unless its top level says ``allow_expressions: true``.

    The drivers pass config values to ``python -m monai.bundle run`` as overrides, and MONAI's parser would
    evaluate them: ``"max_epochs": "$__import__('os').system(...) or 1"`` ran. Such a config is data.
    """
    allow = cfg.get("allow_expressions", False)
    if not isinstance(allow, bool):
        raise ValueError(f"{source}: allow_expressions must be true or false, got {allow!r}")
    if allow:
        return
    from ..bundle.overrides import interpreted_values

    found = interpreted_values({k: v for k, v in cfg.items() if k != "_base"}, at_paths=at_paths)
    if found:
        raise ValueError(f"{source}: {found[0]}; an experiment config is data, not code: remove it, or set "
                         f"top-level \"allow_expressions\": true if you trust this file"
                         + (f" ({len(found) - 1} more: {', '.join(f.split(':')[0] for f in found[1:])})"
                            if len(found) > 1 else ""))


def current_names(section: Mapping[str, Any] | Any, renamed: Mapping[str, str], where: str,
                  warn: bool = True) -> tuple[Any, list[str]]:
    """``section`` with each former key name (``renamed``: old -> new) moved to its current one, logged as
    a warning; both names given at once is a problem (which one was meant is not ours to guess)."""
    if not isinstance(section, Mapping):
        return section, []
    out, problems = dict(section), []
    for old, new in renamed.items():
        if old not in out:
            continue
        if new in out:
            problems.append(f"{where}: {old!r} is the former name of {new!r}; give only {new!r}")
            continue
        out[new] = out.pop(old)
        if warn:
            logging.getLogger(__name__).warning("%s: %r is now called %r", where, old, new)
    return out, problems


def unknown_keys(section: Mapping[str, Any] | Any, known: Any, where: str, comments: bool = False) -> list[str]:
    """``"<where>: unknown key 'x'; did you mean 'y'?"`` for each key of ``section`` not in ``known``.

    ``comments``: keys starting with ``_`` (``_comment``) are notes, not settings.
    """
    from ..bundle.overrides import did_you_mean

    if not isinstance(section, Mapping):
        return [f"{where}: expected a mapping, got {section!r}"] if section not in (None, False) else []
    return [f"{where}: unknown key {k!r}{did_you_mean(k, known)}" for k in section
            if k not in known and not (comments and str(k).startswith("_"))]


def check_types(section: Mapping[str, Any] | Any, schema: Mapping[str, Any], where: str = "") -> list[str]:
    """``"<key path>: <why>"`` for each value of ``section`` that is not what ``schema`` says: a
    :class:`~medssl_monai.bundle.overrides.ValueType` per key, or a nested schema (a dict) for a sub-section.

    Run with the unknown-key check at start-up, so ``"report": "false"`` (a string, which read as true) or
    ``"fractions": [0]`` stops the run before any phase, not an hour in. Keys absent from the schema are left
    to :func:`unknown_keys`; a key absent from the section keeps its default.
    """
    if not isinstance(section, Mapping):
        return []
    problems = []
    for key, spec in schema.items():
        if key not in section:
            continue
        path = f"{where}.{key}" if where else str(key)
        value = section[key]
        if isinstance(spec, Mapping):
            if value is not None and value is not False and not isinstance(value, Mapping):
                problems.append(f"{path}: expected a mapping, got {value!r}")
            else:
                problems += check_types(value or {}, spec, path)
        elif not (isinstance(value, str) and value[:1] in "$%"):  # code: refused or opted in elsewhere
            why = spec.check(value)
            if why:
                problems.append(f"{path}{'' if why[:1] in '[.' else ': '}{why}")
    return problems


def without_bad_keys(cfg: Mapping[str, Any], problems: Sequence[str]) -> dict[str, Any]:
    """``cfg`` without the top-level keys :func:`check_types` found wrong, so the checks that read values
    (``float(f)`` of each fraction...) report the other problems instead of crashing on these."""
    import re

    bad = {re.split(r"[.:\[]", p, maxsplit=1)[0] for p in problems}
    return {k: v for k, v in cfg.items() if k not in bad}


def wrong_values(overrides: Mapping[str, Any] | Any, where: str) -> list[str]:
    """Bundle override values of the wrong type or range (``finetune.lr: expected a number, got 'nan'``)."""
    from ..bundle.overrides import check_override_values

    return check_override_values(overrides, where)


def _files(config_file: Path | Sequence[Path]) -> list[Path]:
    return [Path(config_file)] if isinstance(config_file, (str, Path)) else [Path(f) for f in config_file]


def bundle_config_files(bundle_dir: Path, config_file: str | Sequence[str]) -> list[Path]:
    """The config file(s) of a bundle run: one name, or a list merged in order (``train.json`` +
    ``evaluate.json``)."""
    names = [config_file] if isinstance(config_file, str) else list(config_file)
    return [bundle_dir / "configs" / n for n in names]


def unknown_overrides(overrides: Mapping[str, Any] | Any, config_file: Path | Sequence[Path], where: str,
                      config: Mapping[str, Any] | None = None) -> list[str]:
    """Override ids (``key`` or ``key#sub``) naming nothing in a bundle config file (or the merge of a list
    of them), with the nearest name."""
    from ..bundle.overrides import load_bundle_config, unknown_override

    if not isinstance(overrides, Mapping):
        return [f"{where}: expected a mapping of bundle overrides, got {overrides!r}"] if overrides else []
    files = _files(config_file)
    config = load_bundle_config(files) if config is None else config
    name = "+".join("/".join(f.parts[-3:]) for f in files)
    return [f"{where}: unknown bundle override {why}" for k in overrides
            if (why := unknown_override(str(k), config, name))]


def for_config(overrides: Mapping[str, Any], config_file: Path | Sequence[Path]) -> dict[str, Any]:
    """The ``common`` overrides that name a key of this bundle config (the rest are for other phases)."""
    from ..bundle.overrides import load_bundle_config, unknown_override

    config = load_bundle_config(_files(config_file))
    return {k: v for k, v in overrides.items() if unknown_override(str(k), config) is None}


def bundles_dir(cfg: Mapping[str, Any]) -> Path:
    """The config's ``bundles_dir``, else the bundles shipped with the package."""
    from ..bundle.locate import bundles_root  # here: importing the bundle layer loads torch and MONAI

    return Path(cfg["bundles_dir"]) if cfg.get("bundles_dir") else bundles_root()


def resolve_path(value: Any, base: Path) -> Any:
    """``@rel/path`` strings in a config are paths relative to the config file; anything else is returned
    as it is."""
    if isinstance(value, str) and value.startswith("@") and not value.startswith("@@"):
        return str((base / value[1:]).resolve())
    return value


def _read_config(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """One config file, with ``extends`` (a parent config, ``@``-relative) merged under it.

    A variant of an experiment then names only what it changes: sections (mappings) merge key by key,
    anything else (lists included) replaces. The parent's ``@`` paths are resolved against the parent's
    folder before the merge, so each file's relative paths keep meaning what they meant in that file.
    ``run_dir`` is not inherited: without its own, a variant gets the default folder, never the parent's
    (whose finished runs it would otherwise report as its own).
    """
    path = path.resolve()
    if path in seen:
        raise ValueError(f"{path}: 'extends' loops back to itself ({' -> '.join(map(str, seen))})")
    text = path.read_text()
    try:
        cfg = json.loads(text) if path.suffix == ".json" else __import__("yaml").safe_load(text)
    except ValueError as e:  # json.JSONDecodeError; yaml.YAMLError is handled the same way below
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    except Exception as e:
        if type(e).__module__.startswith("yaml"):
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        raise
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{path}: a config must be a mapping, got {type(cfg).__name__}")
    cfg = dict(cfg)
    check_data_config(cfg, str(path))  # each file on its own: a parent's opt-in does not cover its variants
    parent = cfg.pop("extends", None)
    if parent is not None:
        parent_path = Path(resolve_path(parent if str(parent).startswith("@") else f"@{parent}", path.parent))
        if not parent_path.is_file():
            raise ValueError(f"{path}: 'extends' names {parent_path}, which does not exist")
        base = _read_config(parent_path, (*seen, path))
        base.pop("_comment", None)
        base.pop("run_dir", None)  # a variant never writes into (or reads finished runs from) its parent's folder
        base_dir = Path(base.pop("_base"))
        cfg = _merge(_resolve_tree(base, base_dir), cfg)
    cfg["_base"] = str(path.parent)
    return cfg


def _resolve_tree(value: Any, base: Path) -> Any:
    if isinstance(value, Mapping):
        return {k: _resolve_tree(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_tree(v, base) for v in value]
    return resolve_path(value, base)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out
