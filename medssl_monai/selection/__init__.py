"""Cold-start label selection: which groups (patients, studies, images) to label first, from a pretrained
embedding. Pure algorithms on numpy arrays; :mod:`medssl_monai.experiments.select` computes the embedding
from a checkpoint and writes the worklist.

    from medssl_monai.selection import select
    order = select(features, groups=patient_ids, fraction=0.05, strategy="typiclust", seed=0)
    # order[:k] is the selection at budget k (nested by construction)
    nxt = next_to_label(features, image_ids, labelled_ids, seed=0)  # one at a time (MONAI Label's strategy)
"""

from .budget import budget_count, budget_counts
from .choose import STRATEGIES, apportion, rank, select
from .kcenter import covering_radius, kcenter_order
from .levels import LEVEL_COLUMNS, aggregate, group_modes, level_column, normalize_rows
from .next_label import next_to_label
from .random_order import random_order
from .typiclust import kmeans_labels, pick_from_clusters, typicality, typiclust_order

__all__ = [
    "LEVEL_COLUMNS",
    "STRATEGIES",
    "aggregate",
    "apportion",
    "budget_count",
    "budget_counts",
    "covering_radius",
    "group_modes",
    "kcenter_order",
    "kmeans_labels",
    "level_column",
    "next_to_label",
    "normalize_rows",
    "pick_from_clusters",
    "random_order",
    "rank",
    "select",
    "typicality",
    "typiclust_order",
]
