"""The next image to label (MONAI Label's ``typicality`` strategy) against a naive reference on a planted
embedding: labelled images cover their cluster; the answer is the most typical image of the largest uncovered
cluster; the same images, labels and seed give the same answer, whatever order they come in."""

from __future__ import annotations

import numpy as np
import pytest

from medssl_monai.selection import next_to_label

from .planted import SIZES, naive_typicality, planted


def _setup(seed: int = 0):
    x, cluster, _ = planted(seed=seed)
    ids = [f"1.2.3.{i}" for i in range(len(x))]
    unit = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return x, cluster, ids, unit


def _most_typical(unit: np.ndarray, members: np.ndarray) -> int:
    """The member with the highest naive typicality within ``members`` (k = min(20, size // 2))."""
    return int(members[int(np.argmax(naive_typicality(unit[members], min(20, len(members) // 2))))])


@pytest.mark.parametrize("covered", [(0, 1, 2), (0, 0, 1), (1, 2, 3), (3, 3, 2)])
def test_the_most_typical_image_of_the_largest_uncovered_cluster(covered: tuple[int, ...]) -> None:
    x, cluster, ids, unit = _setup()
    rng = np.random.default_rng(5)
    labelled = []
    for c in covered:  # any member of the cluster, not its centre
        labelled.append(int(rng.choice([i for i in np.flatnonzero(cluster == c) if i not in labelled])))
    # len(covered) + 1 = 4 k-means clusters: the planted ones, well separated
    uncovered = [c for c in np.argsort([-s for s in SIZES], kind="stable") if c not in covered]
    target = int(uncovered[0])  # the largest cluster holding no labelled image
    answer = next_to_label(x, ids, [ids[i] for i in labelled], seed=0)
    assert answer == ids[_most_typical(unit, np.flatnonzero(cluster == target))]


def test_nothing_labelled_gives_the_most_typical_image_of_the_pool() -> None:
    x, _, ids, unit = _setup(seed=2)
    assert next_to_label(x, ids, [], seed=0) == ids[_most_typical(unit, np.arange(len(x)))]


def test_seeds_reproduce_and_the_listing_order_does_not_matter() -> None:
    x, cluster, ids, _ = _setup(seed=1)
    labelled = [ids[int(np.flatnonzero(cluster == c)[3])] for c in (0, 2)]
    answers = {next_to_label(x, ids, labelled, seed=s) for s in (7, 7)}
    assert len(answers) == 1
    perm = np.random.default_rng(0).permutation(len(x))
    assert next_to_label(x[perm], [ids[i] for i in perm], labelled[::-1], seed=7) == answers.pop()
    # and the answer is never labelled, also when most images are
    rest = [ids[i] for i in range(len(x)) if i % 9]
    assert next_to_label(x, ids, rest, seed=0) not in set(rest)


def test_everything_labelled_and_bad_input() -> None:
    x, _, ids, _ = _setup()
    assert next_to_label(x[:4], ids[:4], [*ids[:4], "gone"]) is None  # images gone from the datastore: ignored
    assert next_to_label(x[:1], ids[:1], []) == ids[0]
    with pytest.raises(ValueError, match="distinct"):
        next_to_label(x[:2], ["a", "a"])
    with pytest.raises(ValueError, match="3 ids"):
        next_to_label(x[:2], ["a", "b", "c"])
