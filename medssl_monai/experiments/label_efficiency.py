"""The label-efficiency grid: one fine-tuning recipe repeated per arm (a starting checkpoint) x label
fraction x seed. The pipeline's ``label_efficiency`` section and the study's fine-tuning both run it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from .runner import run_bundle

__all__ = ["GridPoint", "grid_points", "run_grid", "summarize"]

BUNDLE = "finetune_classification"


class GridPoint(NamedTuple):
    """One fine-tuning run of the grid."""

    arm: str
    fraction: float
    seed: int


def grid_points(arms: Iterable[str], fractions: Mapping[str, Sequence[float]] | Sequence[float],
                seeds: Mapping[float, Sequence[int]] | Sequence[int]) -> list[GridPoint]:
    """Every (arm, fraction, seed) once, in arm, fraction, seed order (two runs of one point at once would
    race in one folder). ``fractions`` may be per arm, ``seeds`` per fraction."""
    points = []
    for arm in arms:
        for frac in (float(f) for f in (fractions.get(arm, []) if isinstance(fractions, Mapping) else fractions)):
            if isinstance(seeds, Mapping):
                if frac not in seeds:
                    raise ValueError(f"no seeds for fraction {frac} (seeds has {sorted(seeds)})")
                frac_seeds = seeds[frac]
            else:
                frac_seeds = seeds
            points += [GridPoint(arm, frac, int(s)) for s in frac_seeds]
    return list(dict.fromkeys(points))


def run_grid(points: Sequence[GridPoint], checkpoints: Mapping[str, str | None], overrides: Mapping[str, Any],
             manifest: Path, bundle_src: Path, run_dir: Path, *, folder: str, tag: str,
             last: Mapping[str, Any] | None = None, done: Mapping[GridPoint, Path] | None = None, parallel: int = 1,
             force: bool = False, allow_expressions: bool = False, finished_only: bool = False) -> list[Path | None]:
    """Fine-tune every point from its arm's checkpoint (``None``: a random init); returns the bundle roots.

    ``folder`` and ``tag`` are patterns over the point's fields, e.g. ``"label_efficiency/{arm}_f{fraction:g}_s
    {seed}"`` (the run goes to ``run_dir/<folder>/finetune_classification``) and ``"le_{arm}_{fraction:g}_s{seed}"``.
    Overrides: ``overrides``, then the point's manifest, checkpoint, fraction and seed, then ``last``.
    ``done`` names points already trained elsewhere (not run again). Runs are independent processes:
    ``parallel`` of them at once keep a GPU busy; the first failure stops the queue and is raised.
    ``finished_only``: nothing runs; a point's root if its model exists, else ``None``.
    """
    done = dict(done or {})
    if finished_only:
        roots = [done.get(p) or run_dir / folder.format(**p._asdict()) / BUNDLE for p in points]
        return [r if (r / "models" / "model.pt").is_file() else None for r in roots]

    def finetune(p: GridPoint) -> Path:
        if p in done:
            return done[p]
        fields = p._asdict()
        root = run_dir / folder.format(**fields) / BUNDLE
        return run_bundle(bundle_src, "train.json", root,
                          {**overrides, "manifest": str(manifest), "pretrained_ckpt": checkpoints[p.arm],
                           "label_fraction": p.fraction, "seed": p.seed, **(last or {})},
                          run_dir, tag.format(**fields), root / "models" / "model.pt", force=force,
                          allow_expressions=allow_expressions)

    with ThreadPoolExecutor(max_workers=int(parallel)) as pool:
        futures = [pool.submit(finetune, p) for p in points]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and f.exception() is not None]
        if failed:  # stop at the first failure: queued runs are dropped, running ones finish
            pool.shutdown(wait=True, cancel_futures=True)
            raise failed[0].exception()
        return [f.result() for f in futures]


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and seed count per arm and fraction."""
    g = results.groupby(["arm", "fraction"])
    out = g[["balanced_accuracy", "auc_macro"]].agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out["seeds"] = g.size()
    return out.reset_index()
