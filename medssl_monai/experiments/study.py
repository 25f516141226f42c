"""The label-efficiency study: does pretraining buy the same accuracy with fewer labels?

Arms (same backbone and fine-tuning recipe): ``random`` (supervised only), ``phase1`` (SimCLR on natural
images), ``phase1_simclr`` (phase 1 + SimCLR on the medical images, one image per item) and
``phase1_micle`` (phase 1 + MICLe on pairs of a lesion's different images) and ``supervised`` (a
classifier trained on the natural images' labels: the paper's supervised-ImageNet baseline). Each arm is fine-tuned on
label fractions (the manifest's nested ``labeled_<p>pct`` subsets) with several seeds and evaluated on the
validation split; the results table, the curve and the wall time go to the run folder.

    medssl study configs/experiments/ham10000_label_efficiency.json [--validate-only]

Beside the bundle sections, a study config may hold ``pretrained`` (``{"phase1" | arm: checkpoint}``: use
that model instead of training it, e.g. an imported ImageNet checkpoint for phase 1, or another run's),
``fractions_per_arm`` (``{arm: [fractions]}`` in place of ``fractions`` for that arm), ``parallel_finetunes``
(how many fine-tuning runs at once: on a GPU one small run leaves it mostly idle) and ``extends`` (a parent
config this one changes): the variants under ``configs/experiments/variants/`` are written so.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..bundle.finetune import without_architecture
from ..bundle.locate import bundle_path
from ..data.manifest import atomic_write_text, write_manifest
from .config import check_data_config, for_config, load_config, resolve_path, unknown_keys, unknown_overrides
from .label_efficiency import grid_points, run_grid
from .results import final_validation
from .runner import run_bundle

__all__ = ["ARMS", "StudySummary", "prepare_experiment", "run_study", "table_keys", "validate_study"]

logger = logging.getLogger(__name__)

#: arm -> (starts from phase 1, medical pretraining pairing or None)
ARMS: dict[str, tuple[bool, str | None]] = {
    "random": (False, None),
    "phase1": (True, None),
    "phase1_simclr": (True, "simclr"),
    "phase1_micle": (True, "micle"),
    "supervised": (False, None),
}
#: arms whose start is a classifier trained with labels on the natural images (``natural_dir``'s class
#: folders), the stand-in for supervised ImageNet transfer; its bundle overrides are the ``supervised`` section
SUPERVISED_ARMS = ("supervised",)


#: top-level keys of a study config (besides ``_comment``-style keys starting with ``_``)
STUDY_KEYS = frozenset({"run_dir", "table", "natural_dir", "common", "phase1", "medical", "medical_per_arm",
                        "finetune", "arms", "fractions", "fractions_per_arm", "seeds", "min_seeds", "eval_split",
                        "eval_from_validation", "pretrained", "parallel_finetunes", "supervised", "allow_expressions"})


def table_keys() -> set[str]:
    """Keys of a config's ``table`` section: ``path``, ``subset`` and :func:`table_to_manifest`'s options."""
    import inspect

    from ..data import table_to_manifest

    return set(inspect.signature(table_to_manifest).parameters) - {"table", "pseudonymizer"} | {"path", "subset"}


def _train_config(bundle: str) -> Path:
    return bundle_path(bundle) / "configs" / "train.json"


def validate_study(cfg: Mapping[str, Any], check_data: bool = True) -> list[str]:
    """Problems with a study config (empty when it can run): unknown keys (with the nearest known name),
    arms, fractions, seeds, bundle override ids, data."""
    problems = unknown_keys(cfg, STUDY_KEYS, "top level", comments=True)
    problems += unknown_keys(cfg.get("table") or {}, table_keys(), "table", comments=True)
    base = Path(cfg.get("_base", "."))
    arms = cfg.get("arms", [])
    problems += [f"unknown arm {a!r} (known: {sorted(ARMS)})" for a in arms if a not in ARMS]
    per_arm = cfg.get("fractions_per_arm") or {}
    bad = [a for a, fr in per_arm.items() if not isinstance(fr, list)]
    problems += [f"fractions_per_arm.{a}: expected a list of fractions, got {per_arm[a]!r}" for a in bad]
    fractions = [float(f) for f in cfg.get("fractions", [])]
    fractions += [float(f) for a, fr in per_arm.items() if a not in bad for f in fr]
    problems += [f"arm {a!r} has no fractions (neither 'fractions' nor fractions_per_arm.{a})" for a in arms
                 if not cfg.get("fractions") and not per_arm.get(a)]
    for name, values in [("fractions", cfg.get("fractions", []))] + [(f"fractions_per_arm.{a}", fr)
                                                                      for a, fr in per_arm.items() if a not in bad]:
        if len({float(f) for f in values}) != len(values):
            problems.append(f"{name}: repeated fractions {values}")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        problems.append(f"fractions must be in (0, 1]: {fractions}")
    seeds = {float(k): v for k, v in (cfg.get("seeds") or {}).items()}
    for f in sorted(set(fractions)):
        if f not in seeds or not seeds[f]:
            problems.append(f"no seeds for fraction {f}")
        elif len(set(seeds[f])) != len(seeds[f]):
            problems.append(f"fraction {f}: repeated seeds {seeds[f]}")
        elif f < 1 and len(seeds[f]) < int(cfg.get("min_seeds", 3)):
            problems.append(f"fraction {f}: {len(seeds[f])} seed(s), at least {cfg.get('min_seeds', 3)} needed")
    for section, bundle in (("common", None), ("phase1", "simclr_natural"), ("medical", "micle_medical"),
                            ("finetune", "finetune_classification"), ("supervised", "finetune_classification")):
        keys = cfg.get(section) or {}
        bundles = [bundle] if bundle else ["simclr_natural", "micle_medical", "finetune_classification"]
        for b in bundles:
            problems += unknown_overrides(keys, _train_config(b), section)
    for arm, keys in (cfg.get("medical_per_arm") or {}).items():
        if ARMS.get(arm, (False, None))[1] is None:
            problems.append(f"medical_per_arm: {arm!r} is not an arm with medical pretraining")
        problems += unknown_overrides(keys, _train_config("micle_medical"), f"medical_per_arm.{arm}")
    for name, ckpt in (cfg.get("pretrained") or {}).items():
        if name != "phase1" and name not in SUPERVISED_ARMS and ARMS.get(name, (False, None))[1] is None:
            problems.append(f"pretrained: {name!r} is neither 'phase1' nor an arm with medical pretraining")
        elif check_data and not Path(resolve_path(ckpt, base)).is_file():
            problems.append(f"pretrained.{name}: checkpoint {resolve_path(ckpt, base)} not found")
    for arm in cfg.get("fractions_per_arm") or {}:
        if arm not in arms:
            problems.append(f"fractions_per_arm: {arm!r} is not one of the study's arms {arms}")
    par = cfg.get("parallel_finetunes", 1)
    if not isinstance(par, int) or isinstance(par, bool) or par < 1:
        problems.append(f"parallel_finetunes must be a whole number >= 1, got {par!r}")
    if cfg.get("eval_from_validation") and cfg.get("eval_split", "val") != "val":
        problems.append("eval_from_validation reads the fine-tune's validation pass, which scores 'val': "
                        f"eval_split {cfg.get('eval_split')!r} needs a separate evaluation (drop the flag)")
    if check_data:
        table = Path(resolve_path(cfg.get("table", {}).get("path", ""), base))
        if not table.is_file():
            problems.append(f"table {table} not found")
        needs_natural = any(ARMS[a][0] for a in arms if a in ARMS) and "phase1" not in (cfg.get("pretrained") or {})
        needs_natural |= any(a in SUPERVISED_ARMS and a not in (cfg.get("pretrained") or {}) for a in arms)
        if needs_natural:
            natural = Path(resolve_path(cfg.get("natural_dir", ""), base))
            if not natural.is_dir():
                problems.append(f"natural_dir {natural} not found")
    return problems


def _manifest(cfg: Mapping[str, Any], run: Path) -> Path:
    from ..data import table_to_manifest

    out = run / "data" / "manifest.csv"
    if not out.is_file():
        t = dict(cfg["table"])
        path = resolve_path(t.pop("path"), Path(cfg["_base"]))
        subset = t.pop("subset", None)
        df = table_to_manifest(path, **t)
        if subset:
            df = df[df[subset].astype(str).str.lower() == "true"]
        write_manifest(df, out)
    return out


def prepare_experiment(config: str | Path | Mapping[str, Any], name: str, required: str,
                       validate: Callable[[Mapping[str, Any]], list[str]], run_dir: str | Path | None = None
                       ) -> tuple[dict[str, Any], Path, Path]:
    """What the study and transfusion drivers share: the config (read, validated), the run folder and the
    manifest built from the config's ``table`` inside it."""
    source = str(config) if not isinstance(config, Mapping) else f"{name} config"
    if isinstance(config, Mapping):
        check_data_config(config, source)
    cfg = load_config(config, required=required) if not isinstance(config, Mapping) else dict(config)
    problems = validate(cfg)
    if problems:
        raise ValueError(f"{source}: {name} config problems: " + "; ".join(problems))
    run = Path(run_dir or resolve_path(cfg.get("run_dir", f"runs/{name}"), Path(cfg["_base"])))
    run.mkdir(parents=True, exist_ok=True)
    return cfg, run, _manifest(cfg, run)


#: what writes a study's summary from its results table, run folder, seconds and evaluated split
StudySummary = Callable[[pd.DataFrame, Path, float, str], Any]


def run_study(config: str | Path | Mapping[str, Any], run_dir: str | Path | None = None,
              force: bool = False, summary: StudySummary | None = None) -> pd.DataFrame:
    """Run (or resume: finished runs are skipped) the whole study; returns the per-run results table, after
    ``summary`` (``medssl study`` passes :func:`~medssl_monai.reporting.study_summary.write_study_summary`)."""
    cfg, run, manifest = prepare_experiment(config, "study", "arms", validate_study, run_dir)
    base = Path(cfg["_base"])
    code = cfg.get("allow_expressions") is True
    t0 = time.time()
    common = dict(cfg.get("common") or {})
    # one decoded-image cache for every arm and seed (bundles with cache: none never touch it)
    common.setdefault("cache_dir", str(run / "image_cache"))
    models: dict[str, str | None] = {"random": None}
    arms = list(cfg["arms"])
    given = {k: resolve_path(v, base) for k, v in (cfg.get("pretrained") or {}).items()}
    if "phase1" in given:  # e.g. an imported ImageNet checkpoint, or another run's phase 1
        models["phase1"] = given["phase1"]
    elif any(ARMS[a][0] for a in arms):
        root = run / "pretrain" / "phase1" / "simclr_natural"
        run_bundle(bundle_path("simclr_natural"), "train.json", root,
                   {**common, "dataset_dir": resolve_path(cfg["natural_dir"], base), "knn_interval": 0,
                    **(cfg.get("phase1") or {})}, run, "phase1", root / "models/model.pt", force=force,
                   allow_expressions=code)
        models["phase1"] = str(root / "models" / "model.pt")
    for arm in arms:
        if arm in SUPERVISED_ARMS:
            models[arm] = given.get(arm) or _supervised_natural(cfg, run, common, force, code)
            continue
        pairing = ARMS[arm][1]
        if pairing is None:
            continue
        if arm in given:
            models[arm] = given[arm]
            continue
        root = run / "pretrain" / arm / "micle_medical"
        run_bundle(bundle_path("micle_medical"), "train.json", root,
                   {**common, "manifest": str(manifest), "pairing": pairing, "patient_aware": pairing == "micle",
                    "pretrained_ckpt": models["phase1"], **(cfg.get("medical") or {}),
                    **((cfg.get("medical_per_arm") or {}).get(arm) or {})},
                   run, f"pretrain_{arm}", root / "models/model.pt", force=force, allow_expressions=code)
        models[arm] = str(root / "models" / "model.pt")
    seeds = {float(k): v for k, v in cfg["seeds"].items()}
    eval_split = cfg.get("eval_split", "val")
    per_arm = cfg.get("fractions_per_arm") or {}
    points = grid_points(arms, {arm: per_arm.get(arm, cfg.get("fractions", [])) for arm in arms}, seeds)
    roots = run_grid(points, models, {**common}, manifest, bundle_path("finetune_classification"), run,
                     folder="finetune/{arm}/f{fraction:g}_s{seed}", tag="ft_{arm}_{fraction:g}_s{seed}",
                     last=cfg.get("finetune") or {}, parallel=int(cfg.get("parallel_finetunes", 1)), force=force,
                     allow_expressions=code)
    rows = []
    for (arm, frac, seed), root in zip(points, roots):
        if cfg.get("eval_from_validation"):  # the fine-tune's own last validation pass on eval_split
            m = final_validation(root / "output")
        else:
            ev = root / "output" / f"eval_{eval_split}"
            run_bundle(bundle_path("finetune_classification"), ("train.json", "evaluate.json"), root,
                       {**for_config(without_architecture({k: v for k, v in common.items() if k != "num_workers"}),
                                     [bundle_path("finetune_classification") / "configs" / f
                                      for f in ("train.json", "evaluate.json")]),
                        "manifest": str(manifest), "eval_split": eval_split}, run, f"eval_{arm}_{frac:g}_s{seed}",
                       ev / "metrics.json", copy=False, force=force, allow_expressions=code)
            m = json.loads((ev / "metrics.json").read_text())
        rows.append({"arm": arm, "fraction": frac, "seed": seed, "balanced_accuracy": m["balanced_accuracy"],
                     "auc_macro": m["auc_macro"], "accuracy": m.get("accuracy")})
    results = pd.DataFrame(rows)
    results.to_csv(run / "results.csv", index=False)
    if summary is not None:
        summary(results, run, time.time() - t0, eval_split)
    return results


def natural_manifest(natural_dir: str | Path, out: Path, holdout_every: int = 10) -> Path:
    """A labelled manifest of an ImageNet-style folder (``train/`` and, when present, ``val/``; without
    ``val/``, every ``holdout_every``-th training image of each class is held out for validation)."""
    from ..bundle import imagefolder_manifest

    train = imagefolder_manifest(natural_dir, "train").assign(split="train")
    if (Path(natural_dir) / "val").is_dir():
        val = imagefolder_manifest(natural_dir, "val").assign(split="val")
        df = pd.concat([train, val], ignore_index=True)
    else:
        df = train
        held = df.groupby("label").cumcount() % holdout_every == holdout_every - 1
        df.loc[held, "split"] = "val"
    df = df.assign(sop_uid=df["patient_id"])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, df.to_csv(index=False))
    return out


def _supervised_natural(cfg: Mapping[str, Any], run: Path, common: Mapping[str, Any], force: bool,
                        allow_expressions: bool = False) -> str:
    """The supervised-pretraining arm's start: the fine-tuning bundle trained on all natural labels."""
    manifest = natural_manifest(resolve_path(cfg["natural_dir"], Path(cfg["_base"])), run / "data" / "natural.csv")
    root = run / "pretrain" / "supervised" / "finetune_classification"
    run_bundle(bundle_path("finetune_classification"), "train.json", root,
               {**common, "manifest": str(manifest), "label_fraction": 1.0, "seed": 0,
                **(cfg.get("supervised") or {})},
               run, "pretrain_supervised", root / "models/model.pt", force=force,
               allow_expressions=allow_expressions)
    return str(root / "models" / "model.pt")
