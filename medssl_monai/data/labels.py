"""Manifest label strings -> class index or multi-hot vector, with the class order saved beside the model.

A checkpoint without its class order cannot be interpreted, so :class:`LabelEncoder` has a ``state_dict``;
:class:`EncodeLabeld` applies it inside a MONAI transform chain (the fine-tune bundle's ``train#dataset``
holds the raw label strings, as MONAI Label's datastore does).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .manifest import read_table_csv
from .pseudonymize import Pseudonymizer

__all__ = ["LABEL_KEYS", "EncodeLabeld", "LabelEncoder", "apply_labels", "check_label_key", "label_mapping", "read_labels"]


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


#: what a label may be joined on: the patient, the study (its UID or its AccessionNumber), the series,
#: the instance; original (un-pseudonymised) values in the labels table
LABEL_KEYS = ("patient_id", "study_uid", "accession_number", "series_uid", "sop_uid")
_SHOWN_CONFLICTS = 3


def read_labels(path: str | os.PathLike, key: str = "patient_id", column: str = "label") -> pd.DataFrame:
    """A label table keyed by an original identifier; ``NA``/``None`` keys and labels stay strings."""
    check_label_key(key)
    return read_table_csv(path, [key, column], required=[key, column], what="labels table")


def check_label_key(key: str) -> str:
    if key not in LABEL_KEYS:
        raise ValueError(f"label key must be one of {'/'.join(LABEL_KEYS)}, got {key!r}")
    return key


def _key_hash(key: str, pseudonymizer: Pseudonymizer):
    return {"patient_id": pseudonymizer.patient, "accession_number": pseudonymizer.accession}.get(key, pseudonymizer.uid)


def label_mapping(labels: pd.DataFrame, key: str, column: str, pseudonymizer: Pseudonymizer | None = None,
                  source: str = "labels table") -> dict[str, str]:
    """``{key value: label}`` (keys hashed as the manifest's are when ``pseudonymizer`` is given).

    A key given twice with the same label is one label; a key given different labels is refused, naming
    how many keys conflict and the first few (as pseudonyms in a pseudonymised run): silently keeping the
    last row would train on a label nobody chose.
    """
    check_label_key(key)
    if key not in labels.columns or column not in labels.columns:
        raise ValueError(f"{source} needs columns {key!r} and {column!r}; it has {list(labels.columns)}")
    known = labels[key].notna() & labels[column].notna()
    keys = labels.loc[known, key].astype(str).str.strip()
    if pseudonymizer is not None:
        keys = keys.map(_key_hash(key, pseudonymizer))
    values = labels.loc[known, column].astype(str).str.strip()
    table = pd.DataFrame({"key": keys.to_numpy(), "label": values.to_numpy()}).drop_duplicates()
    table = table[table["key"] != ""]
    counts = table.groupby("key")["label"].nunique()
    conflicting = sorted(counts[counts > 1].index)
    if conflicting:
        shown = ", ".join(conflicting[:_SHOWN_CONFLICTS]) + (", ..." if len(conflicting) > _SHOWN_CONFLICTS else "")
        raise ValueError(f"{source}: {len(conflicting)} {key} value(s) have conflicting labels in column "
                         f"{column!r} ({shown}): give each {key} one label, or join on a finer --label-key")
    return dict(zip(table["key"], table["label"]))


def apply_labels(manifest: pd.DataFrame, labels: pd.DataFrame, key: str, column: str,
                 pseudonymizer: Pseudonymizer | None = None) -> pd.DataFrame:
    """Join labels keyed by an original identifier; with pseudonymisation the keys are hashed the same way."""
    mapping = label_mapping(labels, key, column, pseudonymizer)
    manifest = manifest.copy()
    if key not in manifest.columns:
        raise ValueError(f"the manifest has no {key!r} column to join labels on")
    manifest["label"] = manifest[key].astype("string").str.strip().map(mapping).astype("string")
    return manifest
