"""Group manifest rows into multi-instance sets (patient, study or series).

MICLe's positives are two *different* images of one patient or lesion; this index is where "same patient"
is decided, always from tag-derived ids, never from folder names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pandas as pd

from .manifest import read_manifest

__all__ = ["LEVELS", "MultiInstanceIndex"]

#: Grouping level -> manifest column.
LEVELS = {"patient": "patient_id", "study": "study_uid", "series": "series_uid"}


class MultiInstanceIndex:
    """Images of a manifest grouped at one level.

    Args:
        manifest: a manifest DataFrame or the path of a manifest CSV.
        level: ``"patient"`` (default), ``"study"`` or ``"series"``.
    """

    def __init__(self, manifest: pd.DataFrame | str | os.PathLike, level: str = "patient") -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown grouping level {level!r}: use one of {sorted(LEVELS)}")
        df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
        self.level = level
        self.key = LEVELS[level]
        if df[self.key].isna().any():
            raise ValueError(f"{df[self.key].isna().sum()} manifest row(s) have no {self.key}: cannot group them")
        self.manifest = df.reset_index(drop=True)
        # Row positions per group, in first-appearance order (stable across runs for the same manifest).
        self._groups: dict[str, list[int]] = {
            str(k): list(v) for k, v in self.manifest.groupby(self.key, sort=False).indices.items()
        }

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, group_id: object) -> bool:
        return group_id in self._groups

    @property
    def group_ids(self) -> list[str]:
        return list(self._groups)

    def size(self, group_id: str) -> int:
        return len(self._groups[group_id])

    def sizes(self) -> pd.Series:
        """Images per group."""
        return pd.Series({g: len(v) for g, v in self._groups.items()}, name="images", dtype=int)

    def multi_image_groups(self, min_images: int = 2) -> list[str]:
        """Groups with at least ``min_images`` images (MICLe's multi-instance positives)."""
        return [g for g, rows in self._groups.items() if len(rows) >= min_images]

    def rows(self, group_id: str) -> list[int]:
        """Row positions (into ``manifest``) of a group's images."""
        return self._groups[group_id]

    def images(self, group_id: str) -> pd.DataFrame:
        """The manifest rows of one group."""
        return self.manifest.iloc[self._groups[group_id]]

    def iter_images(self, group_id: str) -> Iterator[dict]:
        """Iterate a group's images as row dicts (ready for ``LoadManifestImaged``)."""
        for i in self._groups[group_id]:
            yield self.manifest.iloc[i].to_dict()

    def group_labels(self, label_col: str = "label") -> pd.Series:
        """One label per group: its most frequent image label (ties broken by sort order)."""
        lab = self.manifest[[self.key, label_col]].dropna()
        if lab.empty:
            return pd.Series(dtype="string")
        counts = lab.groupby([self.key, label_col]).size().reset_index(name="n")
        counts = counts.sort_values([self.key, "n", label_col], ascending=[True, False, True])
        return counts.drop_duplicates(self.key).set_index(self.key)[label_col]

    def subset(self, mask: pd.Series) -> MultiInstanceIndex:
        """A new index over the rows where ``mask`` is true (e.g. one split)."""
        return MultiInstanceIndex(self.manifest[mask.to_numpy()], level=self.level)

    def summary(self) -> dict[str, int]:
        s = self.sizes()
        return {"groups": len(s), "images": int(s.sum()), "multi_image_groups": int((s >= 2).sum()),
                "max_images_per_group": int(s.max()) if len(s) else 0}
