"""Manifest label strings -> class index or multi-hot vector, with the class order saved beside the model.

A checkpoint without its class order cannot be interpreted, so :class:`LabelEncoder` has a ``state_dict``;
:class:`EncodeLabeld` applies it inside a MONAI transform chain (the fine-tune bundle's ``train#dataset``
holds the raw label strings, as MONAI Label's datastore does).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["EncodeLabeld", "LabelEncoder"]


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # array-likes
        return False


class LabelEncoder:
    """Label strings -> class index (multi-class) or multi-hot float vector (multi-label, ``sep``-joined).

    ``fit`` sorts the classes (as strings), so the order depends only on the set of labels, not on row
    order; pass ``classes`` to impose an order (e.g. a pretrained head's). Keep :meth:`state_dict` with
    the checkpoint.

    An empty multi-label string (after stripping) encodes to all zeros, i.e. "none of the labels".
    """

    def __init__(
        self, classes: Sequence[str] | None = None, multi_label: bool = False, sep: str = "|"
    ) -> None:
        self.multi_label = multi_label
        self.sep = sep
        self._classes: list[str] | None = None
        self._index: dict[str, int] = {}
        if classes is not None:
            self._set_classes([str(c) for c in classes])

    def _set_classes(self, classes: list[str]) -> None:
        dupes = sorted({c for c in classes if classes.count(c) > 1})
        if dupes:
            raise ValueError(f"duplicate class names: {dupes}")
        if not classes:
            raise ValueError("a LabelEncoder needs at least one class.")
        self._classes = classes
        self._index = {c: i for i, c in enumerate(classes)}

    def _tokens(self, label: Any) -> list[str]:
        if _is_missing(label):
            raise ValueError("missing label (NaN/None): drop unlabelled rows first (see select_labelled).")
        text = str(label).strip()
        if not self.multi_label:
            return [text]
        return [t.strip() for t in text.split(self.sep) if t.strip()]

    def fit(self, labels: Iterable[Any]) -> LabelEncoder:
        """Learn the (sorted) classes; with fixed ``classes``, check that every label is one of them."""
        seen: set[str] = set()
        for label in labels:
            if not _is_missing(label):
                seen.update(self._tokens(label))
        if self._classes is None:
            self._set_classes(sorted(seen))
        else:
            unknown = sorted(seen - set(self._classes))
            if unknown:
                raise ValueError(f"labels {unknown} are not among the classes {self._classes}.")
        return self

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            raise RuntimeError("LabelEncoder is not fitted: call fit(labels) or pass classes=.")
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_classes

    def encode(self, label: Any) -> int | torch.Tensor:
        """Class index (multi-class) or ``(C,)`` float32 multi-hot vector (multi-label)."""
        classes = self.classes
        tokens = self._tokens(label)
        unknown = [t for t in tokens if t not in self._index]
        if unknown:
            raise ValueError(f"unknown label {unknown[0]!r} (in {label!r}); known classes: {classes}.")
        if not self.multi_label:
            return self._index[tokens[0]]
        out = torch.zeros(len(classes), dtype=torch.float32)
        for t in tokens:
            out[self._index[t]] = 1.0
        return out

    __call__ = encode

    def encode_many(self, labels: Iterable[Any]) -> torch.Tensor:
        """``(N,)`` int64 indices or ``(N, C)`` float32 multi-hot rows, e.g. for :func:`class_weights`."""
        encoded = [self.encode(label) for label in labels]
        if self.multi_label:
            return torch.stack(encoded) if encoded else torch.zeros(0, self.num_classes)
        return torch.as_tensor(encoded, dtype=torch.long)

    def decode(self, value: int | torch.Tensor | Sequence[float]) -> str | list[str]:
        """Index -> class name; multi-hot (values > 0.5) -> list of class names."""
        classes = self.classes
        if not self.multi_label:
            return classes[int(value)]  # type: ignore[arg-type]
        v = torch.as_tensor(value).reshape(-1)
        return [classes[i] for i in torch.nonzero(v > 0.5).reshape(-1).tolist()]

    def state_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "multi_label": self.multi_label, "sep": self.sep}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> LabelEncoder:
        return cls(list(state["classes"]), multi_label=bool(state.get("multi_label", False)),
                   sep=str(state.get("sep", "|")))

    def __repr__(self) -> str:
        classes = self._classes if self._classes is not None else "<unfitted>"
        return f"LabelEncoder(classes={classes}, multi_label={self.multi_label})"


class EncodeLabeld(MapTransform):
    """Dictionary transform applying a fitted :class:`LabelEncoder` to ``d[key]`` (e.g. a manifest row).

    ``pass_encoded``: a value that is not a string (a class index, a multi-hot vector) is taken as already
    encoded and passed through, so one transform chain serves raw manifest labels and pre-encoded items.
    """

    def __init__(self, keys: KeysCollection, encoder: LabelEncoder, allow_missing_keys: bool = False,
                 pass_encoded: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.encoder = encoder
        self.pass_encoded = pass_encoded

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], str) or not self.pass_encoded:
                d[key] = self.encoder.encode(d[key])
        return d
