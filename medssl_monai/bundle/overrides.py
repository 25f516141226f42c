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

from ..utils.deprecation import current_value
from ..utils.value_types import ValueType

__all__ = [
    "MONAI_RUN_ARGS",
    "OVERRIDE_TYPES",
    "ValueType",
    "check_cli_overrides",
    "check_override_values",
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


def _num(low: float | None = None, high: float | None = None, *, gt: bool = False, lt: bool = False,
         null: bool = False, kind: str = "number") -> ValueType:
    return ValueType(kind, low, high, open_low=gt, open_high=lt, null=null)


_BOOL = ValueType("bool")
_PATH = ValueType("str", null=True)
#: the bundles' documented scalar keys (their ``train.json``/``inference.json`` top level) and what each may be;
#: a value MONAI would interpret (``$``, ``@``, ``%``) is code, checked elsewhere, and passes here
OVERRIDE_TYPES: dict[str, ValueType] = {
    "lr": _num(0, gt=True), "base_lr": _num(0, gt=True), "weight_decay": _num(0), "momentum": _num(0, 1, lt=True),
    "backbone_lr_mult": _num(0), "temperature": _num(0, gt=True), "grad_clip": _num(0, gt=True, null=True),
    "class_weight_beta": _num(0, 1, lt=True), "label_fraction": _num(0, 1, gt=True),
    "max_bad_images": _num(0, null=True), "cache_budget_gib": _num(0, gt=True, null=True),
    "max_epochs": _num(1, kind="int"), "warmup_epochs": _num(0, kind="int"), "batch_size": _num(1, kind="int"),
    "num_workers": _num(0, kind="int"), "seed": _num(0, kind="int"), "val_interval": _num(1, kind="int"),
    "knn_interval": _num(0, kind="int"), "knn_k": _num(1, kind="int"), "log_interval": _num(1, kind="int"),
    "in_channels": _num(1, kind="int"), "projection_dim": _num(1, kind="int"),
    "projection_layers": _num(1, kind="int"), "keep_projection_layers": _num(0, kind="int"),
    "transfer_k": _num(0, kind="int", null=True), "limit": _num(1, kind="int", null=True),
    "image_size": ValueType("size", 0, open_low=True), "source_size": ValueType("size", 0, open_low=True, null=True),
    "amp": ValueType("choice", null=True, choices=(True, False, "none", "fp16", "bf16")),
    "cache": ValueType("choice", choices=("none", "host", "device")),  # data.cache.CACHE_MODES
    "views_on": ValueType("choice", choices=("host", "device")),  # transforms.VIEWS_ON; "cpu": former "host"
    "pairing": ValueType("choice", choices=("simclr", "micle")),
    "channels_last": _BOOL, "compile": _BOOL, "multi_label": _BOOL, "linear_probe": _BOOL, "patient_aware": _BOOL,
    "shuffle": _BOOL, "resume": _BOOL, "progress_bar": _BOOL,
    "backbone": ValueType("str"), "manifest": _PATH, "dataset_dir": _PATH, "pretrained_ckpt": _PATH,
    "cache_dir": _PATH,
}


def check_override_values(overrides: Mapping[str, Any] | Any, where: str = "") -> list[str]:
    """``"<where>.<key>: <why>"`` for each override whose value is not what :data:`OVERRIDE_TYPES` says.

    ``--lr nan`` reaches the bundle as the string ``'nan'`` (a ``TypeError`` an epoch in), ``source_size: 0``
    crashes in numpy: caught here, before anything runs. Ids of sub-keys (``a#b``) and unlisted keys are left to
    the bundle (their names are checked by :func:`unknown_override`). A former value (``views_on: cpu``,
    :data:`~medssl_monai.utils.deprecation.FORMER_VALUES`) is checked as its current one, with a warning.
    """
    if not isinstance(overrides, Mapping):
        return []
    problems = []
    for key, value in overrides.items():
        spec = OVERRIDE_TYPES.get(str(key).lstrip("+"))
        if spec is None or (isinstance(value, str) and value[:1] in _KINDS):
            continue
        why = spec.check(current_value(str(key).lstrip("+"), value))
        if why:
            problems.append(f"{where}.{key}: {why}" if where else f"{key}: {why}")
    return problems


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
    values = {**(extra if args_file else {}), **_argv_values(args)}
    bad = check_override_values({k: v for k, v in values.items() if k not in MONAI_RUN_ARGS})
    if bad:
        raise ValueError("override value(s) of the wrong type or range: " + "; ".join(f"--{b}" for b in bad))


def _argv_values(args: Sequence[str]) -> dict[str, Any]:
    """``--id value`` / ``--id=value`` of a ``monai.bundle run`` command line, values read as MONAI's ``fire``
    reads them (Python literals, else the string); a flag with no value is ``True``."""
    out: dict[str, Any] = {}
    for i, t in enumerate(args):
        if not t.startswith("--") or len(t) <= 2:
            continue
        name, eq, text = t[2:].partition("=")
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or nxt.startswith("--"):
                out[name.replace("-", "_")] = True
                continue
            text = nxt
        out[name.replace("-", "_")] = _literal(text)
    return out
