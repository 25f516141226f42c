"""A planted embedding: well-separated Gaussian clusters of known sizes (the ground truth of the tests)."""

from __future__ import annotations

import math

import numpy as np

SIZES = (120, 80, 60, 45)


def planted(sizes=SIZES, dim: int = 16, spread: float = 1.0, gap: float = 12.0, seed: int = 0):
    """``(x, cluster, centers)``: cluster c has ``sizes[c]`` points around its center, centers ``gap`` apart."""
    rng = np.random.default_rng(seed)
    centers = np.eye(len(sizes), dim) * gap / math.sqrt(2)
    cluster = np.repeat(np.arange(len(sizes)), sizes)
    x = centers[cluster] + spread * rng.normal(size=(len(cluster), dim))
    perm = rng.permutation(len(cluster))  # clusters interleaved: positions say nothing
    return x[perm].astype(np.float32), cluster[perm], centers


def naive_typicality(points: np.ndarray, k: int) -> list[float]:
    """1 / mean distance to the k nearest other points, by plain loops."""
    out = []
    for i, p in enumerate(points):
        d = sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)
        out.append(1.0 / (sum(d[:k]) / k))
    return out
