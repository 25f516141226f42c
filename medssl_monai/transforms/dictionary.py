"""Dictionary versions of the view transforms (MONAI's ``...d`` transforms), and the positive pair.

Each ``...d`` transform draws once per call and applies the array transform of :mod:`.array` to every
key with ``randomize=False``, so an image and its mask (or the keys of one item) get the same crop box,
factors and sigma. :class:`ContrastiveViewsd` makes a contrastive pair from one image (SimCLR) or two images
of a group (MICLe) with two independent draws of a dictionary pipeline (usually a preset).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data.meta_obj import get_track_meta
from monai.transforms import Compose, MapTransform, Randomizable, RandomizableTransform
from monai.utils import MAX_SEED, convert_to_tensor

from ..utils.deprecation import renamed_arg
from .array import (
    EnsureFloatImage,
    RandColorJitter,
    RandGaussianBlur,
    RandGrayscale,
    RandomResizedCrop,
)
from .presets import get_preset

__all__ = [
    "ContrastiveViewsd",
    "EnsureFloatImaged",
    "RandColorJitterd",
    "RandGaussianBlurd",
    "RandGrayscaled",
    "RandomResizedCropd",
]


class EnsureFloatImaged(MapTransform):
    """Dictionary version of :class:`EnsureFloatImage` (``num_channels``: the former name of ``in_channels``)."""

    backend = EnsureFloatImage.backend

    @renamed_arg("num_channels", "in_channels")
    def __init__(
        self,
        keys: KeysCollection,
        in_channels: int | None = None,
        channel_dim: int | str = "auto",
        scale: str = "auto",
        drop_alpha: bool = True,
        allow_missing_keys: bool = False,
        num_channels: int | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureFloatImage(in_channels, channel_dim, scale, drop_alpha)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class RandomResizedCropd(Randomizable, MapTransform):
    """Dictionary version of :class:`RandomResizedCrop`; all keys get the same box (sized on the first)."""

    backend = RandomResizedCrop.backend

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int] | int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        mode: str = "bilinear",
        antialias: bool = True,
        max_attempts: int = 10,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.cropper = RandomResizedCrop(spatial_size, scale, ratio, mode, antialias, max_attempts)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> Randomizable:
        super().set_random_state(seed, state)
        self.cropper.set_random_state(state=self.R)  # one stream: the dict and array versions agree
        return self

    def randomize(self, data: Sequence[int]) -> None:
        self.cropper.R = self.R
        self.cropper.randomize(data)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        self.randomize(d[keys[0]].shape[1:])
        for key in keys:
            d[key] = self.cropper(d[key], randomize=False)
        return d


class _SharedDrawd(RandomizableTransform, MapTransform):
    """Dictionary wrapper of an array transform with ``prob=1``: one draw (whether, and how) for all keys.

    Subclasses set ``self.inner`` (the array transform, whose ``__call__`` takes ``randomize=False``).
    """

    inner: RandomizableTransform

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> Randomizable:
        super().set_random_state(seed, state)
        self.inner.set_random_state(state=self.R)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            self.inner.R = self.R
            self.inner.randomize(None)
        for key in self.key_iterator(d):
            if self._do_transform:
                d[key] = self.inner(d[key], randomize=False)
            else:
                d[key] = convert_to_tensor(d[key], track_meta=get_track_meta())
        return d


class RandColorJitterd(_SharedDrawd):
    """Dictionary version of :class:`RandColorJitter`; all keys get the same factors."""

    backend = RandColorJitter.backend

    def __init__(
        self,
        keys: KeysCollection,
        brightness: float | Sequence[float] = 0.8,
        contrast: float | Sequence[float] = 0.8,
        saturation: float | Sequence[float] = 0.8,
        hue: float | Sequence[float] = 0.2,
        prob: float = 0.8,
        random_order: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.inner = RandColorJitter(brightness, contrast, saturation, hue, prob=1.0, random_order=random_order)


class RandGrayscaled(_SharedDrawd):
    """Dictionary version of :class:`RandGrayscale`; one draw for all keys."""

    backend = RandGrayscale.backend

    def __init__(self, keys: KeysCollection, prob: float = 0.2, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.inner = RandGrayscale(prob=1.0)


class RandGaussianBlurd(_SharedDrawd):
    """Dictionary version of :class:`RandGaussianBlur`; all keys share the sigma."""

    backend = RandGaussianBlur.backend

    def __init__(
        self,
        keys: KeysCollection,
        sigma: Sequence[float] | float = (0.1, 2.0),
        prob: float = 0.5,
        kernel_fraction: float = 0.1,
        kernel_size: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.inner = RandGaussianBlur(sigma, prob=1.0, kernel_fraction=kernel_fraction, kernel_size=kernel_size)


# --------------------------------------------------------------------------------------------------
# pairs of views
# --------------------------------------------------------------------------------------------------
class ContrastiveViewsd(Randomizable, MapTransform):
    """Make the positive pair for contrastive learning: ``view_keys[0]`` and ``view_keys[1]``.

    * SimCLR: ``source_keys=("image",)``: both views come from the same image through two independent
      draws of the augmentation pipeline.
    * MICLe: ``source_keys=("image_1", "image_2")``: two images of the same patient/lesion; view 1
      is an augmentation of ``image_1`` and view 2 of ``image_2``.

    The pipeline is a dictionary transform over ``pipeline_key`` (e.g. a preset from
    :func:`medssl_monai.transforms.get_preset`), or a preset name. ``set_random_state`` seeds the
    inner pipeline too, so a seeded dataset yields the same pairs; MONAI's DataLoader seeds it per
    worker the same way.

    Args:
        keys: source keys (1 for SimCLR, 2 for MICLe).
        transform: a dictionary transform/``Compose`` (or a list of them) over ``pipeline_key``, or a
            preset name.
        view_keys: output keys of the two views.
        pipeline_key: the key the pipeline reads and writes.
        spatial_size: view size, only used when ``transform`` is a preset name.
        preset_overrides: preset parameters (e.g. ``{"strength": 0.5}``), only with a preset name.
        keep_sources: keep the source images in the output (off by default: full-size sources of
            different sizes would not collate into a batch).
        allow_missing_keys: passed to ``MapTransform``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        transform: Callable | Sequence[Callable] | str = "natural",
        view_keys: Sequence[str] = ("view_1", "view_2"),
        pipeline_key: str = "image",
        spatial_size: Sequence[int] | int = (64, 64),
        preset_overrides: Mapping[str, Any] | None = None,
        keep_sources: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) not in (1, 2):
            raise ValueError(f"ContrastiveViewsd needs 1 (SimCLR) or 2 (MICLe) source keys, got {self.keys}.")
        if len(view_keys) != 2:
            raise ValueError(f"view_keys must name 2 outputs, got {view_keys}.")
        if isinstance(transform, (list, tuple)):
            transform = Compose(list(transform))
        if isinstance(transform, str):
            overrides = dict(preset_overrides or {})
            transform = get_preset(transform, keys=(pipeline_key,), spatial_size=spatial_size, **overrides)
        elif preset_overrides:
            raise ValueError("preset_overrides only apply when transform is a preset name.")
        if not callable(transform):
            raise TypeError(f"transform must be callable or a preset name, got {type(transform).__name__}.")
        self.transform = transform
        self.view_keys = tuple(view_keys)
        self.pipeline_key = pipeline_key
        self.keep_sources = keep_sources

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> Randomizable:
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:
        """The randomness lives in the inner pipeline; each view is a fresh draw of it."""

    @property
    def source_keys(self) -> tuple[Hashable, ...]:
        return tuple(self.keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        sources = list(self.key_iterator(d))
        if not sources:
            return d
        if len(self.keys) == 2 and len(sources) != 2:
            raise KeyError(f"MICLe mode needs both {self.keys} in the data, found {sources}.")
        src_keys = sources * 2 if len(sources) == 1 else sources
        for view_key, src_key in zip(self.view_keys, src_keys):
            d[view_key] = self.transform({self.pipeline_key: d[src_key]})[self.pipeline_key]
        if not self.keep_sources:
            for key in sources:
                if key not in self.view_keys:
                    del d[key]
        return d
