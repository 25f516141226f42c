"""``medssl pipeline CONFIG``: data -> phase 1 -> phase 2 -> phase 3 -> evaluation, by calling the bundles.

Each phase runs its bundle through MONAI's own CLI (``python -m monai.bundle run``) on a copy of the bundle
inside the run folder, so the run folder holds every config and override used, every log, TensorBoard
file and checkpoint. A phase whose ``models/model.pt`` exists is skipped (``--force`` re-runs it), and a
killed phase resumes from its own checkpoints when run again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PHASES", "POST_PHASES", "check_data_config", "load_pipeline_config", "run_pipeline", "unknown_keys",
           "validate_pipeline"]

logger = logging.getLogger(__name__)

#: phase name -> (bundle, config file, the phase whose model it starts from)
PHASES: dict[str, tuple[str, str, str | None]] = {
    "simclr": ("simclr_natural", "train.json", None),
    "micle": ("micle_medical", "train.json", "simclr"),
    "finetune": ("finetune_classification", "train.json", "micle"),
    "evaluate": ("finetune_classification", ("train.json", "evaluate.json"), None),  # merged, model zoo style
    "predict": ("finetune_classification", "inference.json", None),
    "embed": ("micle_medical", "inference.json", None),
}
#: phases that run inside another phase's bundle copy (they need its trained models/)
_RUNS_IN = {"evaluate": "finetune", "predict": "finetune", "embed": "micle"}
#: the file whose presence marks a phase as done
_DONE = {"evaluate": "output/evaluate_done.json", "predict": "output/predictions.csv",
         "embed": "output/embeddings.csv"}
#: phases that are not bundles: name -> the phase whose output they need
POST_PHASES = {"results_to_pacs": "predict"}
#: ``data`` keys naming a PACS source (instead of ``dicom_root``), and the cohort filter for any source
DATA_SOURCE_KEYS = ("dicom_root", "dicomweb", "dimse", "manifest")
DATA_COHORT_KEY = "cohort"
_SECRET_KEYS = {"password", "token", "user", "username", "secret", "auth"}


#: top-level keys of a pipeline config (besides ``_comment``-style keys starting with ``_``)
PIPELINE_KEYS = frozenset({"run_dir", "data", "common", "phases", "label_efficiency", "report", "bundles_dir",
                           "allow_expressions"})
_DATA_KEYS = frozenset({"labels", "pseudonymize", "split", "label_fractions", "seed", DATA_COHORT_KEY,
                        *DATA_SOURCE_KEYS})
_LABEL_EFFICIENCY_KEYS = frozenset({"fractions", "seeds", "inits"})
_INITS = ("pretrained", "random")


def load_pipeline_config(path: str | os.PathLike, required: str = "phases") -> dict[str, Any]:
    """Read a pipeline (or study: ``required="arms"``) config, JSON or YAML; ``@`` paths in it are relative
    to the config file. A file holding MONAI expressions, macros or references is refused unless it says
    ``allow_expressions: true`` (:func:`check_data_config`)."""
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
    from .bundle.overrides import interpreted_values

    found = interpreted_values({k: v for k, v in cfg.items() if k != "_base"}, at_paths=at_paths)
    if found:
        raise ValueError(f"{source}: {found[0]}; an experiment config is data, not code: remove it, or set "
                         f"top-level \"allow_expressions\": true if you trust this file"
                         + (f" ({len(found) - 1} more: {', '.join(f.split(':')[0] for f in found[1:])})"
                            if len(found) > 1 else ""))


def unknown_keys(section: Mapping[str, Any] | Any, known: Any, where: str, comments: bool = False) -> list[str]:
    """``"<where>: unknown key 'x'; did you mean 'y'?"`` for each key of ``section`` not in ``known``.

    ``comments``: keys starting with ``_`` (``_comment``) are notes, not settings.
    """
    from .bundle.overrides import did_you_mean

    if not isinstance(section, Mapping):
        return [f"{where}: expected a mapping, got {section!r}"] if section not in (None, False) else []
    return [f"{where}: unknown key {k!r}{did_you_mean(k, known)}" for k in section
            if k not in known and not (comments and str(k).startswith("_"))]


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
    from .bundle.overrides import load_bundle_config, unknown_override

    if not isinstance(overrides, Mapping):
        return [f"{where}: expected a mapping of bundle overrides, got {overrides!r}"] if overrides else []
    files = _files(config_file)
    config = load_bundle_config(files) if config is None else config
    name = "+".join("/".join(f.parts[-3:]) for f in files)
    return [f"{where}: unknown bundle override {why}" for k in overrides
            if (why := unknown_override(str(k), config, name))]


def validate_pipeline(cfg: Mapping[str, Any]) -> list[str]:
    """Problems with a pipeline config (empty when it can run): unknown keys anywhere, with the nearest
    known name, and bundle overrides that name no key of the phase's bundle config."""
    problems = unknown_keys(cfg, PIPELINE_KEYS, "top level", comments=True)
    problems += unknown_keys(cfg.get("data") or {}, _DATA_KEYS, "data", comments=True)
    le = cfg.get("label_efficiency") or {}
    problems += unknown_keys(le, _LABEL_EFFICIENCY_KEYS, "label_efficiency", comments=True)
    if isinstance(le, Mapping):
        problems += [f"label_efficiency.inits: unknown init {i!r} (known: {list(_INITS)})"
                     for i in le.get("inits", []) if i not in _INITS]
    phases = cfg.get("phases")
    if not isinstance(phases, Mapping):
        return [*problems, f"phases: expected a mapping of phase -> bundle overrides, got {phases!r}"]
    problems += unknown_keys(phases, {**PHASES, **POST_PHASES}, "phases")
    bundles = _bundles_dir(cfg)
    enabled = [n for n in PHASES if phases.get(n) is not None and phases.get(n) is not False]
    configs = {n: bundle_config_files(bundles / PHASES[n][0], PHASES[n][1]) for n in enabled}
    missing = [f"phases.{n}: bundle config {f} not found" for n, c in configs.items() for f in c if not f.is_file()]
    if missing:
        return problems + missing
    from .bundle.overrides import load_bundle_config

    loaded = {n: load_bundle_config(c) for n, c in configs.items()}
    for n in enabled:
        problems += unknown_overrides(phases[n] or {}, configs[n], f"phases.{n}", loaded[n])
    common = cfg.get("common") or {}
    if not isinstance(common, Mapping):
        return [*problems, f"common: expected a mapping of bundle overrides, got {common!r}"]
    from .bundle.overrides import did_you_mean, unknown_override

    keys = {k for c in loaded.values() for k in c}
    for k in common:  # a common key goes to each phase whose config has it: it must name a key of one
        if loaded and all(unknown_override(str(k), c) for c in loaded.values()):
            problems.append(f"common: unknown bundle override {k!r} is not a key of any phase's bundle config"
                            f"{did_you_mean(str(k).split('#')[0], keys)}")
    return problems


def for_config(overrides: Mapping[str, Any], config_file: Path | Sequence[Path]) -> dict[str, Any]:
    """The ``common`` overrides that name a key of this bundle config (the rest are for other phases)."""
    from .bundle.overrides import load_bundle_config, unknown_override

    config = load_bundle_config(_files(config_file))
    return {k: v for k, v in overrides.items() if unknown_override(str(k), config) is None}


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
        parent_path = Path(_resolve(parent if str(parent).startswith("@") else f"@{parent}", path.parent))
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
    return _resolve(value, base)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _resolve(value: Any, base: Path) -> Any:
    """``@rel/path`` strings in a config are paths relative to the config file."""
    if isinstance(value, str) and value.startswith("@") and not value.startswith("@@"):
        return str((base / value[1:]).resolve())
    return value


def _bundles_dir(cfg: Mapping[str, Any]) -> Path:
    from .bundle.locate import bundles_root  # here: importing the bundle layer loads torch and MONAI

    return Path(cfg["bundles_dir"]) if cfg.get("bundles_dir") else bundles_root()


def _source_args(data: Mapping[str, Any], base: Path) -> list[str]:
    """``medssl index`` arguments for the data source: a folder, ``dicomweb`` or ``dimse`` (+ the cohort).

    ``dicomweb`` is a URL or ``{url, auth_file, ca_bundle, cache, download_workers, timeout}``; ``dimse`` is
    ``HOST:PORT`` or ``{address, calling_ae, called_ae, cache, timeout}``. Credentials never go in a config
    (the run folder keeps copies of it): the environment or an ``auth_file`` carries them.
    """
    sources = [k for k in ("dicom_root", "dicomweb", "dimse") if data.get(k)]
    if len(sources) != 1:
        raise ValueError(f"data: give exactly one of dicom_root, dicomweb, dimse (got {sources or 'none'})")
    kind = sources[0]
    if kind == "dicom_root":
        args = [_resolve(data["dicom_root"], base)]
    else:
        spec = data[kind] if isinstance(data[kind], Mapping) else {"url" if kind == "dicomweb" else "address": data[kind]}
        secrets = sorted(k for k in spec if k.lower() in _SECRET_KEYS)
        if secrets:
            raise ValueError(f"data.{kind}: {secrets} must not be in a config (it is copied into the run folder): "
                             "use MEDSSL_DICOMWEB_USER/MEDSSL_DICOMWEB_PASSWORD, MEDSSL_DICOMWEB_TOKEN or auth_file")
        known = {"dicomweb": {"url", "auth_file", "ca_bundle", "cache", "download_workers", "timeout"},
                 "dimse": {"address", "calling_ae", "called_ae", "cache", "timeout"}}[kind]
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"data.{kind}: unknown keys {unknown} (known: {sorted(known)})")
        main_key = "url" if kind == "dicomweb" else "address"
        args = [f"--{kind}", str(spec[main_key])]
        for key, value in spec.items():
            if key != main_key and value is not None:
                value = _resolve(value, base) if key in ("auth_file", "ca_bundle", "cache") else value
                args += [f"--{key.replace('_', '-')}", str(value)]
    from .data.cohort import CohortFilter

    return args + CohortFilter.from_config(data.get(DATA_COHORT_KEY)).command_line()


def prepare_data(cfg: Mapping[str, Any], run_dir: Path, force: bool = False) -> Path | None:
    """Index a DICOM tree or a PACS cohort (pseudonymised, labels joined) and split it by patient; or use a
    given manifest."""
    data = cfg.get("data") or {}
    base = Path(cfg["_base"])
    if "manifest" in data:
        return Path(_resolve(data["manifest"], base))
    if not any(data.get(k) for k in ("dicom_root", "dicomweb", "dimse")):
        return None
    from .cli import main as cli

    manifest = run_dir / "data" / "manifest.csv"
    if manifest.is_file() and not force:
        logger.info("data: %s exists, kept (use --force to rebuild)", manifest)
        return manifest
    args = ["index", *_source_args(data, base), "--out", str(manifest), "--full"]
    if data.get("pseudonymize", True):
        args += ["--pseudonymize", str(run_dir / "data" / "salt.key")]
    if data.get("labels"):
        args += ["--labels", _resolve(data["labels"], base)]
    if cli(["--debug", *args]) != 0:  # --debug: its error reaches our caller as an exception, said once
        raise RuntimeError(f"indexing {args[1]} failed")
    split = data.get("split", {"train": 0.6, "val": 0.2, "test": 0.2})
    fractions = ",".join(f"{k}={v}" for k, v in split.items())
    label_fractions = ",".join(str(f) for f in data.get("label_fractions", [0.1, 0.2, 1.0]))
    if cli(["--debug", "split", str(manifest), "--fractions", fractions, "--label-fractions", label_fractions,
            "--seed", str(data.get("seed", 0))]) != 0:
        raise RuntimeError("splitting the manifest failed")
    return manifest


def _cli_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def check_overrides(bundle_src: Path, config_file: str | Sequence[str], overrides: Mapping[str, Any], tag: str,
                    allow_expressions: bool = False) -> None:
    """Refuse, before launching, overrides that name no key of the bundle config (a typo would silently
    add an unused key) and values MONAI would run or resolve (unless ``allow_expressions``)."""
    problems = unknown_overrides(overrides, bundle_config_files(bundle_src, config_file), tag)
    if not allow_expressions:
        from .bundle.overrides import interpreted_values

        problems += [f"{tag}: override {f}" for f in interpreted_values(dict(overrides))]
    if problems:
        raise ValueError("; ".join(problems))


def _failure_line(log: Path) -> str:
    """The root cause of a bundle's failure from its log (``ValueError: unknown backbone ...``), for a
    one-line message: the first exception of the last traceback chain (MONAI wraps the real error in
    ``RuntimeError: Failed to instantiate ...``)."""
    import re

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
    ``run_dir/configs/<tag>.json``, the output to ``run_dir/logs/<tag>.log``. Overrides are checked first
    (:func:`check_overrides`): ``allow_expressions`` is the experiment config's opt-in.
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
        {"bundle": bundle_src.name, "config_file": files if len(files) > 1 else files[0], "overrides": dict(overrides), "command": cmd},
        indent=1))
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[{tag}] {bundle_src.name}/{'+'.join(files)} ...", flush=True)
    with open(logs / f"{tag}.log", "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
    if r.returncode != 0:
        raise RuntimeError(f"phase {tag} failed (exit {r.returncode}); see {logs / f'{tag}.log'}"
                           f"{_failure_line(logs / f'{tag}.log')}")
    print(f"[{tag}] done in {time.time() - t0:.0f} s", flush=True)
    if not done.is_file():  # config files that leave no model behind (evaluation) mark completion here
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"seconds": time.time() - t0}) + "\n")
    return root


def run_phase(name: str, cfg: Mapping[str, Any], run_dir: Path, overrides: Mapping[str, Any], force: bool) -> Path:
    """Run one phase's bundle in ``run_dir/<phase>/<bundle>``; returns that bundle root."""
    bundle, config_file, _ = PHASES[name]
    root = run_dir / _RUNS_IN.get(name, name) / bundle
    return run_bundle(_bundles_dir(cfg) / bundle, config_file, root, overrides, run_dir, name,
                      root / _DONE.get(name, "models/model.pt"), copy=name not in _RUNS_IN, force=force,
                      allow_expressions=cfg.get("allow_expressions") is True)


def phase_seconds(run_dir: Path, name: str) -> float | None:
    """Wall time of a phase from its log's first and last timestamps (None when unknown)."""
    log = run_dir / "logs" / f"{name}.log"
    if not log.is_file():
        return None
    import re
    from datetime import datetime

    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+", log.read_text(), flags=re.M)
    if len(stamps) < 2:
        return None
    fmt = "%Y-%m-%d %H:%M:%S"
    return (datetime.strptime(stamps[-1], fmt) - datetime.strptime(stamps[0], fmt)).total_seconds()


def bundle_minutes(run_dir: Path) -> float:
    """Minutes spent in the bundle runs of a run folder, summed from their logs: unlike the wall time of one
    invocation, it survives resuming (a run resumed after a kill counts from its resume)."""
    return sum(phase_seconds(run_dir, log.stem) or 0.0 for log in (run_dir / "logs").glob("*.log")) / 60


def run_label_efficiency(cfg: Mapping[str, Any], run_dir: Path, manifest: Path, finetune: Mapping[str, Any],
                         force: bool = False, finetune_root: Path | None = None) -> Path:
    """The fine-tuning phase's recipe repeated per label fraction x seed, from its pretrained backbone and
    from a random init; last-epoch validation metrics go to ``label_efficiency/results.csv``. The point the
    fine-tuning phase itself trained (pretrained, its fraction and seed) is read from ``finetune_root``.

    Config: ``{"fractions": [0.1, 1.0], "seeds": {"0.1": [0, 1, 2], "1.0": [0]}, "inits": ["pretrained",
    "random"]}`` (``seeds`` may also be one list for every fraction).
    """
    from .report import final_validation

    le = cfg["label_efficiency"]
    seeds = le.get("seeds", [0, 1, 2])
    base = dict(finetune["overrides"])
    rows = []
    for init in le.get("inits", ["pretrained", "random"]):
        for frac in (float(f) for f in le.get("fractions", [0.1, 0.2, 1.0])):
            if isinstance(seeds, Mapping):
                by_fraction = {float(k): v for k, v in seeds.items()}
                if frac not in by_fraction:
                    raise ValueError(f"label_efficiency: no seeds for fraction {frac} (seeds has {sorted(by_fraction)})")
            for seed in by_fraction[frac] if isinstance(seeds, Mapping) else seeds:
                root = run_dir / "label_efficiency" / f"{init}_f{frac:g}_s{seed}" / "finetune_classification"
                same_as_phase = (init == "pretrained" and finetune_root is not None
                                 and frac == float(base.get("label_fraction", 1.0)) and seed == int(base.get("seed", 0)))
                if same_as_phase:
                    root = finetune_root
                overrides = {**base, "label_fraction": frac, "seed": seed, "manifest": str(manifest)}
                if init == "random":
                    overrides["pretrained_ckpt"] = None
                elif not overrides.get("pretrained_ckpt"):
                    raise ValueError("label_efficiency: the fine-tuning phase has no pretrained checkpoint to compare")
                if not same_as_phase:
                    run_bundle(_bundles_dir(cfg) / "finetune_classification", "train.json", root, overrides, run_dir,
                               f"le_{init}_{frac:g}_s{seed}", root / "models" / "model.pt", force=force,
                               allow_expressions=cfg.get("allow_expressions") is True)
                last = final_validation(root / "output" / "tensorboard")
                rows.append({"arm": init, "fraction": frac, "seed": seed, "auc_macro": last["auc_macro"],
                             "balanced_accuracy": last.get("balanced_accuracy", float("nan"))})
    out = run_dir / "label_efficiency" / "results.csv"
    out.parent.mkdir(parents=True, exist_ok=True)  # absent when the only point is the phase's own
    import pandas as pd

    pd.DataFrame(rows).to_csv(out, index=False)
    return out


def run_results_to_pacs(spec: Mapping[str, Any], predict_root: Path, manifest: Path, run_dir: Path, base: Path,
                        force: bool = False) -> Path:
    """The results-to-PACS phase: an SR per predicted image in ``run_dir/results_to_pacs`` (private: original
    UIDs), sent by STOW-RS when ``spec`` has ``stow`` (a DICOMweb URL; ``auth_file``/``ca_bundle`` optional)."""
    from .cli import main as cli

    out = run_dir / "results_to_pacs"
    if (out / "results.csv").is_file() and not force:
        logger.info("results_to_pacs: %s exists, skipped (use --force to re-run)", out / "results.csv")
        return out
    unknown = sorted(set(spec) - {"stow", "auth_file", "ca_bundle"})
    if unknown:
        raise ValueError(f"phases.results_to_pacs: unknown keys {unknown} (stow, auth_file, ca_bundle); credentials "
                         "come from the environment or auth_file")
    args = ["results-to-dicom", "--bundle", str(predict_root), "--manifest", str(manifest), "--out", str(out)]
    for key in ("stow", "auth_file", "ca_bundle"):
        if spec.get(key):
            args += [f"--{key.replace('_', '-')}", str(_resolve(spec[key], base) if key != "stow" else spec[key])]
    if cli(args) != 0:
        raise RuntimeError("results_to_pacs failed (see the message above)")
    return out


def run_pipeline(config: str | os.PathLike | Mapping[str, Any], run_dir: str | os.PathLike | None = None,
                 force: bool = False) -> dict[str, Path]:
    """Run every phase named in the config's ``phases`` (in PHASES order), handing checkpoints over."""
    source = str(config) if not isinstance(config, Mapping) else "pipeline config"
    if isinstance(config, Mapping):
        check_data_config(config, source)
    cfg = load_pipeline_config(config) if not isinstance(config, Mapping) else dict(config)
    problems = validate_pipeline(cfg)
    if problems:  # before anything runs: a typo found after an hour of pretraining costs that hour
        raise ValueError(f"{source}: " + "; ".join(problems))
    cfg.setdefault("_base", os.getcwd())
    base = Path(cfg["_base"])
    run = Path(run_dir or _resolve(cfg.get("run_dir", "runs/pipeline"), base))
    run.mkdir(parents=True, exist_ok=True)
    manifest = prepare_data(cfg, run, force)
    common = {k: _resolve(v, base) for k, v in (cfg.get("common") or {}).items()}
    roots: dict[str, Path] = {}
    for name in PHASES:
        phase = cfg["phases"].get(name)
        if phase is None or phase is False:
            continue
        bundle, config_file, _ = PHASES[name]
        overrides: dict[str, Any] = for_config(common, bundle_config_files(_bundles_dir(cfg) / bundle, config_file))
        if manifest is not None and name != "simclr":
            overrides["manifest"] = str(manifest)
        start = PHASES[name][2]
        if start and start in roots:
            overrides["pretrained_ckpt"] = str(roots[start] / "models" / "model.pt")
        if name == "finetune" and "pretrained_ckpt" not in overrides and "simclr" in roots:
            overrides["pretrained_ckpt"] = str(roots["simclr"] / "models" / "model.pt")
        if name in _RUNS_IN:
            if _RUNS_IN[name] not in roots:
                raise ValueError(f"phase {name!r} needs phase {_RUNS_IN[name]!r} in the same config")
            overrides.pop("pretrained_ckpt", None)
        overrides.update({k: _resolve(v, base) for k, v in (phase or {}).items()})
        roots[name] = run_phase(name, cfg, run, overrides, force)
    sr_phase = cfg["phases"].get("results_to_pacs")
    if sr_phase is not None and sr_phase is not False:
        if "predict" not in roots or manifest is None:
            raise ValueError("phase 'results_to_pacs' needs phase 'predict' and a data manifest in the same config")
        roots["results_to_pacs"] = run_results_to_pacs(sr_phase or {}, roots["predict"], manifest, run, base, force)
    if cfg.get("label_efficiency") and manifest is not None and "finetune" in roots:
        run_label_efficiency(cfg, run, manifest, json.loads((run / "configs" / "finetune.json").read_text()), force,
                             finetune_root=roots["finetune"])
    if cfg.get("report", True) and manifest is not None and "finetune" in roots:
        from .report import build_report

        report = build_report(run, roots, manifest, cfg)
        print(f"report: {report}")
    return roots
