"""``medssl pipeline CONFIG``: data -> phase 1 -> phase 2 -> phase 3 -> evaluation, by calling the bundles.

Each phase runs its bundle through MONAI's own CLI (:func:`~medssl_monai.experiments.runner.run_bundle`) on a
copy of the bundle inside the run folder, so the run folder holds every config and override used, every
log, TensorBoard file and checkpoint. A phase whose ``models/model.pt`` exists is skipped (``--force``
re-runs it), and a killed phase resumes from its own checkpoints when run again. What comes after the
runs (the report, results sent back to the PACS) is the caller's ``finish`` step: see
:mod:`medssl_monai.reporting.pipeline_report`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.value_types import ValueType
from .config import (
    bundle_config_files,
    bundles_dir,
    check_data_config,
    check_types,
    current_names,
    for_config,
    load_config,
    resolve_path,
    unknown_keys,
    unknown_overrides,
    wrong_values,
)
from .label_efficiency import grid_points, run_grid
from .results import final_validation
from .runner import run_bundle

__all__ = ["PHASES", "POST_PHASES", "PipelineRun", "prepare_data", "run_label_efficiency", "run_pipeline",
           "validate_pipeline"]

logger = logging.getLogger(__name__)

#: phase name -> (bundle, config file, the phase whose model it starts from)
PHASES: dict[str, tuple[str, str, str | None]] = {
    "phase1": ("simclr_natural", "train.json", None),
    "micle": ("micle_medical", "train.json", "phase1"),
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
#: the ``select`` phase (not a bundle): which images the fine-tuning phase trains on, chosen on a pretraining
#: phase's embedding (:func:`~medssl_monai.experiments.select.select_manifest`); its keys
SELECT_KEYS = frozenset({"strategy", "fraction", "budget", "level", "seed", "stratify", "split", "embed_with"})
#: ``data`` keys naming a PACS source (instead of ``dicom_root``), and the cohort filter for any source
DATA_SOURCE_KEYS = ("dicom_root", "dicomweb", "dimse", "manifest")
DATA_COHORT_KEY = "cohort"


#: top-level keys of a pipeline config (besides ``_comment``-style keys starting with ``_``)
PIPELINE_KEYS = frozenset({"run_dir", "data", "common", "phases", "label_efficiency", "report", "bundles_dir",
                           "allow_expressions"})
_DATA_KEYS = frozenset({"labels", "label_key", "pseudonymize", "salt_in_run_dir", "split", "label_fractions", "seed",
                        DATA_COHORT_KEY, *DATA_SOURCE_KEYS})
_LABEL_EFFICIENCY_KEYS = frozenset({"fractions", "seeds", "inits"})
_INITS = ("pretrained", "random")
_FRACTION = ValueType("number", 0, 1, open_low=True)
_SEED = ValueType("int", 0)
_STR = ValueType("str")
#: the documented keys' types and ranges (``check_types``); bundle overrides have ``OVERRIDE_TYPES``
PIPELINE_TYPES: dict[str, Any] = {
    "run_dir": _STR, "bundles_dir": ValueType("str", null=True), "allow_expressions": ValueType("bool"),
    "report": ValueType("bool"),
    "data": {"labels": _STR, "label_key": _STR, "pseudonymize": ValueType("path_or_bool"),
             "salt_in_run_dir": ValueType("bool"), "split": ValueType("mapping", item=ValueType("number", 0, 1)),
             "label_fractions": ValueType("list", item=_FRACTION), "seed": _SEED, "dicom_root": _STR,
             "manifest": _STR, "dicomweb": {}, "dimse": {}, DATA_COHORT_KEY: {}},
    "label_efficiency": {"fractions": ValueType("list", item=_FRACTION),
                         "inits": ValueType("list", item=ValueType("choice", choices=_INITS))},
}


#: former phase names -> current ones (``simclr`` became ``phase1``: one name for phase 1 in every config)
RENAMED_PHASES = {"simclr": "phase1"}


def with_current_names(cfg: Mapping[str, Any], warn: bool = True) -> tuple[dict[str, Any], list[str]]:
    """The config with former phase names moved to the current ones (a warning each)."""
    phases, problems = current_names(cfg.get("phases"), RENAMED_PHASES, "phases", warn=warn)
    return ({**cfg, "phases": phases} if "phases" in cfg else dict(cfg)), problems


def validate_pipeline(cfg: Mapping[str, Any]) -> list[str]:
    """Problems with a pipeline config (empty when it can run): unknown keys anywhere, with the nearest
    known name, and bundle overrides that name no key of the phase's bundle config."""
    cfg, problems = with_current_names(cfg, warn=False)
    problems += unknown_keys(cfg, PIPELINE_KEYS, "top level", comments=True)
    problems += unknown_keys(cfg.get("data") or {}, _DATA_KEYS, "data", comments=True)
    problems += check_types(cfg, PIPELINE_TYPES)
    data = cfg.get("data") or {}
    problems += _salt_problems(cfg)
    if isinstance(data, Mapping) and "label_key" in data:
        from ..data.labels import LABEL_KEYS

        if data["label_key"] not in LABEL_KEYS:
            problems.append(f"data.label_key: {data['label_key']!r} is not one of {list(LABEL_KEYS)}")
    le = cfg.get("label_efficiency") or {}
    problems += unknown_keys(le, _LABEL_EFFICIENCY_KEYS, "label_efficiency", comments=True)
    if isinstance(le, Mapping) and "seeds" in le:
        seeds = le["seeds"]
        each = list(seeds.values()) if isinstance(seeds, Mapping) else [seeds]
        for v in each:
            why = ValueType("list", item=_SEED).check(v)
            if why:
                problems.append(f"label_efficiency.seeds{'' if why[:1] in '[.' else ': '}{why}")
                break
    phases = cfg.get("phases")
    if not isinstance(phases, Mapping):
        return [*problems, f"phases: expected a mapping of phase -> bundle overrides, got {phases!r}"]
    problems += unknown_keys(phases, {**PHASES, **POST_PHASES, "select": None}, "phases")
    problems += select_problems(phases)
    bundles = bundles_dir(cfg)
    enabled = [n for n in PHASES if phases.get(n) is not None and phases.get(n) is not False]
    configs = {n: bundle_config_files(bundles / PHASES[n][0], PHASES[n][1]) for n in enabled}
    missing = [f"phases.{n}: bundle config {f} not found" for n, c in configs.items() for f in c if not f.is_file()]
    if missing:
        return problems + missing
    from ..bundle.overrides import load_bundle_config

    loaded = {n: load_bundle_config(c) for n, c in configs.items()}
    for n in enabled:
        problems += unknown_overrides(phases[n] or {}, configs[n], f"phases.{n}", loaded[n])
        problems += wrong_values(phases[n] or {}, f"phases.{n}")
    common = cfg.get("common") or {}
    if not isinstance(common, Mapping):
        return [*problems, f"common: expected a mapping of bundle overrides, got {common!r}"]
    problems += wrong_values(common, "common")
    from ..bundle.overrides import did_you_mean, unknown_override

    keys = {k for c in loaded.values() for k in c}
    for k in common:  # a common key goes to each phase whose config has it: it must name a key of one
        if loaded and all(unknown_override(str(k), c) for c in loaded.values()):
            problems.append(f"common: unknown bundle override {k!r} is not a key of any phase's bundle config"
                            f"{did_you_mean(str(k).split('#')[0], keys)}")
    return problems


def select_problems(phases: Mapping[str, Any]) -> list[str]:
    """``phases.select``: known keys and values, one budget, and the phases it sits between."""
    sel = phases.get("select")
    if sel is None or sel is False:
        return []
    if not isinstance(sel, Mapping):
        return [f"phases.select: expected a mapping of selection settings, got {sel!r}"]
    from ..selection import LEVEL_COLUMNS, STRATEGIES

    problems = unknown_keys(sel, SELECT_KEYS, "phases.select")
    if sel.get("strategy", "typiclust") not in STRATEGIES:
        problems.append(f"phases.select.strategy: {sel['strategy']!r} is not one of {sorted(STRATEGIES)}")
    if sel.get("level", "patient") not in LEVEL_COLUMNS:
        problems.append(f"phases.select.level: {sel['level']!r} is not one of {sorted(LEVEL_COLUMNS)}")
    if ("fraction" in sel) == ("budget" in sel):
        problems.append("phases.select: give one of 'fraction' (of the pool's groups) or 'budget' (a count)")
    elif "fraction" in sel and not (isinstance(sel["fraction"], (int, float)) and 0 < sel["fraction"] < 1):
        problems.append(f"phases.select.fraction: a number in (0, 1), got {sel['fraction']!r}")
    elif "budget" in sel and not (isinstance(sel["budget"], int) and sel["budget"] > 0):
        problems.append(f"phases.select.budget: a whole number > 0, got {sel['budget']!r}")
    if not isinstance(sel.get("seed", 0), int):
        problems.append(f"phases.select.seed: a whole number, got {sel['seed']!r}")
    embed_with = sel.get("embed_with")
    if embed_with is not None and embed_with not in ("phase1", "micle"):
        problems.append(f"phases.select.embed_with: 'phase1' or 'micle', got {embed_with!r}")
    on = lambda n: phases.get(n) is not None and phases.get(n) is not False  # noqa: E731
    if not on("finetune"):
        problems.append("phases.select: chooses what phase 'finetune' trains on; add phase 'finetune'")
    elif isinstance(phases["finetune"], Mapping) and "label_fraction" in phases["finetune"]:
        problems.append("phases.finetune.label_fraction: set by phases.select (its budget); remove one")
    if not (on(embed_with) if embed_with else on("micle") or on("phase1")):
        problems.append(f"phases.select: embeds with phase {embed_with or 'micle or phase1'!r}, which is not in "
                        "the config")
    return problems


def run_select(sel: Mapping[str, Any], run: Path, manifest: Path, roots: Mapping[str, Path],
               common: Mapping[str, Any]) -> tuple[Path, float]:
    """The ``select`` phase: the worklist and a manifest copy in ``run/select``; returns that manifest and
    the ``label_fraction`` the unchanged fine-tune bundle reads it with (its ``labeled_<p>pct`` column).
    Only the ``split`` pool (default ``train``) is embedded and chosen from, never validation or test."""
    from .select import select_manifest

    phase = sel.get("embed_with") or ("micle" if "micle" in roots else "phase1")
    arch = {k: common[k] for k in ("backbone", "in_channels", "image_size") if k in common}
    result = select_manifest(
        manifest, roots[phase] / "models" / "model.pt", run / "select",
        budgets=[sel["budget"]] if "budget" in sel else [], fractions=[sel["fraction"]] if "fraction" in sel else [],
        level=sel.get("level", "patient"), strategy=sel.get("strategy", "typiclust"), seed=int(sel.get("seed", 0)),
        stratify=list(sel.get("stratify") or ()), split=sel.get("split", "train"), **arch)
    return result.manifest, float(result.budgets[0]["label_fraction"])


def prepare_data(cfg: Mapping[str, Any], run_dir: Path, force: bool = False) -> Path | None:
    """Index a DICOM tree or a PACS cohort (pseudonymised, labels joined) and split it by patient; or use a
    given manifest. ``None``: the config names no data (phases then bring their own)."""
    from ..ingest import SOURCE_KEYS, index_source, split_manifest

    data = cfg.get("data") or {}
    base = Path(cfg["_base"])
    if "manifest" in data:
        return Path(resolve_path(data["manifest"], base))
    if not any(data.get(k) for k in SOURCE_KEYS):
        return None
    manifest = run_dir / "data" / "manifest.csv"
    if manifest.is_file() and not force:
        logger.info("data: %s exists, kept (use --force to rebuild)", manifest)
        return manifest
    sources = {k: _source_paths(data[k], base) for k in SOURCE_KEYS if data.get(k)}
    stats = index_source(manifest, **sources, cohort=data.get(DATA_COHORT_KEY),
                         labels=resolve_path(data["labels"], base) if data.get("labels") else None,
                         **({"label_key": data["label_key"]} if "label_key" in data else {}),
                         pseudonymize=salt_file(cfg, run_dir))
    print(f"[data] indexed {stats['instances']} image rows of {stats['patients']} patients "
          f"({stats['files_skipped']} files skipped) -> {manifest}", flush=True)
    split_manifest(manifest, data.get("split", {"train": 0.6, "val": 0.2, "test": 0.2}),
                   [float(f) for f in data.get("label_fractions", [0.1, 0.2, 1.0])], seed=int(data.get("seed", 0)))
    return manifest


def salt_file(cfg: Mapping[str, Any], run_dir: Path) -> Path | None:
    """The salt a pipeline pseudonymises with: ``data.pseudonymize`` true (the default) makes one in
    ``<run>/data/salt.key``; a path names an existing, private salt (``medssl index --pseudonymize`` makes one);
    false: none. See :func:`_salt_problems` for what is refused."""
    data = cfg.get("data") or {}
    value = data.get("pseudonymize", True)
    if value is False:
        return None
    if value is True:
        return run_dir / "data" / "salt.key"
    return Path(resolve_path(value, Path(cfg.get("_base", "."))))


def _salt_problems(cfg: Mapping[str, Any], run_dir: Path | None = None) -> list[str]:
    """A salt path that does not exist (a typo would make a new salt, and new pseudonyms, silently), that
    group/others may read, or that lies in the run folder or beside the manifest without
    ``data.salt_in_run_dir: true``: the run folder is what gets copied, shared and archived, and the salt beside
    the pseudonymised manifest re-identifies it."""
    data = cfg.get("data") or {}
    value = data.get("pseudonymize", True) if isinstance(data, Mapping) else True
    if not isinstance(value, str) or ValueType("path_or_bool").check(value):
        return []  # true/false, or a wrong type (check_types says so)
    base = Path(cfg.get("_base", "."))
    salt = Path(resolve_path(value, base)).absolute()
    if not salt.is_file():
        return [f"data.pseudonymize: salt file {salt} does not exist; make it once, outside the run folder "
                f"(medssl index ... --pseudonymize {salt}), or set pseudonymize: true for a new salt in the run folder"]
    if os.name == "posix" and salt.stat().st_mode & 0o077:
        return [f"data.pseudonymize: salt file {salt} is open to group/others (mode "
                f"{salt.stat().st_mode & 0o777:04o}); it is the re-identification key: chmod 600 {salt}"]
    if data.get("salt_in_run_dir") is True:
        return []
    run = Path(run_dir) if run_dir else Path(resolve_path(cfg.get("run_dir", "runs/pipeline"), base))
    places = [("the run folder", run.absolute())]
    if data.get("manifest"):
        places.append(("the manifest's folder", Path(resolve_path(data["manifest"], base)).absolute().parent))
    for name, folder in places:
        if _inside(salt, folder):
            return [f"data.pseudonymize: salt file {salt} is inside {name} ({folder}), which is shared with the "
                    f"pseudonymised data; move it out, or set data.salt_in_run_dir: true to keep it there"]
    return []


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _source_paths(spec: Any, base: Path) -> Any:
    """A data source with its ``@`` paths resolved (the folder; a PACS source's auth, CA and cache files)."""
    if not isinstance(spec, Mapping):
        return resolve_path(spec, base)
    return {k: resolve_path(v, base) if k in ("auth_file", "ca_bundle", "client_cert", "client_key", "local_copy",
                                              "cache") else v for k, v in spec.items()}


def run_phase(name: str, cfg: Mapping[str, Any], run_dir: Path, overrides: Mapping[str, Any], force: bool) -> Path:
    """Run one phase's bundle in ``run_dir/<phase>/<bundle>``; returns that bundle root."""
    bundle, config_file, _ = PHASES[name]
    root = run_dir / _RUNS_IN.get(name, name) / bundle
    return run_bundle(bundles_dir(cfg) / bundle, config_file, root, overrides, run_dir, name,
                      root / _DONE.get(name, "models/model.pt"), copy=name not in _RUNS_IN, force=force,
                      allow_expressions=cfg.get("allow_expressions") is True)


def run_label_efficiency(cfg: Mapping[str, Any], run_dir: Path, manifest: Path, finetune: Mapping[str, Any],
                         force: bool = False, finetune_root: Path | None = None) -> Path:
    """The fine-tuning phase's recipe repeated per label fraction x seed, from its pretrained backbone and
    from a random init (:func:`~medssl_monai.experiments.label_efficiency.run_grid`); last-epoch validation
    metrics go to ``label_efficiency/results.csv``. The point the fine-tuning phase itself trained
    (pretrained, its fraction and seed) is read from ``finetune_root``.

    Config: ``{"fractions": [0.1, 1.0], "seeds": {"0.1": [0, 1, 2], "1.0": [0]}, "inits": ["pretrained",
    "random"]}`` (``seeds`` may also be one list for every fraction).
    """
    import pandas as pd

    from .label_efficiency import GridPoint

    le = cfg["label_efficiency"]
    seeds = le.get("seeds", [0, 1, 2])
    base = dict(finetune["overrides"])
    inits = list(le.get("inits", ["pretrained", "random"]))
    if "pretrained" in inits and not base.get("pretrained_ckpt"):
        raise ValueError("label_efficiency: the fine-tuning phase has no pretrained checkpoint to compare")
    try:
        points = grid_points(inits, [float(f) for f in le.get("fractions", [0.1, 0.2, 1.0])],
                             {float(k): v for k, v in seeds.items()} if isinstance(seeds, Mapping) else seeds)
    except ValueError as e:
        raise ValueError(f"label_efficiency: {e}") from None
    phase_point = GridPoint("pretrained", float(base.get("label_fraction", 1.0)), int(base.get("seed", 0)))
    roots = run_grid(points, {"pretrained": base.get("pretrained_ckpt"), "random": None},
                     {k: v for k, v in base.items() if k not in ("label_fraction", "seed", "manifest")}, manifest,
                     bundles_dir(cfg) / "finetune_classification", run_dir,
                     folder="label_efficiency/{arm}_f{fraction:g}_s{seed}", tag="le_{arm}_{fraction:g}_s{seed}",
                     done={phase_point: finetune_root} if finetune_root is not None else None, force=force,
                     allow_expressions=cfg.get("allow_expressions") is True)
    rows = []
    for p, root in zip(points, roots):
        last = final_validation(root / "output")
        rows.append({"arm": p.arm, "fraction": p.fraction, "seed": p.seed, "auc_macro": last["auc_macro"],
                     "balanced_accuracy": last.get("balanced_accuracy", float("nan"))})
    out = run_dir / "label_efficiency" / "results.csv"
    out.parent.mkdir(parents=True, exist_ok=True)  # absent when the only point is the phase's own
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


@dataclass(frozen=True)
class PipelineRun:
    """A finished pipeline run, as the ``finish`` step of :func:`run_pipeline` receives it."""

    cfg: Mapping[str, Any]
    run_dir: Path
    roots: Mapping[str, Path]
    manifest: Path | None
    force: bool = False


#: the step after the runs: the report and results sent back to the PACS (:mod:`..reporting.pipeline_report`)
Finish = Callable[[PipelineRun], Mapping[str, Path] | None]


def run_pipeline(config: str | os.PathLike | Mapping[str, Any], run_dir: str | os.PathLike | None = None,
                 force: bool = False, finish: Finish | None = None) -> dict[str, Path]:
    """Run every phase named in the config's ``phases`` (in PHASES order), handing checkpoints over, then the
    label-efficiency grid; then ``finish`` (whose returned folders join the returned ones). Without
    ``finish``, a config naming a post-phase (``results_to_pacs``) is refused before anything runs."""
    source = str(config) if not isinstance(config, Mapping) else "pipeline config"
    if isinstance(config, Mapping):
        check_data_config(config, source)
    cfg = load_config(config) if not isinstance(config, Mapping) else dict(config)
    problems = validate_pipeline(cfg)
    cfg = with_current_names(cfg)[0]
    sr_phase = cfg["phases"].get("results_to_pacs") if isinstance(cfg.get("phases"), Mapping) else None
    wants_sr = sr_phase is not None and sr_phase is not False
    if wants_sr and finish is None:
        problems.append("phases.results_to_pacs: a reporting step; run it through `medssl pipeline` "
                        "(medssl_monai.reporting.pipeline_report.run_pipeline_and_report)")
    if problems:  # before anything runs: a typo found after an hour of pretraining costs that hour
        raise ValueError(f"{source}: " + "; ".join(problems))
    cfg.setdefault("_base", os.getcwd())
    base = Path(cfg["_base"])
    run = Path(run_dir or resolve_path(cfg.get("run_dir", "runs/pipeline"), base))
    if run_dir and (salt := _salt_problems(cfg, run)):  # the run folder given on the command line
        raise ValueError(f"{source}: " + "; ".join(salt))
    run.mkdir(parents=True, exist_ok=True)
    from .bundle_process import warm_up

    warm_up()  # the bundle runs' fork server imports MONAI while the data is indexed
    manifest = prepare_data(cfg, run, force)
    common = {k: resolve_path(v, base) for k, v in (cfg.get("common") or {}).items()}
    roots: dict[str, Path] = {}
    if wants_sr and ("predict" not in cfg["phases"] or manifest is None):
        raise ValueError("phase 'results_to_pacs' needs phase 'predict' and a data manifest in the same config")
    for name in PHASES:
        phase = cfg["phases"].get(name)
        if phase is None or phase is False:
            continue
        bundle, config_file, _ = PHASES[name]
        overrides: dict[str, Any] = for_config(common, bundle_config_files(bundles_dir(cfg) / bundle, config_file))
        if manifest is not None and name != "phase1":
            overrides["manifest"] = str(manifest)
        start = PHASES[name][2]
        if start and start in roots:
            overrides["pretrained_ckpt"] = str(roots[start] / "models" / "model.pt")
        if name == "finetune" and "pretrained_ckpt" not in overrides and "phase1" in roots:
            overrides["pretrained_ckpt"] = str(roots["phase1"] / "models" / "model.pt")
        if name in _RUNS_IN:
            if _RUNS_IN[name] not in roots:
                raise ValueError(f"phase {name!r} needs phase {_RUNS_IN[name]!r} in the same config")
            overrides.pop("pretrained_ckpt", None)
            if bundle == "finetune_classification":  # the trained bundle's recorded architecture wins
                from ..bundle.finetune import without_architecture

                overrides = without_architecture(overrides)
        sel = cfg["phases"].get("select")
        if name == "finetune" and sel:
            if manifest is None:
                raise ValueError("phase 'select' needs a data manifest in the same config")
            selected, fraction = run_select(sel, run, manifest, roots, common)
            overrides.update(manifest=str(selected), label_fraction=fraction)
        overrides.update({k: resolve_path(v, base) for k, v in (phase or {}).items()})
        roots[name] = run_phase(name, cfg, run, overrides, force)
    if cfg.get("label_efficiency") and manifest is not None and "finetune" in roots:
        run_label_efficiency(cfg, run, manifest, json.loads((run / "configs" / "finetune.json").read_text()), force,
                             finetune_root=None if cfg["phases"].get("select") else roots["finetune"])
    if finish is not None:
        roots.update(finish(PipelineRun(cfg, run, dict(roots), manifest, force)) or {})
    return roots
