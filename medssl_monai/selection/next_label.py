"""The next image to label, given what is labelled already: TypiClust's active-learning step for one item.

An annotator labels one image at a time (MONAI Label's ``/activelearning/<strategy>``), so the question is not
"which N" but "which one next". TypiClust's answer (Hacohen et al., ICML 2022) with ``L`` images labelled:
cluster the embedding into ``L + 1`` k-means clusters, count the labelled images as covering their clusters,
and take the most typical image of the largest uncovered cluster (:func:`~.typiclust.pick_from_clusters`,
which also leaves out clusters of at most 5 images while larger ones remain). ``L + 1`` clusters for ``L``
labels leave at least one cluster uncovered. Rows are ordered by id first, so the answer depends on the set
of images, not on the order a datastore lists them in.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from .levels import normalize_rows
from .typiclust import K_NN, MIN_CLUSTER_SIZE, kmeans_labels, pick_from_clusters

__all__ = ["next_to_label"]


def next_to_label(embeddings: np.ndarray, ids: Sequence[str], labelled_ids: Collection[str] = (), seed: int = 0, *,
                  normalize: bool = True, k_nn: int = K_NN, min_cluster_size: int = MIN_CLUSTER_SIZE) -> str | None:
    """The id of the next image to label (``None`` when every image is labelled).

    Args:
        embeddings: ``(N, D)`` features, row ``i`` the image ``ids[i]``.
        ids: one distinct id per row.
        labelled_ids: the images labelled so far (ids not in ``ids``, e.g. images gone from the datastore,
            are ignored).
        seed: k-means seed; the same images, labels and seed give the same answer.
        normalize: L2-normalise the rows first (the cosine geometry of contrastive features, as
            :func:`~medssl_monai.selection.select` does).
    """
    x = np.asarray(embeddings, dtype=np.float32)
    ids = [str(i) for i in ids]
    if x.ndim != 2 or len(x) != len(ids):
        raise ValueError(f"{len(ids)} ids for embeddings of shape {tuple(x.shape)}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"ids must be distinct: {len(ids) - len(set(ids))} repeated")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    ids = [ids[i] for i in order]
    x = x[order]
    labelled = set(map(str, labelled_ids))
    selected = [i for i, k in enumerate(ids) if k in labelled]
    if len(selected) == len(ids):
        return None
    if normalize:
        x = normalize_rows(x)
    labels = kmeans_labels(x, len(selected) + 1, seed)
    (pick,) = pick_from_clusters(x, labels, selected, 1, k_nn, min_cluster_size)
    return ids[pick]
