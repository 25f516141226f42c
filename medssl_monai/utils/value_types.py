"""The type and range of one config value, checked with a one-line reason (:class:`ValueType`).

Used by the bundle override table (:data:`medssl_monai.bundle.overrides.OVERRIDE_TYPES`) and the experiment
drivers' config schemas; it lives here, with no torch or MONAI import, so a config is checked in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ValueType"]


@dataclass(frozen=True)
class ValueType:
    """What one config or override value may be: its kind and range. ``check`` says why a value is not.

    A plain dataclass rather than pydantic: the messages must be one line naming the key path (pydantic's are
    multi-line and its coercion would turn ``"1"`` into ``1``, the very thing refused here), the configs are
    nested dicts MONAI reads as they are, and it adds no dependency to the bundles.

    ``kind``: ``number`` (finite int or float, not bool), ``int`` (a whole number, not bool), ``bool``,
    ``size`` (an int or a list of 1-3 ints, each checked against ``low``), ``str``, ``choice`` (one of
    ``choices``), ``list`` (each item an ``item``), ``mapping`` (each value an ``item``) or ``path_or_bool``.
    ``low``/``high``: bounds; ``open_low``/``open_high`` make them strict. ``null``: ``None`` is allowed.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    null: bool = False
    choices: tuple[Any, ...] = ()
    item: ValueType | None = None

    def check(self, value: Any) -> str | None:
        """Why ``value`` is not of this type, or ``None`` when it is."""
        if value is None:
            return None if self.null else f"expected {self._what()}, got null"
        kind = self.kind
        if kind == "choice":
            return None if value in self.choices and type(value) in {type(c) for c in self.choices} else \
                f"expected one of {list(self.choices)}, got {value!r}"
        if kind == "bool" or (kind == "path_or_bool" and not isinstance(value, str)):
            return None if isinstance(value, bool) else f"expected {self._what()}, got {value!r}"
        if kind == "path_or_bool":
            if value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "0", "1", ""):
                return f"expected true, false or a file path, got the string {value!r} (write true or false unquoted)"
            return None
        if kind == "str":
            return None if isinstance(value, str) and value else f"expected a non-empty string, got {value!r}"
        if kind in ("list", "mapping"):
            container = (list, tuple) if kind == "list" else Mapping
            if not isinstance(value, container):
                return f"expected {self._what()}, got {value!r}"
            items = enumerate(value) if kind == "list" else value.items()
            for k, v in items:
                why = self.item.check(v) if self.item else None
                if why:
                    sep = "" if why[:1] in "[." else ": "
                    return f"[{k}]{sep}{why}" if kind == "list" else f".{k}{sep}{why}"
            return None
        if kind == "size":
            sides = list(value) if isinstance(value, (list, tuple)) else [value]
            if not 1 <= len(sides) <= 3:
                return f"expected a size (a whole number or a list of 1 to 3), got {value!r}"
            for side in sides:
                why = ValueType("int", self.low, self.high, self.open_low, self.open_high).check(side)
                if why:
                    return why if not isinstance(value, (list, tuple)) else f"{why} (in {value!r})"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected {self._what()}, got {value!r}"
        if kind == "int" and not float(value).is_integer():
            return f"expected a whole number, got {value!r}"
        if not math.isfinite(value):
            return f"expected a finite number, got {value!r}"
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return f"must be {'>' if self.open_low else '>='} {self.low:g}, got {value!r}"
        if self.high is not None and (value >= self.high if self.open_high else value > self.high):
            return f"must be {'<' if self.open_high else '<='} {self.high:g}, got {value!r}"
        return None

    def _what(self) -> str:
        return {"number": "a number", "int": "a whole number", "size": "a size (a whole number or a list of them)",
                "list": "a list", "mapping": "a mapping", "str": "a string", "bool": "true or false",
                "path_or_bool": "true, false or a file path"}.get(self.kind, self.kind)
