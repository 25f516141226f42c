"""Datasets of positive pairs for contrastive pretraining over a grouped manifest.

MICLe (Azizi et al. 2021): an item is one group (patient or lesion). With 2+ images, two *different*
images are drawn uniformly at random, afresh every time the item is read (so every epoch sees new pairs);
with one image, that image is used twice. Either way the transform then makes two independent
augmentations. SimCLR on the same data iterates images instead, one image per item, used twice.
Every item carries its group id so the loss can tell when two items of a batch share a patient.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, Literal

import numpy as np
from monai.data.utils import set_rnd
from monai.transforms import Randomizable, apply_transform
from monai.utils import MAX_SEED
from torch.utils.data import Dataset

from .grouping import MultiInstanceIndex

__all__ = ["ContrastivePairDataset"]


class ContrastivePairDataset(Randomizable, Dataset):
    """Positive pairs from a :class:`MultiInstanceIndex`.

    Each item is a dict ``{"image_1": row, "image_2": row, "group_id": str, "group_index": int,
    "distinct": bool}`` (rows are manifest row dicts, ready for ``LoadManifestImaged``), passed through
    ``transform`` (typically ``LoadManifestImaged`` + ``ContrastiveViewsd(keys=("image_1", "image_2"))``).

    Args:
        index: the grouped manifest.
        transform: applied to every item; ``None`` returns the raw item.
        pairing: ``"micle"`` (items are groups, two different images when a group has them) or
            ``"simclr"`` (items are images, the same image twice).
        groups: ``"all"`` mixes single-image groups in (paired with themselves); ``"multi"`` keeps only
            groups with 2+ images. Applies to both pairings.
        seed: seed of the pair draws (``set_random_state`` and MONAI's per-worker seeding override it).
    """

    def __init__(
        self,
        index: MultiInstanceIndex,
        transform: Callable[[dict], Any] | None = None,
        pairing: Literal["micle", "simclr"] = "micle",
        groups: Literal["all", "multi"] = "all",
        seed: int = 0,
    ) -> None:
        if pairing not in ("micle", "simclr"):
            raise ValueError(f"pairing must be 'micle' or 'simclr', got {pairing!r}")
        if groups not in ("all", "multi"):
            raise ValueError(f"groups must be 'all' or 'multi', got {groups!r}")
        self.index = index
        self.transform = transform
        self.pairing = pairing
        self.group_ids = index.multi_image_groups() if groups == "multi" else index.group_ids
        if not self.group_ids:
            raise ValueError(f"no {'multi-image ' if groups == 'multi' else ''}groups in the manifest")
        self._group_code = {g: i for i, g in enumerate(index.group_ids)}
        self._records = index.manifest.to_dict("records")
        # simclr: one item per image of the kept groups, in index order
        self._images = [(g, r) for g in self.group_ids for r in index.rows(g)] if pairing == "simclr" else []
        self.set_random_state(seed=seed)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None
                         ) -> ContrastivePairDataset:
        """Seed the pair draws *and* the transform.

        MONAI's ``worker_init_fn`` stops at the first object with ``set_random_state``; without passing the
        seed on, every DataLoader worker would augment with the same random stream.
        """
        super().set_random_state(seed, state)
        if self.transform is not None:
            set_rnd(self.transform, seed=int(self.R.randint(MAX_SEED)))
        return self

    def __len__(self) -> int:
        return len(self._images) if self.pairing == "simclr" else len(self.group_ids)

    def randomize(self, n_images: int) -> tuple[int, int]:
        """Two different positions out of ``n_images`` (uniform over ordered pairs), or (0, 0) for one."""
        if n_images < 2:
            return 0, 0
        a, b = self.R.choice(n_images, size=2, replace=False)
        return int(a), int(b)

    def pair(self, i: int) -> dict[Hashable, Any]:
        """The untransformed item ``i``."""
        if self.pairing == "simclr":
            group, row = self._images[i]
            r1 = r2 = row
        else:
            group = self.group_ids[i]
            rows = self.index.rows(group)
            a, b = self.randomize(len(rows))
            r1, r2 = rows[a], rows[b]
        return {
            "image_1": dict(self._records[r1]),
            "image_2": dict(self._records[r2]),
            "group_id": str(group),
            "group_index": self._group_code[group],
            "distinct": r1 != r2,
        }

    def __getitem__(self, i: int) -> Mapping[Hashable, Any]:
        item = self.pair(int(i))
        return apply_transform(self.transform, item) if self.transform is not None else item

    def pair_counts(self) -> dict[str, int]:
        """How many items give two different images vs one image twice (for logs)."""
        if self.pairing == "simclr":
            return {"distinct": 0, "same_image": len(self)}
        multi = sum(1 for g in self.group_ids if self.index.size(g) >= 2)
        return {"distinct": multi, "same_image": len(self.group_ids) - multi}


