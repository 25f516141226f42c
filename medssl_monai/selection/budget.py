"""Labelling budgets: a count (``--budget N``) or a fraction (``--fraction p``) of the groups at a level.

A fraction is rounded to the nearest count and never below one group, as the label fractions of
:func:`~medssl_monai.data.splits.nested_label_fractions` are, so "5%" means the same number of groups
wherever it is asked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["budget_count", "budget_counts"]


def budget_count(n_groups: int, budget: int | None = None, fraction: float | None = None) -> int:
    """The number of groups to select out of ``n_groups``: exactly one of ``budget`` / ``fraction``."""
    if (budget is None) == (fraction is None):
        raise ValueError("give exactly one of budget (a number of groups) or fraction (of the groups)")
    if n_groups < 1:
        raise ValueError("nothing to select from: the pool has no groups")
    if budget is not None:
        if isinstance(budget, bool) or int(budget) != budget or budget < 1:
            raise ValueError(f"budget must be a whole number >= 1, got {budget!r}")
        if budget > n_groups:
            raise ValueError(f"budget {int(budget)} exceeds the {n_groups} groups in the pool")
        return int(budget)
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return min(n_groups, max(1, math.floor(float(fraction) * n_groups + 0.5)))


def budget_counts(n_groups: int, budgets: Sequence[int] = (), fractions: Sequence[float] = ()) -> list[int]:
    """Counts for several budgets (nested selections: the smaller sets are prefixes of the largest)."""
    if bool(budgets) == bool(fractions):
        raise ValueError("give budgets (numbers of groups) or fractions, not both and not neither")
    return ([budget_count(n_groups, budget=b) for b in budgets] if budgets
            else [budget_count(n_groups, fraction=f) for f in fractions])
