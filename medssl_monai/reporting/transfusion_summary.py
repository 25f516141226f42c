"""The Transfusion experiments' summary: ``results.md`` (a table per experiment, per-stage similarity),
``curves.png`` (validation AUC against training steps) and ``similarity.png``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..experiments.runner import bundle_minutes
from ..experiments.transfusion import run_transfusion
from ..utils.atomic import atomic_write_text
from .plots import pyplot

__all__ = ["run_transfusion_and_summarize", "write_transfusion_summary"]


def _param_count(model: str, in_channels: int, slim: str = "") -> int:
    from ..networks import get_backbone

    net = get_backbone(model, in_channels=in_channels, **(json.loads(slim) if slim else {}))
    return sum(p.numel() for p in net.parameters())


def write_transfusion_summary(results: pd.DataFrame, sim: pd.DataFrame, run: Path, seconds: float,
                              cfg: Mapping[str, Any]) -> Path:
    """``results.md`` (tables per experiment), ``curves.png`` (val AUC vs step) and ``similarity.png``."""
    plt = pyplot()
    in_channels = int((cfg.get("common") or {}).get("in_channels", 3))
    targets = [f"steps_to_auc_{t:g}" for t in cfg["targets"]]
    exps = list(dict.fromkeys(results["experiment"]))
    fig, axes = plt.subplots(1, len(exps), figsize=(5.5 * len(exps), 4), squeeze=False)
    for ax, exp in zip(axes[0], exps):
        sub = results[(results["experiment"] == exp) & (results["seed"] == results["seed"].min())]
        for r in sub.itertuples(index=False):
            curve = pd.read_csv(Path(r.after).parent.parent / "output" / "val_curve.csv")
            ax.plot(curve["step"], curve["auc_macro"], marker=".", label=r.run.rsplit("_s", 1)[0])
        for t in cfg["targets"]:
            ax.axhline(float(t), color="grey", lw=0.5, ls="--")
        ax.set_title(exp)
        ax.set_xlabel("training step")
        ax.set_ylabel("val macro AUC")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "curves.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    mean = sim.groupby(["model", "init", "method", "stage", "depth"], sort=False)["similarity"].mean().reset_index()
    for ax, method in zip(axes, ("cka", "svcca")):
        for (model, init), g in mean[mean["method"] == method].groupby(["model", "init"], sort=False):
            ax.plot(g["depth"], g["similarity"], marker="o", ls="-" if init == "random" else "--",
                    label=f"{model} ({init})")
        ax.set_xlabel("relative depth of the stage")
        ax.set_ylabel(f"{method.upper()}(before, after fine-tuning)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run / "similarity.png", dpi=100)
    plt.close(fig)

    results = results.copy()
    for t in targets:  # not reached counts as slower than any step, so one lucky seed cannot make the median
        results[t] = pd.to_numeric(results[t], errors="coerce").fillna(float("inf"))
    agg = {"balanced_accuracy": ["mean", "std"], "auc_macro": ["mean", "std"], "seed": "count",
           **{t: "median" for t in targets}}
    lines = [f"# Transfusion experiments\n\nWall time of the last invocation: {seconds / 60:.1f} min; bundle runs: "
             f"{bundle_minutes(run):.1f} min in total (as each run recorded it). Validation metrics after the last "
             f"epoch (mean ± std over seeds); steps to reach a validation macro AUC (median over seeds, "
             "a seed that never reaches it counting as infinitely slow; '-' = the median run did not reach it).\n"]
    for exp in exps:
        sub = results[results["experiment"] == exp]
        g = sub.groupby(["model", "init", "k", "slim"], dropna=False, sort=False).agg(agg)
        g.columns = ["bal_mean", "bal_std", "auc_mean", "auc_std", "seeds", *targets]
        lines += [f"\n## {exp}\n", "| model | params | init | k | slim | balanced acc. | macro AUC | seeds | "
                  + " | ".join(f"steps to AUC {t:g}" for t in cfg["targets"]) + " |",
                  "|---|---:|---|---:|---|---:|---:|---:|" + "---:|" * len(targets)]
        for (model, init, k, slim), v in g.iterrows():
            sd = lambda x: "" if pd.isna(x) else f" ± {x:.3f}"  # noqa: E731
            steps = " | ".join("-" if v[t] == float("inf") else f"{v[t]:.0f}" for t in targets)
            kk = "" if pd.isna(k) else f"{int(k)}"
            lines.append(f"| {model} | {_param_count(model, in_channels, slim) / 1e6:.2f}M | {init} | {kk} | {slim or ''} | "
                         f"{v.bal_mean:.3f}{sd(v.bal_std)} | {v.auc_mean:.3f}{sd(v.auc_std)} | {int(v.seeds)} | {steps} |")
    mean["stage_no"] = mean.groupby(["model", "init", "method"], sort=False).cumcount() + 1
    mean["cell"] = mean["stage"] + " " + mean["similarity"].map("{:.3f}".format)
    lines.append("\n## similarity before vs after fine-tuning (per stage from the input up, mean over seeds)\n")
    for method in ("cka", "svcca"):
        piv = mean[mean["method"] == method].pivot_table(index=["model", "init"], columns="stage_no", values="cell",
                                                         aggfunc="first", sort=False)
        lines += [f"\n{method.upper()}:\n", _md(piv)]
    lines += [
              "\n![curves](curves.png)\n\n![similarity](similarity.png)\n"]
    out = run / "results.md"
    atomic_write_text(out, "\n".join(lines))
    return out


def _md(df: pd.DataFrame) -> str:
    cols = [f"stage {c}" for c in df.columns]
    head = "| model | init | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols)
    body = ["| " + " | ".join(str(i) for i in idx) + " | " + " | ".join("" if pd.isna(x) else str(x) for x in row)
            + " |" for idx, row in zip(df.index, df.to_numpy())]
    return "\n".join([head, *body])


def run_transfusion_and_summarize(config: str | os.PathLike | Mapping[str, Any],
                                  run_dir: str | os.PathLike | None = None, force: bool = False) -> pd.DataFrame:
    """``medssl transfusion``: :func:`~medssl_monai.experiments.transfusion.run_transfusion`, then
    :func:`write_transfusion_summary`."""
    return run_transfusion(config, run_dir, force, summary=write_transfusion_summary)
