"""select(): groups selected together, nested budgets, stratification, determinism, budgets."""

from __future__ import annotations

import numpy as np
import pytest

from medssl_monai.selection import STRATEGIES, aggregate, apportion, budget_count, rank, select

from .planted import planted


def test_budget_counts() -> None:
    assert budget_count(200, fraction=0.05) == 10
    assert budget_count(30, fraction=0.01) == 1  # never below one group
    assert budget_count(200, budget=7) == 7
    for kw, msg in (({"budget": 201}, "exceeds the 200"), ({"fraction": 0.0}, r"in \(0, 1\]"),
                    ({}, "exactly one"), ({"budget": 2, "fraction": 0.1}, "exactly one"),
                    ({"budget": 2.5}, "whole number")):
        with pytest.raises(ValueError, match=msg):
            budget_count(200, **kw)


def test_aggregate_is_the_normalised_group_mean() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 4)).astype(np.float32)
    groups = ["b", "a", "b", "c", "a", "b", "c"]
    keys, means = aggregate(x, groups)
    assert keys == ["b", "a", "c"]
    for k, m in zip(keys, means):
        rows = [x[i] / np.linalg.norm(x[i]) for i, g in enumerate(groups) if g == k]
        ref = np.mean(rows, axis=0)
        np.testing.assert_allclose(m, ref / np.linalg.norm(ref), rtol=1e-5)
    keys, means = aggregate(x, None, normalize=False)
    assert keys == list(range(7)) and np.array_equal(means, x)


def _patients(seed: int = 0):
    """Images of 60 patients (1-4 images each, near their patient's point of a planted embedding)."""
    x, cluster, _ = planted((24, 18, 12, 6), seed=seed)
    rng = np.random.default_rng(seed)
    rows, groups, modality = [], [], []
    for p, (point, c) in enumerate(zip(x, cluster)):
        for _ in range(int(rng.integers(1, 5))):
            rows.append(point + 0.05 * rng.normal(size=point.shape))
            groups.append(f"P{p:03d}")
            modality.append("CT" if c < 2 else "MR")
    return np.asarray(rows, dtype=np.float32), groups, modality


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_groups_selected_whole_nested_and_reproducible(strategy: str) -> None:
    x, groups, _ = _patients()
    full = select(x, groups, budget=30, strategy=strategy, seed=1)
    assert len(full) == len(set(full)) == 30 and set(full) <= set(groups)
    for b in (1, 2, 6, 13):
        assert select(x, groups, budget=b, strategy=strategy, seed=1) == full[:b]
    assert select(x, groups, fraction=0.5, strategy=strategy, seed=1) == full
    assert select(x, groups, budget=30, strategy=strategy, seed=1) == full
    if strategy != "typiclust":  # typiclust's first picks are the densest points whatever the seed
        assert select(x, groups, budget=30, strategy=strategy, seed=2) != full


def naive_sainte_lague(sizes, n):
    quotients = sorted(((s / (2 * j + 1), s, -i) for i, s in enumerate(sizes) for j in range(s)), reverse=True)
    return [sum(1 for q in quotients[:n] if -q[2] == i) for i in range(len(sizes))]


def test_apportion_is_house_monotone_sainte_lague() -> None:
    sizes = [50, 30, 15, 4, 1]
    slots = apportion(sizes, sum(sizes))
    for n in range(sum(sizes) + 1):
        assert np.bincount(slots[:n], minlength=5).tolist() == naive_sainte_lague(sizes, n)
        assert apportion(sizes, n) == slots[:n]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_stratified_selection(strategy: str) -> None:
    x, groups, modality = _patients()
    n_ct = len({g for g, m in zip(groups, modality) if m == "CT"})
    full = select(x, groups, budget=20, strategy=strategy, seed=0, stratify=modality)
    by_group = dict(zip(groups, modality))
    ct = sum(by_group[g] == "CT" for g in full)
    assert ct == round(20 * n_ct / 60)  # proportional
    for b in (3, 11):
        assert select(x, groups, budget=b, strategy=strategy, seed=0, stratify=modality) == full[:b]
    # within a stratum: the strategy's own order on that stratum's groups
    keys, g = aggregate(x, groups)
    ct_pos = [i for i, k in enumerate(keys) if by_group[k] == "CT"]
    within = rank(g[ct_pos], ct, strategy, 0)
    assert [k for k in full if by_group[k] == "CT"] == [keys[ct_pos[i]] for i in within]


def test_unknown_strategy_and_bad_inputs() -> None:
    x, groups, _ = _patients()
    with pytest.raises(ValueError, match="unknown selection strategy 'typical'"):
        select(x, groups, budget=3, strategy="typical")
    with pytest.raises(ValueError, match="group keys for"):
        select(x, groups[:-1], budget=3)
    with pytest.raises(ValueError, match="NaN"):
        select(np.full((3, 2), np.nan), budget=1)
