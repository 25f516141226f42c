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
from ..data.manifest import write_manifest
from ..utils.atomic import atomic_write_text
from ..utils.value_types import ValueType
from .config import (
    check_data_config,
    check_types,
    for_config,
    load_config,
    resolve_path,
    unknown_keys,
    unknown_overrides,
    without_bad_keys,
    wrong_values,
)
from .label_efficiency import GridPoint, grid_points, run_grid
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
                        "eval_from_validation", "pretrained", "parallel_finetunes", "supervised", "allow_expressions",
                        "predict_sets", "selection"})
#: keys of a study's ``selection`` section (cold-start label selection: which images to label first)
SELECTION_KEYS = frozenset({"strategies", "strategies_per_arm", "features", "level", "stratify"})


_FRACTIONS = ValueType("list", item=ValueType("number", 0, 1, open_low=True))
_STR = ValueType("str")
#: the documented keys' types and ranges (``check_types``); bundle sections have ``OVERRIDE_TYPES``
STUDY_TYPES: dict[str, Any] = {
    "run_dir": _STR, "natural_dir": _STR, "arms": ValueType("list", item=_STR),
    "fractions": _FRACTIONS, "fractions_per_arm": ValueType("mapping", item=_FRACTIONS),
    "seeds": ValueType("mapping", item=ValueType("list", item=ValueType("int", 0))),
    "min_seeds": ValueType("int", 1), "eval_split": _STR, "eval_from_validation": ValueType("bool"),
    "parallel_finetunes": ValueType("int", 1), "allow_expressions": ValueType("bool"),
    "pretrained": ValueType("mapping", item=_STR), "predict_sets": ValueType("mapping", item=_STR),
    "table": {"path": _STR},
}


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
    typed = check_types(cfg, STUDY_TYPES)
    problems += typed
    cfg = without_bad_keys(cfg, typed)  # the checks below read these values: a wrong type would crash them
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
        problems += wrong_values(keys, section)
    for arm, keys in (cfg.get("medical_per_arm") or {}).items():
        problems += wrong_values(keys, f"medical_per_arm.{arm}")
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
    sel = cfg.get("selection")
    if sel is not None:
        from ..selection import STRATEGIES

        if not isinstance(sel, Mapping):
            problems.append(f"selection: expected a section, got {sel!r}")
            sel = {}
        problems += unknown_keys(sel, SELECTION_KEYS, "selection", comments=True)
        strategies = sel.get("strategies", ["random"])
        if not isinstance(strategies, list) or not strategies or any(s not in STRATEGIES for s in strategies):
            problems.append(f"selection.strategies: a list of {sorted(STRATEGIES)}, got {strategies!r}")
        per_arm = sel.get("strategies_per_arm") or {}
        if not isinstance(per_arm, Mapping):
            problems.append(f"selection.strategies_per_arm: expected {{arm: [strategies]}}, got {per_arm!r}")
            per_arm = {}
        for arm, chosen in per_arm.items():
            if arm not in arms:
                problems.append(f"selection.strategies_per_arm: {arm!r} is not one of the study's arms {arms}")
            elif not isinstance(chosen, list) or any(c not in strategies for c in chosen):  # []: features only
                problems.append(f"selection.strategies_per_arm.{arm}: a list of selection.strategies "
                                f"(empty: the arm is pretrained but fine-tunes nothing), got {chosen!r}")
        feats = sel.get("features", "phase1_micle")
        if feats != "phase1" and ARMS.get(feats, (False, None))[1] is None:
            problems.append(f"selection.features: 'phase1' or an arm with medical pretraining, got {feats!r}")
        elif feats not in arms and feats != "phase1" and feats not in (cfg.get("pretrained") or {}):
            problems.append(f"selection.features: {feats!r} is neither one of the study's arms nor in 'pretrained'")
        if sel.get("level", "patient") not in ("patient", "study", "series", "image"):
            problems.append(f"selection.level: patient, study, series or image, got {sel.get('level')!r}")
    sets = cfg.get("predict_sets") or {}
    if not isinstance(sets, Mapping):
        problems.append(f"predict_sets: expected {{name: image folder or CSV}}, got {sets!r}")
    else:
        for name, src in sets.items():
            if not str(name).isidentifier():
                problems.append(f"predict_sets: name {name!r} must be a plain word (it names a folder)")
            elif check_data and not Path(resolve_path(src, base)).exists():
                problems.append(f"predict_sets.{name}: {resolve_path(src, base)} not found")
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
              force: bool = False, summary: StudySummary | None = None, finished_only: bool = False) -> pd.DataFrame:
    """Run (or resume: finished runs are skipped) the whole study; returns the per-run results table, after
    ``summary`` (``medssl study`` passes :func:`~medssl_monai.reporting.study_summary.write_study_summary`).

    ``finished_only``: train and select nothing; the table, summary and predict sets of the fine-tunes that
    have finished so far. Why: a CPU study runs for hours, and one stopped early (or still running in
    another process) should still report, and predict the blind set with, what it has."""
    if finished_only and force:
        raise ValueError("finished_only reports what exists: it cannot be combined with force")
    cfg, run, manifest = prepare_experiment(config, "study", "arms", validate_study, run_dir)
    train = _finished_run if finished_only else run_bundle
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
        train(bundle_path("simclr_natural"), "train.json", root,
                   {**common, "dataset_dir": resolve_path(cfg["natural_dir"], base), "knn_interval": 0,
                    **(cfg.get("phase1") or {})}, run, "phase1", root / "models/model.pt", force=force,
                   allow_expressions=code)
        models["phase1"] = str(root / "models" / "model.pt")
    for arm in arms:
        if arm in SUPERVISED_ARMS:
            models[arm] = given.get(arm) or _supervised_natural(cfg, run, common, force, code, train)
            continue
        pairing = ARMS[arm][1]
        if pairing is None:
            continue
        if arm in given:
            models[arm] = given[arm]
            continue
        root = run / "pretrain" / arm / "micle_medical"
        train(bundle_path("micle_medical"), "train.json", root,
                   {**common, "manifest": str(manifest), "pairing": pairing, "patient_aware": pairing == "micle",
                    "pretrained_ckpt": models["phase1"], **(cfg.get("medical") or {}),
                    **((cfg.get("medical_per_arm") or {}).get(arm) or {})},
                   run, f"pretrain_{arm}", root / "models/model.pt", force=force, allow_expressions=code)
        models[arm] = str(root / "models" / "model.pt")
    seeds = {float(k): v for k, v in cfg["seeds"].items()}
    eval_split = cfg.get("eval_split", "val")
    per_arm = cfg.get("fractions_per_arm") or {}
    points = grid_points(arms, {arm: per_arm.get(arm, cfg.get("fractions", [])) for arm in arms}, seeds)
    grid = [(p, "", manifest) for p in points]  # (point, selection strategy, manifest it trains from)
    if cfg.get("selection"):
        grid = [g for g in grid if g[0].fraction >= 1] + _selected(cfg, run, manifest, models, common, points,
                                                                    finished_only)
    roots = []
    for (strategy, train_manifest), pts in _by_manifest(grid).items():
        prefix = f"{strategy}/" if strategy else ""
        roots += run_grid(pts, models, {**common}, train_manifest, bundle_path("finetune_classification"), run,
                          folder=f"finetune/{prefix}{{arm}}/f{{fraction:g}}_s{{seed}}",
                          tag=f"ft_{strategy + '_' if strategy else ''}{{arm}}_{{fraction:g}}_s{{seed}}",
                          last=cfg.get("finetune") or {}, parallel=int(cfg.get("parallel_finetunes", 1)),
                          force=force, allow_expressions=code, finished_only=finished_only)
    grid = [g for key, _ in _by_manifest(grid).items() for g in grid if (g[1], g[2]) == key]
    if finished_only:  # the unfinished fine-tunes are left out (and evaluations not made yet)
        kept = [(g, r) for g, r in zip(grid, roots) if r is not None and (
            cfg.get("eval_from_validation") or (r / "output" / f"eval_{cfg.get('eval_split', 'val')}" /
                                                "metrics.json").is_file())]
        grid, roots = [g for g, _ in kept], [r for _, r in kept]
    points = [g[0] for g in grid]
    strategies = [g[1] for g in grid]
    rows = []
    for (arm, frac, seed), strategy, root in zip(points, strategies, roots):
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
        row = {"arm": f"{arm}:{strategy}" if strategy else arm, "fraction": frac, "seed": seed,
               "balanced_accuracy": m["balanced_accuracy"], "auc_macro": m["auc_macro"], "accuracy": m.get("accuracy")}
        if strategy or cfg.get("selection"):
            row.update(strategy=strategy or "all", **per_class_recall(root / "output"))
        rows.append(row)
    if finished_only and not rows:
        logger.warning("%s: no fine-tune has finished yet: nothing to report", run)
        return pd.DataFrame(columns=["arm", "fraction", "seed", "balanced_accuracy", "auc_macro", "accuracy"])
    predict_sets(cfg, run, roots, [f"{a}_{s + '_' if s else ''}f{f:g}_s{seed}" for (a, f, seed), s
                                   in zip(points, strategies)], common, force)
    results = pd.DataFrame(rows)
    results.to_csv(run / "results.csv", index=False)
    if summary is not None:
        summary(results, run, time.time() - t0, eval_split)
    return results


def _finished_run(bundle_src: Path, config_file: str | Any, root: Path, overrides: Mapping[str, Any], run_dir: Path,
                  tag: str, done: Path, **_: Any) -> Path:
    """``run_bundle``'s stand-in for ``finished_only``: runs nothing, returns the root (its model may be
    missing: the fine-tunes from it are then unfinished too and left out)."""
    return root


def _by_manifest(grid: list[tuple[GridPoint, str, Path]]) -> dict[tuple[str, Path], list[GridPoint]]:
    out: dict[tuple[str, Path], list[GridPoint]] = {}
    for point, strategy, manifest in grid:
        out.setdefault((strategy, manifest), []).append(point)
    return out


def _selected(cfg: Mapping[str, Any], run: Path, manifest: Path, models: Mapping[str, str | None],
              common: Mapping[str, Any], points: list[GridPoint],
              finished_only: bool = False) -> list[tuple[GridPoint, str, Path]]:
    """Cold-start selection (``selection`` section): per strategy and seed, the nested label budgets (the
    study's fractions below 1) chosen on the ``features`` model's embedding of the training images, as a
    manifest copy whose ``labeled_<p>pct`` columns the unchanged fine-tune bundle reads; ``strategies_per_arm``
    (``{arm: [strategies]}``) trains an arm on some strategies' selections only. Nothing but the
    training split is embedded or selected on (never val, never a predict set). ``finished_only``: only the
    selections already made."""
    from .select import embed_manifest, select_manifest

    sel = cfg["selection"]
    feats = sel.get("features", "phase1_micle")
    ckpt = models.get(feats) or (resolve_path((cfg.get("pretrained") or {})[feats], Path(cfg["_base"]))
                                 if feats in (cfg.get("pretrained") or {}) else None)
    if not ckpt:
        raise ValueError(f"selection.features: no {feats!r} model to embed with")
    arch = {k: common[k] for k in ("backbone", "in_channels", "image_size") if k in common}
    cached: list = []

    def embeddings():  # only when a selection has to be made (a resumed study has them all)
        if not cached:
            cached.append(embed_manifest(manifest, ckpt, split="train",
                                         cache_dir=run / "selection" / "embedding_cache", **arch))
        return cached[0]

    budgets = sorted({p.fraction for p in points if p.fraction < 1})
    strategies = sel.get("strategies", ["random"])
    per_arm = sel.get("strategies_per_arm") or {}  # e.g. a random init shown with random selection only
    out = []
    for seed in sorted({p.seed for p in points if p.fraction < 1}):  # seed 0 of every strategy first: a study
        for strategy in strategies:                                    # stopped early still compares them
            folder = run / "selection" / f"{strategy}_s{seed}"
            settings = {"strategy": strategy, "seed": seed, "level": sel.get("level", "patient"),
                        "stratify": list(sel.get("stratify", ())), "fractions": budgets}
            selected = _finished_selection(folder, settings, ckpt) if Path(ckpt).is_file() else None
            if selected is None and finished_only:
                continue
            if selected is None:
                selected = select_manifest(manifest, ckpt, folder, fractions=budgets, level=settings["level"],
                                           strategy=strategy, seed=seed, stratify=settings["stratify"],
                                           embeddings=embeddings()).manifest
            out += [(p, strategy, selected) for p in points if p.seed == seed and p.fraction < 1
                    and strategy in per_arm.get(p.arm, strategies)]
    return out


def _finished_selection(folder: Path, settings: Mapping[str, Any], ckpt: str | Path) -> Path | None:
    """The manifest copy of an earlier identical selection (same settings and checkpoint bytes, budgets a
    subset of its budgets: every strategy's order is nested, so a smaller budget is a prefix of a larger
    one), so a resumed study does not cluster again; ``None`` when there is none or anything differs."""
    from .select import file_sha256

    meta_file, copy = folder / "selection.json", folder / "manifest.csv"
    if not (meta_file.is_file() and copy.is_file()):
        return None
    meta = json.loads(meta_file.read_text())
    same = (meta.get("strategy") == settings["strategy"] and meta.get("seed") == settings["seed"]
            and meta.get("level") == settings["level"] and meta.get("stratify") == settings["stratify"]
            and set(settings["fractions"]) <= {b.get("label_fraction") for b in meta.get("budgets", [])}
            and meta.get("checkpoint_sha256") == file_sha256(ckpt))
    return copy if same else None


def per_class_recall(output_dir: Path) -> dict[str, float]:
    """``recall_<class>`` of the final validation, from the fine-tune's ``confusion_matrix.csv`` (what a
    selection buys for the rare classes is invisible in the averages)."""
    cm = output_dir / "confusion_matrix.csv"
    if not cm.is_file():
        return {}
    m = pd.read_csv(cm, index_col=0)
    return {f"recall_{c}": float(m.loc[c, c] / m.loc[c].sum()) if m.loc[c].sum() else float("nan") for c in m.index}


def predict_sets(cfg: Mapping[str, Any], run: Path, roots: list[Path], names: list[str],
                 common: Mapping[str, Any], force: bool = False) -> dict[str, list[Path]]:
    """Every fine-tuned model predicts every ``predict_sets`` entry (e.g. the blind test set): one
    ``run/predict_sets/<set>/<arm>_f<fraction>_s<seed>.csv.gz`` each. Only predictions: nothing in the study
    reads them back, so no model, checkpoint or threshold is chosen on them."""
    from .predict import predict_images, predict_set_manifest

    written: dict[str, list[Path]] = {}
    base = Path(cfg["_base"])
    infer = bundle_path("finetune_classification") / "configs" / "inference.json"
    overrides = for_config(without_architecture({k: v for k, v in common.items() if k != "cache_dir"}), infer)
    for set_name, src in (cfg.get("predict_sets") or {}).items():
        folder = run / "predict_sets" / set_name
        manifest, id_name = predict_set_manifest(resolve_path(src, base), folder / "manifest.csv")
        written[set_name] = [predict_images(root, manifest, id_name, folder / f"{name}.csv.gz", run,
                                            f"{set_name}_{name}", overrides=overrides, force=force)
                             for root, name in zip(roots, names)]
    return written


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
                        allow_expressions: bool = False, train: Callable[..., Path] = run_bundle) -> str:
    """The supervised-pretraining arm's start: the fine-tuning bundle trained on all natural labels."""
    manifest = natural_manifest(resolve_path(cfg["natural_dir"], Path(cfg["_base"])), run / "data" / "natural.csv")
    root = run / "pretrain" / "supervised" / "finetune_classification"
    train(bundle_path("finetune_classification"), "train.json", root,
               {**common, "manifest": str(manifest), "label_fraction": 1.0, "seed": 0,
                **(cfg.get("supervised") or {})},
               run, "pretrain_supervised", root / "models/model.pt", force=force,
               allow_expressions=allow_expressions)
    return str(root / "models" / "model.pt")
