"""The baseline every fine-tuning recipe uses: groups in a seeded random order."""

from __future__ import annotations

import numpy as np

__all__ = ["random_order"]


def random_order(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """The first ``n`` positions of one seeded permutation of the rows of ``x`` (a longer budget with the
    same seed extends it: nested by construction)."""
    total = len(x)
    if not 0 <= n <= total:
        raise ValueError(f"cannot select {n} of {total} items")
    return np.random.default_rng(seed).permutation(total)[:n]
