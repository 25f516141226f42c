"""TypiClust (Hacohen, Dekel & Weinshall, ICML 2022): the most typical item of each uncovered cluster.

At tiny budgets the best first labels are typical ones (dense regions: what most images look like) that are
also diverse (one per region). TypiClust clusters the embedding into as many k-means clusters as items to be
labelled, takes the clusters holding no selected item yet ("uncovered"), largest first, and picks from each
its most typical item: typicality(x) = 1 / mean distance of x to its k nearest neighbours in its cluster
(k = min(20, cluster size // 2)); clusters of at most 5 items (outliers) are left out while larger ones remain.

Nested budgets by construction: the selection grows in rounds on a doubling schedule (1, 2, 4, 8, ... items),
round r clustering into 2^r clusters with the items of the earlier rounds as the labelled set, the paper's
own active-learning step with a budget equal to what is already labelled. The schedule does not depend on
the budget asked for, so a budget of 50 is the first 50 of a budget of 100, whatever was asked first.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["K_NN", "MIN_CLUSTER_SIZE", "kmeans_labels", "pick_from_clusters", "typicality", "typiclust_order"]

logger = logging.getLogger(__name__)

#: neighbours of the typicality (the paper's 20)
K_NN = 20
#: clusters of at most this many items are outliers, picked from only when no larger cluster is left
MIN_CLUSTER_SIZE = 5
#: up to this many clusters: exact k-means (Lloyd from k-means++); beyond it mini-batch k-means, as the paper's
#: code does (sklearn ``KMeans`` / ``MiniBatchKMeans``)
EXACT_KMEANS_MAX = 50


def typicality(x: np.ndarray, k: int = K_NN, chunk: int = 1024) -> np.ndarray:
    """``1 / mean Euclidean distance to the k nearest other rows`` for every row of ``x`` (``inf`` for a
    single row or a row with k exact duplicates). ``chunk`` rows at a time: a (chunk, N) distance block."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    k = min(int(k), n - 1)
    if k < 1:
        return np.full(n, np.inf)
    sq = (x * x).sum(1)
    mean = np.empty(n)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (x[start:stop] @ x.T)
        np.maximum(d2, 0.0, out=d2)
        d2[np.arange(stop - start), np.arange(start, stop)] = np.inf  # not its own neighbour
        mean[start:stop] = np.sqrt(np.partition(d2, k - 1, axis=1)[:, :k]).mean(1)
    with np.errstate(divide="ignore"):
        return 1.0 / mean


def kmeans_labels(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Cluster index of every row of ``x`` into ``k`` clusters (deterministic for ``seed``)."""
    n = len(x)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if k <= EXACT_KMEANS_MAX:
        model = KMeans(n_clusters=k, n_init=1, random_state=seed)
    else:
        model = MiniBatchKMeans(n_clusters=k, batch_size=1024, n_init=1, random_state=seed)
    # float64: sklearn's float32 distances go through a slow chunked up-cast (5x slower k-means++ here)
    return model.fit_predict(np.asarray(x, dtype=np.float64)).astype(np.int64)


def pick_from_clusters(x: np.ndarray, labels: np.ndarray, selected: list[int], n_new: int, k_nn: int = K_NN,
                       min_cluster_size: int = MIN_CLUSTER_SIZE) -> list[int]:
    """``n_new`` more rows: clusters ordered by how many selected rows they hold (fewest first), then by size
    (largest first), then by index; from each in turn its most typical unselected row, typicality measured
    among the cluster's unselected rows (the paper's code). Cycles through the clusters when ``n_new``
    exceeds their number."""
    labels = np.asarray(labels)
    available = np.ones(len(x), dtype=bool)
    available[selected] = False
    ids, sizes = np.unique(labels, return_counts=True)
    covered = np.bincount(labels[selected], minlength=int(ids.max()) + 1)[ids] if selected else np.zeros_like(ids)
    keep = sizes > min_cluster_size
    if not keep.any():  # every cluster is small (tiny pools): use them all
        keep[:] = True
    ids, sizes, covered = ids[keep], sizes[keep], covered[keep]
    ranked = ids[np.lexsort((ids, -sizes, covered))]
    picks: list[int] = []
    cursor = 0
    empty = 0
    while len(picks) < n_new:
        if empty >= len(ranked):  # the kept clusters are exhausted: fall back to every cluster
            if len(ranked) == len(np.unique(labels)):
                raise ValueError(f"cannot pick {n_new} more items: only {len(picks)} left unselected")
            ranked, cursor, empty = np.unique(labels), 0, 0
            continue
        cluster = ranked[cursor % len(ranked)]
        cursor += 1
        members = np.flatnonzero((labels == cluster) & available)
        if len(members) == 0:
            empty += 1
            continue
        empty = 0
        best = members[int(np.argmax(typicality(x[members], min(k_nn, max(1, len(members) // 2)))))]
        picks.append(int(best))
        available[best] = False
    return picks


def typiclust_order(x: np.ndarray, n: int, seed: int = 0, k_nn: int = K_NN,
                    min_cluster_size: int = MIN_CLUSTER_SIZE) -> np.ndarray:
    """``n`` row positions of ``x`` in TypiClust order on the doubling schedule (see the module docstring)."""
    x = np.asarray(x, dtype=np.float32)
    total = len(x)
    if not 0 <= n <= total:
        raise ValueError(f"cannot select {n} of {total} items")
    order: list[int] = []
    target = 1
    while len(order) < n:
        k = min(target, total)
        labels = kmeans_labels(x, k, seed)
        order += pick_from_clusters(x, labels, order, min(k, n) - len(order), k_nn, min_cluster_size)
        logger.debug("typiclust: %d clusters, %d items selected", k, len(order))
        target *= 2
    return np.asarray(order[:n], dtype=np.int64)
