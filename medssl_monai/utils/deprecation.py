"""Former names kept for one release: a renamed keyword (MONAI's ``deprecated_arg``) or a renamed value.

One place for the release numbers, so every former name says the same thing and goes at the same time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["DEPRECATED_SINCE", "FORMER_VALUES", "REMOVED_IN", "current_value", "renamed_arg"]

#: the release in which the former names were replaced (this package's version), and the one that drops them
DEPRECATED_SINCE = "0.1.0"
REMOVED_IN = "0.2.0"
#: setting -> {former value: current value}; ``views_on: cpu`` became ``host``, the word ``cache`` uses
FORMER_VALUES: dict[str, dict[Any, Any]] = {"views_on": {"cpu": "host"}}

T = TypeVar("T", bound=Callable[..., Any])


def renamed_arg(name: str, new_name: str) -> Callable[[T], T]:
    """MONAI's ``deprecated_arg`` for keyword ``name``, now ``new_name``: the value moves to ``new_name``
    with a ``FutureWarning``. The decorated callable keeps ``name`` in its signature (or takes ``**kwargs``)."""
    from monai.utils import deprecated_arg  # here: value_types' users import utils without MONAI

    return deprecated_arg(name, since=DEPRECATED_SINCE, removed=REMOVED_IN, version_val=DEPRECATED_SINCE,
                          new_name=new_name, msg_suffix=f"Please use `{new_name}` instead.")


def current_value(key: str, value: Any) -> Any:
    """``value`` of setting ``key`` under its current name: a former one (:data:`FORMER_VALUES`) is
    translated with a ``FutureWarning`` (the category ``deprecated_arg`` uses), anything else returned as is."""
    renamed = FORMER_VALUES.get(key, {})
    if isinstance(value, str) and value in renamed:
        new = renamed[value]
        warnings.warn(f"{key}: {value!r} is the former name of {new!r} (accepted until {REMOVED_IN}); "
                      f"use {key}: {new!r}", FutureWarning, stacklevel=3)
        return new
    return value
