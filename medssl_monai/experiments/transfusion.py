"""Transfusion experiments (Raghu et al. 2019) on your own data: what does pretraining buy, and where?

One config, one command (``medssl transfusion CONFIG``), four experiments, every run a fine-tuning bundle run:

1. ``init``: each backbone (a ResNet and the CBR family) fine-tuned from a random init and from its own
   phase-1 SimCLR checkpoint; final balanced accuracy / macro AUC and *steps to reach* fixed validation AUCs.
2. ``hybrid``: pretrained weights for the first ``k`` stages only, the rest re-initialised, or slimmed
   (narrower upper stages, ``backbone_kwargs``).
3. ``mean_var``: Mean-Var init (weights drawn from each pretrained tensor's mean and variance).
4. ``similarity``: per-stage CKA and SVCCA of every ``init`` run's backbone before vs after fine-tuning.

Random inits are drawn here and saved as checkpoints, so "before" exists for the similarity of random-init
runs and the fine-tuning bundle loads them like any other checkpoint (``transfer_mode=full``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..bundle.locate import bundle_path
from ..utils.atomic import atomic_writer
from ..utils.value_types import ValueType
from .config import (
    check_types,
    current_names,
    resolve_path,
    unknown_keys,
    unknown_overrides,
    without_bad_keys,
    wrong_values,
)
from .results import read_curve, steps_to_target
from .runner import run_bundle
from .study import prepare_experiment, table_keys

__all__ = ["TransfusionSummary", "plan_runs", "run_transfusion", "validate_transfusion"]

logger = logging.getLogger(__name__)

#: top-level keys of a transfusion config (besides ``_comment``-style keys starting with ``_``)
#: former top-level names -> current ones (``pretrain`` became ``phase1``, as in the study and the pipeline)
RENAMED_KEYS = {"pretrain": "phase1"}
TRANSFUSION_KEYS = frozenset({"run_dir", "table", "natural_dir", "natural_size", "common", "phase1", "finetune",
                              "models", "seeds", "model_seeds", "hybrid", "mean_var", "targets", "similarity",
                              "allow_expressions"})
_HYBRID_KEYS = frozenset({"model", "ks", "slim", "seeds"})
_SIMILARITY_KEYS = frozenset({"split", "mode", "max_examples", "max_points"})
_SEEDS = ValueType("list", item=ValueType("int", 0))
_STR = ValueType("str")
#: the documented keys' types and ranges (``check_types``); bundle sections have ``OVERRIDE_TYPES``
TRANSFUSION_TYPES: dict[str, Any] = {
    "run_dir": _STR, "natural_dir": _STR, "natural_size": ValueType("int", 1, null=True), "allow_expressions": ValueType("bool"),
    "models": ValueType("list", item=_STR), "seeds": _SEEDS, "model_seeds": ValueType("mapping", item=_SEEDS),
    "mean_var": ValueType("list", item=_STR), "targets": ValueType("list", item=ValueType("number", 0, 1, open_low=True)),
    "hybrid": {"model": _STR, "ks": ValueType("list", item=ValueType("int", 0)), "seeds": _SEEDS},
    "similarity": {"split": _STR, "mode": _STR, "max_examples": ValueType("int", 1), "max_points": ValueType("int", 1)},
    "table": {"path": _STR},
}


def validate_transfusion(cfg: Mapping[str, Any], check_data: bool = True) -> list[str]:
    """Problems with a transfusion config (empty when it can run)."""
    from ..networks import available_backbones

    cfg, problems = current_names(cfg, RENAMED_KEYS, "top level", warn=False)
    problems += unknown_keys(cfg, TRANSFUSION_KEYS, "top level", comments=True)
    problems += unknown_keys(cfg.get("table") or {}, table_keys(), "table", comments=True)
    problems += unknown_keys(cfg.get("hybrid") or {}, _HYBRID_KEYS, "hybrid", comments=True)
    problems += unknown_keys(cfg.get("similarity") or {}, _SIMILARITY_KEYS, "similarity", comments=True)
    typed = check_types(cfg, TRANSFUSION_TYPES)
    problems += typed
    cfg = without_bad_keys(cfg, typed)  # the checks below read these values: a wrong type would crash them
    models = list(cfg.get("models") or [])
    if not models:
        problems.append("models: list at least one backbone")
    known = set(available_backbones())
    problems += [f"unknown backbone {m!r}" for m in models if m not in known]
    hybrid = cfg.get("hybrid") or {}
    if hybrid and hybrid.get("model") not in models:
        problems.append(f"hybrid.model {hybrid.get('model')!r} must be one of models {models}")
    problems += [f"mean_var model {m!r} is not in models" for m in cfg.get("mean_var") or [] if m not in models]
    if not cfg.get("targets"):
        problems.append("targets: list at least one validation AUC to measure steps-to-target")
    for section, bundles in (("common", ("simclr_natural", "finetune_classification")),
                             ("phase1", ("simclr_natural",)), ("finetune", ("finetune_classification",))):
        for bundle in bundles:
            problems += unknown_overrides(cfg.get(section) or {}, bundle_path(bundle) / "configs" / "train.json",
                                          section)
        problems += wrong_values(cfg.get(section) or {}, section)
        if section == "common":
            continue
        fixed = sorted(set(cfg.get(section) or {}) & _PER_RUN_KEYS)
        if fixed:
            problems.append(f"{section}: {fixed} are set per run by the experiments (they would make arms equal)")
    if int((cfg.get("finetune") or {}).get("val_interval", 1)) != 1:
        problems.append("finetune.val_interval must be 1: steps-to-target needs a validation every epoch")
    hybrid_ks = {int(k) for k in hybrid.get("ks", [])}
    problems += [f"hybrid.slim: k={k} is not in hybrid.ks {sorted(hybrid_ks)}"
                 for k in (hybrid.get("slim") or {}) if int(k) not in hybrid_ks]
    if check_data:
        base = Path(cfg.get("_base", "."))
        if not Path(resolve_path(cfg.get("table", {}).get("path", ""), base)).is_file():
            problems.append("table: file not found")
        if not Path(resolve_path(cfg.get("natural_dir", ""), base)).is_dir():
            problems.append("natural_dir: folder not found")
    return problems


#: keys the driver sets for each run; a config section must not override them
_PER_RUN_KEYS = {"backbone", "backbone_kwargs", "pretrained_ckpt", "transfer_mode", "transfer_k", "seed", "manifest",
                 "dataset_dir"}


def plan_runs(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every fine-tuning run of the config: experiment, model, init, k, slim overrides, seed."""
    seeds = cfg.get("seeds", [0])
    model_seeds = cfg.get("model_seeds") or {}
    runs = []
    for model in cfg["models"]:
        for seed in model_seeds.get(model, seeds):
            for init in ("random", "phase1"):
                runs.append({"experiment": "init", "model": model, "init": init, "k": None, "slim": None,
                             "seed": seed})
    hybrid = cfg.get("hybrid") or {}
    if hybrid:
        model = hybrid["model"]
        slim = {int(k): v for k, v in (hybrid.get("slim") or {}).items()}
        for seed in hybrid.get("seeds", model_seeds.get(model, seeds)):
            for k in hybrid.get("ks", []):
                runs.append({"experiment": "hybrid", "model": model, "init": "first_k", "k": int(k), "slim": None,
                             "seed": seed})
                if int(k) in slim:
                    runs.append({"experiment": "hybrid", "model": model, "init": "first_k_slim", "k": int(k),
                                 "slim": slim[int(k)], "seed": seed})
    for model in cfg.get("mean_var") or []:
        for seed in model_seeds.get(model, seeds):
            runs.append({"experiment": "mean_var", "model": model, "init": "mean_var", "k": None, "slim": None,
                         "seed": seed})
    return runs


def run_name(r: Mapping[str, Any]) -> str:
    k = f"_k{r['k']}" if r["k"] is not None else ""
    return f"{r['model']}_{r['init']}{k}_s{r['seed']}"


def shrink_image_folder(src: Path, dst: Path, size: int) -> Path:
    """Copy an ImageNet-style folder with every image resized to ``size`` px PNG (RGB).

    Phase 1 at 32-64 px spends most of its time decoding 224 px JPEGs; decoding them once here makes the
    per-model pretraining compute-bound. Done once per size (a ``.done`` marker), atomically per file.
    """
    from PIL import Image

    marker = dst / ".done"
    if marker.is_file():
        return dst
    for p in sorted(src.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in (".jpeg", ".jpg", ".png"):
            continue
        out = (dst / p.relative_to(src)).with_suffix(".png")
        if out.is_file():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(p) as im:
            small = im.convert("RGB").resize((size, size), Image.BICUBIC)
        with atomic_writer(out) as fh:
            small.save(fh, format="PNG")
    marker.write_text("")
    return dst


def random_init_checkpoint(model: str, in_channels: int, seed: int, out: Path,
                           backbone_kwargs: Mapping[str, Any] | None = None) -> Path:
    """A backbone's default random init, drawn with ``seed`` and saved, so it is a "before" checkpoint."""
    from ..networks import get_backbone
    from ..utils.atomic import atomic_write_bytes

    if not out.is_file():
        torch.manual_seed(seed)
        net = get_backbone(model, in_channels=in_channels, **dict(backbone_kwargs or {}))
        import io

        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        atomic_write_bytes(out, buf.getvalue())
    return out


def stage_moves(before: Path, after: Path, model: str, in_channels: int, loader, max_examples: int,
                mode: str = "positions", max_points: int = 512) -> pd.DataFrame:
    """CKA and SVCCA between each stage of a backbone before and after fine-tuning (same stage only).

    ``mode="positions"`` treats every spatial position as a data point (the SVCCA authors' recipe for conv
    layers), which also gives SVCCA many more rows than channels.
    """
    from ..metrics.similarity import stage_similarity
    from ..networks import get_backbone, load_backbone_weights

    nets = []
    for ckpt in (before, after):
        net = get_backbone(model, in_channels=in_channels)
        load_backbone_weights(net, ckpt, strict=True)
        nets.append(net.eval())
    rows = []
    for method in ("cka", "svcca"):
        df = stage_similarity(nets[0], nets[1], loader, method=method, max_examples=max_examples, mode=mode,
                              max_points=max_points)
        for i, stage in enumerate(df.index):
            rows.append({"stage": stage, "depth": (i + 1) / len(df.index), "method": method,
                         "similarity": float(df.loc[stage, stage])})
    return pd.DataFrame(rows)


#: what writes the summary from the per-run table, the similarity table, run folder, seconds and config
TransfusionSummary = Callable[[pd.DataFrame, pd.DataFrame, Path, float, Mapping[str, Any]], Any]


def run_transfusion(config: str | Path | Mapping[str, Any], run_dir: str | Path | None = None,
                    force: bool = False, summary: TransfusionSummary | None = None) -> pd.DataFrame:
    """Run (or resume: finished runs are skipped) the four experiments; returns the per-run table, after
    ``summary`` (``medssl transfusion`` passes
    :func:`~medssl_monai.reporting.transfusion_summary.write_transfusion_summary`)."""
    cfg, run, manifest = prepare_experiment(config, "transfusion", "models", validate_transfusion, run_dir)
    cfg = current_names(cfg, RENAMED_KEYS, "top level")[0]
    base = Path(cfg["_base"])
    code = cfg.get("allow_expressions") is True
    t0 = time.time()
    common = dict(cfg.get("common") or {})
    in_channels = int(common.get("in_channels", 3))
    natural = Path(resolve_path(cfg["natural_dir"], base))
    if cfg.get("natural_size"):
        natural = shrink_image_folder(natural, run / "data" / f"natural_{cfg['natural_size']}",
                                      int(cfg["natural_size"]))

    phase1: dict[str, Path] = {}
    for model in cfg["models"]:
        root = run / "pretrain" / model / "simclr_natural"
        run_bundle(bundle_path("simclr_natural"), "train.json", root,
                   {**common, "backbone": model, "dataset_dir": str(natural), **(cfg.get("phase1") or {})},
                   run, f"pretrain_{model}", root / "models/model.pt", force=force, allow_expressions=code)
        phase1[model] = root / "models" / "model.pt"

    rows = []
    for r in plan_runs(cfg):
        name = run_name(r)
        if r["init"] == "random":
            ckpt, mode = random_init_checkpoint(r["model"], in_channels, r["seed"],
                                                run / "init" / f"{r['model']}_random_s{r['seed']}.pt"), "full"
        elif r["init"] == "phase1":
            ckpt, mode = phase1[r["model"]], "full"
        elif r["init"].startswith("first_k"):
            ckpt, mode = phase1[r["model"]], "first_k"
        else:
            ckpt, mode = phase1[r["model"]], "mean_var"
        root = run / "finetune" / r["experiment"] / name / "finetune_classification"
        overrides = {**common, "backbone": r["model"], "manifest": str(manifest), "pretrained_ckpt": str(ckpt),
                     "transfer_mode": mode, "seed": r["seed"], **(cfg.get("finetune") or {})}
        if r["k"] is not None:
            overrides["transfer_k"] = r["k"]
        if r["slim"]:
            overrides["backbone_kwargs"] = r["slim"]
        run_bundle(bundle_path("finetune_classification"), "train.json", root, overrides, run,
                   f"ft_{r['experiment']}_{name}", root / "models/model.pt", force=force, allow_expressions=code)
        curve = read_curve(root / "output")
        curve.to_csv(root / "output" / "val_curve.csv", index=False)
        last = curve.iloc[-1]
        row = {**{k: v for k, v in r.items() if k != "slim"}, "slim": json.dumps(r["slim"]) if r["slim"] else "",
               "run": name, "before": str(ckpt), "after": str(root / "models" / "model.pt"),
               "balanced_accuracy": float(last.get("balanced_accuracy", float("nan"))),
               "auc_macro": float(last["auc_macro"]), "best_auc": float(curve["auc_macro"].max()),
               "steps_per_epoch": float(curve["step"].iloc[0] / curve["epoch"].iloc[0])}
        for t in cfg["targets"]:
            row[f"steps_to_auc_{t:g}"] = steps_to_target(curve, float(t))
        rows.append(row)
    results = pd.DataFrame(rows)
    results.to_csv(run / "results.csv", index=False)

    sim = similarity_before_after(results, cfg, manifest, run, force=force)
    if summary is not None:
        summary(results, sim, run, time.time() - t0, cfg)
    return results


def similarity_before_after(results: pd.DataFrame, cfg: Mapping[str, Any], manifest: Path, run: Path,
                            force: bool = False) -> pd.DataFrame:
    """Experiment 4: per-stage CKA/SVCCA before vs after fine-tuning for every ``init`` run.

    Kept from a previous call only when it covers exactly these runs and is newer than every fine-tuned model.
    """
    out = run / "similarity_before_after.csv"
    init_runs = results[results["experiment"] == "init"]
    if out.is_file() and not force:
        cached = pd.read_csv(out)
        newest = max(Path(a).stat().st_mtime for a in init_runs["after"])
        if set(cached["run"]) == set(init_runs["run"]) and out.stat().st_mtime > newest:
            return cached
    from ..bundle.data import eval_dataset, load_rows
    from ..data.bad_images import collate_readable

    opts = cfg.get("similarity") or {}
    common = cfg.get("common") or {}
    rows = load_rows(manifest=manifest, split=opts.get("split", "val")).sample(frac=1.0, random_state=0)
    n = int(opts.get("max_examples", 4000))
    loader = torch.utils.data.DataLoader(
        eval_dataset(rows, int(common.get("image_size", 64)), int(common.get("in_channels", 3)), in_memory=True),
        batch_size=100, num_workers=0, collate_fn=collate_readable)
    parts = []
    for r in init_runs.itertuples(index=False):
        df = stage_moves(Path(r.before), Path(r.after), r.model, int(common.get("in_channels", 3)), loader, n,
                         mode=opts.get("mode", "positions"), max_points=int(opts.get("max_points", 512)))
        parts.append(df.assign(run=r.run, model=r.model, init=r.init, seed=r.seed))
    sim = pd.concat(parts, ignore_index=True)
    sim.to_csv(out, index=False)
    return sim
