"""TypiClust against a naive reference on a planted embedding: one pick per cluster, the most typical one,
the largest uncovered cluster first."""

from __future__ import annotations

import numpy as np
import pytest

from medssl_monai.selection import pick_from_clusters, typicality, typiclust_order

from .planted import SIZES, naive_typicality, planted


def test_typicality_matches_the_naive_definition() -> None:
    x, _, _ = planted((30, 20), dim=5)
    np.testing.assert_allclose(typicality(x, k=7, chunk=16), naive_typicality(x.astype(np.float64), 7), rtol=1e-4)
    assert np.isinf(typicality(x[:1])).all()


def test_one_pick_per_planted_cluster_and_the_most_typical_one() -> None:
    x, cluster, centers = planted()
    order = typiclust_order(x, len(SIZES), seed=0)
    assert sorted(cluster[order].tolist()) == list(range(len(SIZES)))  # every cluster covered once
    for i in order:
        members = np.flatnonzero(cluster == cluster[i])
        ref = naive_typicality(x[members].astype(np.float64), 20)
        assert members[int(np.argmax(ref))] == i
        # and "typical" means central: among the 25% of its cluster nearest the planted center
        dist = np.linalg.norm(x[members] - centers[cluster[i]], axis=1)
        assert (dist < np.linalg.norm(x[i] - centers[cluster[i]])).mean() < 0.25


def test_uncovered_clusters_largest_first() -> None:
    x, cluster, _ = planted()
    picks = pick_from_clusters(x, cluster, [], len(SIZES))
    assert cluster[picks].tolist() == [0, 1, 2, 3]  # sizes 120 > 80 > 60 > 45
    covered = int(np.flatnonzero(cluster == 0)[0])  # cluster 0 already has a labelled item: it comes last
    picks = pick_from_clusters(x, cluster, [covered], 4)
    assert cluster[picks].tolist() == [1, 2, 3, 0] and covered not in picks
    members = np.flatnonzero(cluster == 0)
    rest = members[members != covered]  # typicality among the cluster's unselected items
    assert picks[-1] == rest[int(np.argmax(naive_typicality(x[rest].astype(np.float64), 20)))]


def test_outlier_clusters_wait_until_the_large_ones_are_used() -> None:
    x, cluster, _ = planted((40, 30, 3))
    picks = pick_from_clusters(x, cluster, [], 3)
    assert cluster[picks].tolist() == [0, 1, 0]  # the 3-item cluster is an outlier group: cycled past


@pytest.mark.parametrize("seed", [0, 3])
def test_prefixes_are_the_smaller_budgets_and_seeds_reproduce(seed: int) -> None:
    x, _, _ = planted(seed=1)
    full = typiclust_order(x, 40, seed=seed)
    assert len(set(full.tolist())) == 40
    for n in (1, 3, 4, 9, 17):
        assert typiclust_order(x, n, seed=seed).tolist() == full[:n].tolist()
    assert typiclust_order(x, 40, seed=seed).tolist() == full.tolist()


def test_every_item_can_be_selected() -> None:
    x, _, _ = planted((6, 5))
    assert sorted(typiclust_order(x, 11).tolist()) == list(range(11))
    with pytest.raises(ValueError, match="cannot select 12 of 11"):
        typiclust_order(x, 12)
