"""Greedy k-center (farthest-first traversal; Gonzalez 1985, the core-set of Sener & Savarese 2018).

Each step takes the item farthest from everything chosen so far, which covers the embedding space evenly
(outliers included): its covering radius is at most twice the optimal k-center radius. The order itself
is the greedy, so every prefix is the k-center selection of that size: nested by construction.
"""

from __future__ import annotations

import numpy as np

__all__ = ["covering_radius", "kcenter_order"]


def kcenter_order(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` row positions of ``x`` in greedy k-center order, from a seeded random first center (ties: the
    lowest position)."""
    x = np.asarray(x, dtype=np.float32)
    total = len(x)
    if not 0 <= n <= total:
        raise ValueError(f"cannot select {n} of {total} items")
    order = np.empty(n, dtype=np.int64)
    if n == 0:
        return order
    sq = np.einsum("ij,ij->i", x, x)
    nearest = np.full(total, np.inf, dtype=np.float32)  # squared distance to the closest chosen center
    pick = int(np.random.default_rng(seed).integers(total))
    for i in range(n):
        order[i] = pick
        d2 = sq + sq[pick] - 2.0 * (x @ x[pick])  # |a-b|^2 = |a|^2 + |b|^2 - 2ab: one matrix-vector product
        np.minimum(nearest, d2, out=nearest)
        nearest[pick] = -1.0  # chosen: never the farthest (float error may leave its d2 slightly above 0)
        if i + 1 < n:
            pick = int(np.argmax(nearest))
    return order


def covering_radius(x: np.ndarray, centers: np.ndarray) -> float:
    """The largest distance from a row of ``x`` to its nearest center (what k-center minimises)."""
    x = np.asarray(x, dtype=np.float64)
    c = x[np.asarray(centers, dtype=np.int64)]
    d2 = (x * x).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * x @ c.T
    return float(np.sqrt(np.maximum(d2.min(axis=1), 0.0)).max())
