"""Which groups to label first: one ordered list from an embedding, a strategy and a seed.

Every strategy returns an *order* whose prefixes are its selections at smaller budgets, so the 2% set is
inside the 5% set by construction and label-efficiency curves compare like with like. Stratification
(by modality, body part, ...) splits the budget over the strata in proportion to their sizes with a divisor
method (Sainte-Laguë), which is house-monotone: a larger budget never takes a slot from a stratum, so the
merged order stays nested too.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np

from .budget import budget_count
from .kcenter import kcenter_order
from .levels import aggregate, group_modes
from .random_order import random_order
from .typiclust import typiclust_order

__all__ = ["STRATEGIES", "apportion", "rank", "select"]

#: strategy name -> ``order(x, n, seed) -> n row positions`` (prefix-nested)
STRATEGIES: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    "random": random_order,
    "typiclust": typiclust_order,
    "kcenter": kcenter_order,
}


def _strategy(name: str) -> Callable[[np.ndarray, int, int], np.ndarray]:
    if name not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {name!r}: use one of {list(STRATEGIES)}")
    return STRATEGIES[name]


def apportion(sizes: Sequence[int], n: int) -> list[int]:
    """The stratum of each of ``n`` successive slots (Sainte-Laguë: the next slot goes to the stratum with the
    largest ``size / (2 * taken + 1)``; ties: the larger stratum, then the earlier one). A stratum never gets
    more slots than it has items; every prefix is the apportionment of its own length."""
    sizes = [int(s) for s in sizes]
    if n > sum(sizes):
        raise ValueError(f"cannot select {n} of {sum(sizes)} items")
    taken = [0] * len(sizes)
    out = []
    for _ in range(n):
        best = max((i for i in range(len(sizes)) if taken[i] < sizes[i]),
                   key=lambda i: (sizes[i] / (2 * taken[i] + 1), sizes[i], -i))
        taken[best] += 1
        out.append(best)
    return out


def rank(x: np.ndarray, n: int, strategy: str = "typiclust", seed: int = 0,
         strata: Sequence[Hashable] | None = None) -> np.ndarray:
    """``n`` row positions of ``x`` in selection order; with ``strata`` (one value per row) the strategy runs
    within each stratum (sorted by value) and the slots are shared out by :func:`apportion`."""
    order_fn = _strategy(strategy)
    x = np.asarray(x, dtype=np.float32)
    if strata is None:
        return np.asarray(order_fn(x, n, seed), dtype=np.int64)
    if len(strata) != len(x):
        raise ValueError(f"{len(strata)} strata for {len(x)} items")
    values = np.asarray([str(s) for s in strata])
    names = sorted(set(values.tolist()))
    members = [np.flatnonzero(values == s) for s in names]
    slots = apportion([len(m) for m in members], n)
    counts = np.bincount(np.asarray(slots, dtype=np.int64), minlength=len(names)) if slots else np.zeros(len(names), int)
    orders = [m[np.asarray(order_fn(x[m], int(c), seed), dtype=np.int64)] if c else m[:0]
              for m, c in zip(members, counts)]
    cursor = [0] * len(names)
    out = np.empty(n, dtype=np.int64)
    for i, s in enumerate(slots):
        out[i] = orders[s][cursor[s]]
        cursor[s] += 1
    return out


def select(embeddings: np.ndarray, groups: Sequence[Hashable] | None = None, budget: int | None = None,
           strategy: str = "typiclust", seed: int = 0, stratify: Sequence[Hashable] | None = None, *,
           fraction: float | None = None, normalize: bool = True) -> list[Hashable]:
    """The groups to label, in selection order: the first ``k`` of the list are the selection at budget ``k``.

    Args:
        embeddings: ``(N, D)`` features, one row per image.
        groups: each row's group key (patient, study, ...; ``None``: every row is a group, keyed by position).
            A group's rows are pooled into one embedding (:func:`~medssl_monai.selection.levels.aggregate`)
            and selected together.
        budget / fraction: how many groups (exactly one of them; a fraction of the groups).
        strategy: ``random``, ``typiclust`` or ``kcenter`` (:data:`STRATEGIES`).
        seed: the same seed gives the same list.
        stratify: one value per row (e.g. modality, or ``"CT|CHEST"``); a group takes its most frequent one.
        normalize: L2-normalise the rows and the group means (cosine geometry of contrastive features).
    """
    keys, x = aggregate(embeddings, groups, normalize=normalize)
    n = budget_count(len(keys), budget=budget, fraction=fraction)
    strata = None
    if stratify is not None:
        if len(stratify) != len(embeddings):
            raise ValueError(f"{len(stratify)} stratification values for {len(embeddings)} embeddings")
        strata = group_modes(stratify, list(range(len(embeddings))) if groups is None else groups, keys)
    return [keys[i] for i in rank(x, n, strategy, seed, strata)]
