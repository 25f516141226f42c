"""Greedy k-center against a loop reference and against the optimal covering radius (brute force)."""

from __future__ import annotations

import itertools
import math

import numpy as np

from medssl_monai.selection import covering_radius, kcenter_order, random_order

from .planted import planted


def naive_greedy(points: np.ndarray, first: int, n: int) -> list[int]:
    chosen = [first]
    while len(chosen) < n:
        far = max(range(len(points)), key=lambda i: (min(math.dist(points[i], points[c]) for c in chosen), -i))
        chosen.append(far)
    return chosen


def naive_radius(points: np.ndarray, centers) -> float:
    return max(min(math.dist(p, points[c]) for c in centers) for p in points)


def test_order_is_the_farthest_first_traversal() -> None:
    x, _, _ = planted((25, 15, 10), dim=6)
    order = kcenter_order(x, 12, seed=4)
    assert order.tolist() == naive_greedy(x.astype(np.float64), int(order[0]), 12)
    assert kcenter_order(x, 12, seed=4).tolist() == order.tolist()
    assert kcenter_order(x, 5, seed=4).tolist() == order[:5].tolist()  # nested
    assert kcenter_order(x, 12, seed=5)[0] != order[0] or kcenter_order(x, 12, seed=6)[0] != order[0]


def test_covering_radius_within_twice_the_optimum() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    for k in (2, 3, 4):
        best = min(naive_radius(x, c) for c in itertools.combinations(range(12), k))
        for seed in range(5):
            order = kcenter_order(x, k, seed=seed)
            r = covering_radius(x, order)
            assert abs(r - naive_radius(x.astype(np.float64), order.tolist())) < 1e-5
            assert best - 1e-6 <= r <= 2 * best + 1e-6


def test_kcenter_covers_every_planted_cluster_first() -> None:
    x, cluster, _ = planted()
    order = kcenter_order(x, 4, seed=0)
    assert sorted(cluster[order].tolist()) == [0, 1, 2, 3]
    assert covering_radius(x, order) < covering_radius(x, random_order(x, 4, seed=0))


def test_random_is_a_seeded_permutation_prefix() -> None:
    x = np.zeros((50, 2))
    full = random_order(x, 50, seed=7)
    assert sorted(full.tolist()) == list(range(50))
    assert random_order(x, 10, seed=7).tolist() == full[:10].tolist()
    assert random_order(x, 10, seed=8).tolist() != full[:10].tolist()
