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

from .config import (
    bundle_config_files,
    bundles_dir,
    check_data_config,
    for_config,
    load_config,
    resolve_path,
    unknown_keys,
    unknown_overrides,
)
from .label_efficiency import grid_points, run_grid
from .results import final_validation
from .runner import run_bundle

__all__ = ["PHASES", "POST_PHASES", "PipelineRun", "prepare_data", "run_label_efficiency", "run_pipeline",
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


#: top-level keys of a pipeline config (besides ``_comment``-style keys starting with ``_``)
PIPELINE_KEYS = frozenset({"run_dir", "data", "common", "phases", "label_efficiency", "report", "bundles_dir",
                           "allow_expressions"})
_DATA_KEYS = frozenset({"labels", "pseudonymize", "split", "label_fractions", "seed", DATA_COHORT_KEY,
                        *DATA_SOURCE_KEYS})
_LABEL_EFFICIENCY_KEYS = frozenset({"fractions", "seeds", "inits"})
_INITS = ("pretrained", "random")


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
    common = cfg.get("common") or {}
    if not isinstance(common, Mapping):
        return [*problems, f"common: expected a mapping of bundle overrides, got {common!r}"]
    from ..bundle.overrides import did_you_mean, unknown_override

    keys = {k for c in loaded.values() for k in c}
    for k in common:  # a common key goes to each phase whose config has it: it must name a key of one
        if loaded and all(unknown_override(str(k), c) for c in loaded.values()):
            problems.append(f"common: unknown bundle override {k!r} is not a key of any phase's bundle config"
                            f"{did_you_mean(str(k).split('#')[0], keys)}")
    return problems


def prepare_data(cfg: Mapping[str, Any], run_dir: Path, force: bool = False) -> Path | None:
    """Index a DICOM tree or a PACS cohort (pseudonymised, labels joined) and split it by patient; or use a
    given manifest. ``None``: the config names no data (phases then bring their own)."""
    from ..data.prepare import SOURCE_KEYS, index_source, split_manifest

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
                         pseudonymize=run_dir / "data" / "salt.key" if data.get("pseudonymize", True) else None)
    print(f"[data] indexed {stats['instances']} image rows of {stats['patients']} patients "
          f"({stats['files_skipped']} files skipped) -> {manifest}", flush=True)
    split_manifest(manifest, data.get("split", {"train": 0.6, "val": 0.2, "test": 0.2}),
                   [float(f) for f in data.get("label_fractions", [0.1, 0.2, 1.0])], seed=int(data.get("seed", 0)))
    return manifest


def _source_paths(spec: Any, base: Path) -> Any:
    """A data source with its ``@`` paths resolved (the folder; a PACS source's auth, CA and cache files)."""
    if not isinstance(spec, Mapping):
        return resolve_path(spec, base)
    return {k: resolve_path(v, base) if k in ("auth_file", "ca_bundle", "cache") else v for k, v in spec.items()}


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
    run.mkdir(parents=True, exist_ok=True)
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
            if bundle == "finetune_classification":  # the trained bundle's recorded architecture wins
                from ..bundle.finetune import without_architecture

                overrides = without_architecture(overrides)
        overrides.update({k: resolve_path(v, base) for k, v in (phase or {}).items()})
        roots[name] = run_phase(name, cfg, run, overrides, force)
    if cfg.get("label_efficiency") and manifest is not None and "finetune" in roots:
        run_label_efficiency(cfg, run, manifest, json.loads((run / "configs" / "finetune.json").read_text()), force,
                             finetune_root=roots["finetune"])
    if finish is not None:
        roots.update(finish(PipelineRun(cfg, run, dict(roots), manifest, force)) or {})
    return roots
