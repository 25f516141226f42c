"""View-generation transforms for contrastive self-supervised learning (SimCLR, MICLe).

MONAI ships most geometric augmentations (flips, rotations, elastic) but not the pieces of the SimCLR
recipe that come from natural-image pipelines: torchvision-style random resized crop, colour jitter with
saturation/hue, random grayscale and an isotropic Gaussian blur whose kernel scales with the image. They
are written here in MONAI's style (array + dictionary versions, ``Randomizable`` with ``self.R`` so
``set_random_state`` makes pipelines reproducible, channel-first ``MetaTensor`` in and out) and
vectorised in torch: a view pipeline has to outpace a training step on a 2-core CPU.

All transforms expect channel-first float images in [0, 1] with 2 spatial dims, ``(C, H, W)``;
:class:`EnsureFloatImage` brings any loaded image there first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.data.utils import to_affine_nd
from monai.transforms import (
    Compose,
    MapTransform,
    Randomizable,
    RandomizableTransform,
    SpatialCrop,
    Transform,
)
from monai.transforms.utils import scale_affine
from monai.utils import MAX_SEED, TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple

__all__ = [
    "LUMA_WEIGHTS",
    "ContrastiveViewsd",
    "EnsureFloatImage",
    "EnsureFloatImaged",
    "RandColorJitter",
    "RandColorJitterd",
    "RandGaussianBlur",
    "RandGaussianBlurd",
    "RandGrayscale",
    "RandGrayscaled",
    "RandomResizedCrop",
    "RandomResizedCropd",
    "hsv_to_rgb",
    "rgb_to_grayscale",
    "rgb_to_hsv",
]

#: ITU-R BT.601 luma weights (what PIL's ``convert("L")`` and torchvision's ``rgb_to_grayscale`` use).
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------------
# functional helpers (plain tensors, channel-first, vectorised over pixels)
# --------------------------------------------------------------------------------------------------
def _as_plain_float(img: torch.Tensor) -> torch.Tensor:
    """Strip MetaTensor: its ``__torch_function__`` costs more than the maths on a 64x64 image."""
    t = img.as_tensor() if isinstance(img, MetaTensor) else img
    return t if t.is_floating_point() else t.float()


def rgb_to_grayscale(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of a ``(..., 3, H, W)`` tensor, keeping a channel dim of size 1."""
    r, g, b = img.unbind(dim=-3)
    return (LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b).unsqueeze(-3)


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV for ``(..., 3, H, W)`` in [0, 1]; same conventions as :func:`colorsys.rgb_to_hsv`."""
    r, g, b = img.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    gray = delta == 0
    # The ``where`` guards keep the division finite; gray pixels get h = s = 0 like colorsys.
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    delta_safe = torch.where(gray, torch.ones_like(delta), delta)
    rc = (maxc - r) / delta_safe
    gc = (maxc - g) / delta_safe
    bc = (maxc - b) / delta_safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0, 1.0)
    h = torch.where(gray, torch.zeros_like(h), h)
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(img: torch.Tensor) -> torch.Tensor:
    """HSV -> RGB for ``(..., 3, H, W)``; inverse of :func:`rgb_to_hsv`.

    Closed form ``c_n = v - v * s * clip(min(k, 4 - k), 0, 1)``, ``k = (n + 6h) mod 6`` with n = 5, 3, 1
    for R, G, B: the same values as colorsys' six-sector table in a handful of whole-image ops.
    """
    h, s, v = img.unbind(dim=-3)
    # (5, 3, 1) made on the image's device: a tensor from host values would be a blocking copy to a GPU
    offsets = (5.0 - 2.0 * torch.arange(3, dtype=img.dtype, device=img.device)).view(3, 1, 1)
    k = torch.remainder(offsets + (h * 6.0).unsqueeze(-3), 6.0)
    f = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    v = v.unsqueeze(-3)
    return v - (v * s.unsqueeze(-3)) * f


def _blend(img: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    """torchvision's ``_blend``: ``factor * img + (1 - factor) * other`` clipped to [0, 1]."""
    return (factor * img + (1.0 - factor) * other).clamp_(0.0, 1.0)


def adjust_brightness(img: torch.Tensor, factor: float) -> torch.Tensor:
    return (img * factor).clamp_(0.0, 1.0)


def adjust_contrast(img: torch.Tensor, factor: float) -> torch.Tensor:
    # Blend with the mean luminance (a scalar), as torchvision/PIL do.
    mean = (rgb_to_grayscale(img) if img.shape[-3] == 3 else img).mean()
    return _blend(img, mean, factor)


def adjust_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    if img.shape[-3] == 1:  # a gray image has no saturation to change (torchvision/PIL behave the same)
        return img
    return _blend(img, rgb_to_grayscale(img), factor)


def adjust_hue(img: torch.Tensor, shift: float) -> torch.Tensor:
    if img.shape[-3] == 1:  # hue is undefined on gray pixels
        return img
    hsv = rgb_to_hsv(img)
    h, s, v = hsv.unbind(dim=-3)
    h = torch.remainder(h + shift, 1.0)
    return hsv_to_rgb(torch.stack((h, s, v), dim=-3)).clamp_(0.0, 1.0)


def _check_2d(img: torch.Tensor, name: str) -> None:
    if img.ndim != 3:
        raise ValueError(f"{name} expects a channel-first 2D image (C, H, W), got shape {tuple(img.shape)}.")


# --------------------------------------------------------------------------------------------------
# input normalisation
# --------------------------------------------------------------------------------------------------
class EnsureFloatImage(Transform):
    """Turn any loaded 2D image into a channel-first float ``MetaTensor`` in [0, 1].

    Loaders hand back uint8 photos, uint16/int16 radiographs, channel-last arrays, RGBA PNGs and
    grayscale JPEGs (Imagenette has 92); every augmentation below assumes ``(C, H, W)`` float in
    [0, 1] with the channel count the preset expects, so this runs first.

    Args:
        num_channels: 3 to repeat gray to RGB, 1 to convert RGB to ITU-R 601 luma, None to keep.
        channel_dim: where the channels are: an int, ``"no_channel"`` for (H, W) input, or
            ``"auto"`` (by shape: (H, W) has no channel, a 3D array whose last dim is 1/3/4 and first
            is not is channel-last, anything else channel-first).
        scale: ``"auto"`` divides unsigned integers by their dtype max, and integer-valued floats in
            [0, 255] (8-bit pixels loaded as float) by 255; it min-max rescales anything else outside
            [0, 1]; ``"minmax"`` always min-max rescales; ``"none"`` only casts.
        drop_alpha: drop a 4th (alpha) channel of RGBA images.
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        num_channels: int | None = None,
        channel_dim: int | str = "auto",
        scale: str = "auto",
        drop_alpha: bool = True,
    ) -> None:
        if num_channels not in (None, 1, 3):
            raise ValueError(f"num_channels must be None, 1 or 3, got {num_channels}.")
        if scale not in ("auto", "minmax", "none"):
            raise ValueError(f"scale must be 'auto', 'minmax' or 'none', got {scale!r}.")
        if isinstance(channel_dim, str) and channel_dim not in ("auto", "no_channel"):
            raise ValueError(f"channel_dim must be an int, 'auto' or 'no_channel', got {channel_dim!r}.")
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.scale = scale
        self.drop_alpha = drop_alpha

    def _channel_dim(self, img: Any) -> int | None:
        if self.channel_dim == "no_channel":
            return None
        if isinstance(self.channel_dim, int):
            return self.channel_dim
        # Shape only: MetaTensor's ``original_channel_dim`` is stale after ``EnsureChannelFirst``.
        if img.ndim == 2:
            return None
        if img.ndim == 3 and img.shape[0] not in (1, 3, 4) and img.shape[-1] in (1, 3, 4):
            return -1
        return 0

    def __call__(self, img: Any) -> torch.Tensor:
        if not isinstance(img, (np.ndarray, torch.Tensor)):
            img = np.asarray(img)  # PIL images, nested lists
        src_dtype = img.dtype
        if isinstance(img, np.ndarray) and not img.flags.writeable:
            img = np.array(img)  # e.g. np.asarray(PIL image); torch warns on read-only buffers
        img = convert_to_tensor(img, track_meta=get_track_meta())
        cd = self._channel_dim(img)
        t = img.as_tensor() if isinstance(img, MetaTensor) else img
        t = t.unsqueeze(0) if cd is None else torch.movedim(t, cd, 0)
        _check_2d(t, type(self).__name__)
        if self.drop_alpha and t.shape[0] == 4:
            t = t[:3]
        t = self._to_unit_range(t, src_dtype)
        if self.num_channels == 3 and t.shape[0] == 1:
            t = t.expand(3, -1, -1).contiguous()
        elif self.num_channels == 1 and t.shape[0] == 3:
            t = rgb_to_grayscale(t)
        elif self.num_channels is not None and t.shape[0] != self.num_channels:
            raise ValueError(f"cannot convert a {t.shape[0]}-channel image to {self.num_channels} channels.")
        if isinstance(img, MetaTensor):
            out, *_ = convert_to_dst_type(t, dst=img, dtype=t.dtype)  # copies meta: the source stays as is
            out.meta["original_channel_dim"] = 0
            return out
        return t

    def _to_unit_range(self, t: torch.Tensor, src_dtype: Any) -> torch.Tensor:
        is_unsigned = str(src_dtype).replace("torch.", "") in ("uint8", "uint16", "uint32", "uint64")
        if self.scale == "auto" and is_unsigned:
            bits = np.iinfo(str(src_dtype).replace("torch.", "")).max
            return t.float() / float(bits)
        t = t.float()
        if self.scale == "none":
            return t
        lo, hi = torch.aminmax(t)
        if self.scale == "auto" and lo >= 0 and hi <= 1:
            return t
        if self.scale == "auto" and lo >= 0 and hi <= 255 and torch.equal(t, t.round()):
            # 8-bit pixels cast to float (MONAI's LoadImage returns float32 by default): scale like uint8,
            # not min-max, which would stretch each photo's contrast and erase brightness differences
            return t / 255.0
        rng = hi - lo
        return (t - lo) / rng if rng > 0 else torch.zeros_like(t)


class EnsureFloatImaged(MapTransform):
    """Dictionary version of :class:`EnsureFloatImage`."""

    backend = EnsureFloatImage.backend

    def __init__(
        self,
        keys: KeysCollection,
        num_channels: int | None = None,
        channel_dim: int | str = "auto",
        scale: str = "auto",
        drop_alpha: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureFloatImage(num_channels, channel_dim, scale, drop_alpha)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


# --------------------------------------------------------------------------------------------------
# random resized crop
# --------------------------------------------------------------------------------------------------
class RandomResizedCrop(Randomizable, Transform):
    """torchvision-style random resized crop, the core of SimCLR's views.

    MONAI's ``RandSpatialCrop``/``RandScaleCrop`` sample side lengths independently, not an area
    fraction plus a log-uniform aspect ratio, so they give a different crop distribution. This samples
    the box with the algorithm of torchvision's ``RandomResizedCrop.get_params`` (``max_attempts`` draws, then a
    centre crop clamped to ``ratio``), crops with MONAI's :class:`~monai.transforms.SpatialCrop` and
    resizes with torch's antialiased bilinear interpolation. (MONAI's ``Resize(anti_aliasing=True)``
    pre-filters with a zero-padded Gaussian, which darkens the border by ~10-20 % and is ~20x slower.)

    The chosen box ``(top, left, height, width)`` is kept in :attr:`box` after each call.

    Args:
        spatial_size: output (H, W).
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        mode: interpolation mode for ``torch.nn.functional.interpolate``.
        antialias: low-pass when downsampling (only for bilinear/bicubic).
        max_attempts: draws before falling back to the centre crop.
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH]

    def __init__(
        self,
        spatial_size: Sequence[int] | int,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        mode: str = "bilinear",
        antialias: bool = True,
        max_attempts: int = 10,
    ) -> None:
        size = tuple(int(s) for s in ensure_tuple(spatial_size))
        self.spatial_size: tuple[int, int] = (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
        if len(size) > 2 or min(self.spatial_size) < 1:
            raise ValueError(f"spatial_size must be 1 or 2 positive ints, got {spatial_size}.")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        if not (0 < self.scale[0] <= self.scale[1]):
            raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}.")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}.")
        self.mode = mode
        self.antialias = antialias
        self.max_attempts = int(max_attempts)
        self.box: tuple[int, int, int, int] | None = None

    def randomize(self, data: Sequence[int]) -> None:
        """Sample a box for an image of spatial size ``data`` = (H, W)."""
        height, width = int(data[0]), int(data[1])
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(self.max_attempts):
            target_area = area * self.R.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(self.R.uniform(log_ratio[0], log_ratio[1]))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(self.R.randint(0, height - h + 1))
                left = int(self.R.randint(0, width - w + 1))
                self.box = (top, left, h, w)
                return
        self.box = centre_crop_box(height, width, self.ratio)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=get_track_meta())
        _check_2d(img, type(self).__name__)
        if randomize:
            self.randomize(img.shape[1:])
        if self.box is None:
            raise RuntimeError("call randomize() before __call__(randomize=False).")
        top, left, h, w = self.box
        crop = SpatialCrop(roi_start=(top, left), roi_end=(top + h, left + w))
        # SpatialCrop updates the affine; its trace would claim a plain (invertible) crop of a view that is
        # also resized, so nothing is pushed to ``applied_operations`` (as for the other views here).
        crop.tracing = False
        return self._resize(crop(img))

    def _resize(self, img: torch.Tensor) -> torch.Tensor:
        in_size = tuple(int(s) for s in img.shape[1:])
        t = _as_plain_float(img)
        if in_size != self.spatial_size:
            aa = self.antialias and self.mode in ("bilinear", "bicubic")
            align = False if self.mode in ("bilinear", "bicubic") else None
            t = F.interpolate(
                t.unsqueeze(0), size=self.spatial_size, mode=self.mode, align_corners=align, antialias=aa
            )[0]
            if self.mode == "bicubic":
                t = t.clamp_(0.0, 1.0)
        out, *_ = convert_to_dst_type(t, dst=img, dtype=t.dtype)
        if isinstance(out, MetaTensor) and in_size != self.spatial_size:
            affine = out.affine.to(torch.float64)
            scale = to_affine_nd(affine.shape[-1] - 1, scale_affine(in_size, self.spatial_size))
            out.affine = affine @ torch.as_tensor(scale, dtype=torch.float64)
        return out


def centre_crop_box(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's fallback when no random box fits: the largest centred crop with an allowed aspect ratio,
    as (top, left, h, w)."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w)


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


# --------------------------------------------------------------------------------------------------
# colour
# --------------------------------------------------------------------------------------------------
def _factor_range(value: float | Sequence[float], name: str, center: float, bound: tuple[float, float]):
    """torchvision's ``ColorJitter._check_input``: x -> [center - x, center + x] clipped to ``bound``."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}.")
        if value == 0:
            return None
        lo, hi = max(center - float(value), bound[0]), center + float(value)
    else:
        lo, hi = float(value[0]), float(value[1])
    if not (bound[0] <= lo <= hi <= bound[1]):
        raise ValueError(f"{name} range must lie in {bound}, got ({lo}, {hi}).")
    if lo == hi == center:
        return None
    return lo, hi


class RandColorJitter(RandomizableTransform):
    """Random brightness, contrast, saturation and hue in random order (torchvision's ``ColorJitter``).

    MONAI has brightness/contrast-like intensity transforms but nothing for saturation or hue, which
    SimCLR's colour distortion (the augmentation it found most important) needs. With strength ``s``,
    SimCLR uses ``brightness=contrast=saturation=0.8*s, hue=0.2*s, prob=0.8``.

    A number ``x`` means factors in ``[max(0, 1 - x), 1 + x]`` (hue: shifts in ``[-x, x]``, x <= 0.5);
    a pair is used as the range. 1-channel images get brightness and contrast only: saturation and
    hue are no-ops on gray pixels (as in torchvision/PIL). Other channel counts are rejected.

    Args:
        brightness, contrast, saturation, hue: jitter amounts (0 disables).
        prob: probability of applying the whole jitter (SimCLR's ``RandomApply(p=0.8)``).
        random_order: apply the four adjustments in a random order, as torchvision does.
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH]

    def __init__(
        self,
        brightness: float | Sequence[float] = 0.8,
        contrast: float | Sequence[float] = 0.8,
        saturation: float | Sequence[float] = 0.8,
        hue: float | Sequence[float] = 0.2,
        prob: float = 0.8,
        random_order: bool = True,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self.brightness = _factor_range(brightness, "brightness", 1.0, (0.0, float("inf")))
        self.contrast = _factor_range(contrast, "contrast", 1.0, (0.0, float("inf")))
        self.saturation = _factor_range(saturation, "saturation", 1.0, (0.0, float("inf")))
        self.hue = _factor_range(hue, "hue", 0.0, (-0.5, 0.5))
        self.random_order = random_order
        self.order: list[int] = [0, 1, 2, 3]
        self.factors: list[float | None] = [None, None, None, None]

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self.order = [int(i) for i in self.R.permutation(4)] if self.random_order else [0, 1, 2, 3]
        ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        self.factors = [None if r is None else float(self.R.uniform(r[0], r[1])) for r in ranges]

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=get_track_meta())
        _check_2d(img, type(self).__name__)
        if img.shape[0] not in (1, 3):
            raise ValueError(f"RandColorJitter needs 1 (gray) or 3 (RGB) channels, got {img.shape[0]}.")
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        t = _as_plain_float(img)
        ops: tuple[Callable[[torch.Tensor, float], torch.Tensor], ...] = (
            adjust_brightness,
            adjust_contrast,
            adjust_saturation,
            adjust_hue,
        )
        for i in self.order:
            factor = self.factors[i]
            if factor is not None:
                t = ops[i](t, factor)
        out, *_ = convert_to_dst_type(t, dst=img, dtype=t.dtype)
        return out


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


class RandGrayscale(RandomizableTransform):
    """Randomly replace RGB by its ITU-R 601 luma, repeated to 3 channels (SimCLR: p=0.2).

    Keeping 3 channels lets the same encoder see gray and colour views. 1-channel input is returned
    unchanged (already gray).
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH]

    def __init__(self, prob: float = 0.2) -> None:
        RandomizableTransform.__init__(self, prob)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=get_track_meta())
        _check_2d(img, type(self).__name__)
        if randomize:
            self.randomize(None)
        if not self._do_transform or img.shape[0] == 1:
            return img
        if img.shape[0] != 3:
            raise ValueError(f"RandGrayscale needs 1 or 3 channels, got {img.shape[0]}.")
        t = rgb_to_grayscale(_as_plain_float(img)).expand(3, -1, -1).contiguous()
        out, *_ = convert_to_dst_type(t, dst=img, dtype=t.dtype)
        return out


class RandGrayscaled(_SharedDrawd):
    """Dictionary version of :class:`RandGrayscale`; one draw for all keys."""

    backend = RandGrayscale.backend

    def __init__(self, keys: KeysCollection, prob: float = 0.2, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.inner = RandGrayscale(prob=1.0)


# --------------------------------------------------------------------------------------------------
# blur
# --------------------------------------------------------------------------------------------------
def _gaussian_kernel1d(sigma: float, size: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _separable_blur(img: torch.Tensor, kh: Sequence[float], kw: Sequence[float]) -> torch.Tensor:
    """Separable filter of a (C, H, W) tensor with reflect padding, as a sum of shifted slices.

    For view-sized images and kernels of a few taps this is ~3x faster than a grouped ``conv2d``
    (MONAI's ``separable_filtering``) and gives the same result.
    """
    height, width = img.shape[1:]
    rh, rw = len(kh) // 2, len(kw) // 2
    padded = F.pad(img.unsqueeze(0), (rw, rw, rh, rh), mode="reflect")[0]
    rows = padded[:, 0:height, :] * kh[0]
    for i in range(1, len(kh)):
        rows.add_(padded[:, i : i + height, :], alpha=kh[i])
    out = rows[:, :, 0:width] * kw[0]
    for j in range(1, len(kw)):
        out.add_(rows[:, :, j : j + width], alpha=kw[j])
    return out


class RandGaussianBlur(RandomizableTransform):
    """SimCLR's Gaussian blur: isotropic sigma ~ U(sigma), kernel ~10 % of the image side, reflect padding.

    MONAI's ``RandGaussianSmooth`` draws an independent sigma per axis (anisotropic blur), truncates
    the kernel at 4 sigma rather than a fraction of the image, and zero-pads (darkening borders, so
    a constant image does not stay constant). This keeps SimCLR's parametrisation: sigma in pixels of
    the (already resized) view, kernel side ``2 * (int(kernel_fraction * side) // 2) + 1`` (23 at 224,
    7 at 64), or a fixed odd ``kernel_size``.

    Args:
        sigma: range of the standard deviation in pixels.
        prob: probability of blurring (SimCLR: 0.5).
        kernel_fraction: kernel side as a fraction of each image side (ignored if ``kernel_size``).
        kernel_size: fixed odd kernel side.
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH]

    def __init__(
        self,
        sigma: Sequence[float] | float = (0.1, 2.0),
        prob: float = 0.5,
        kernel_fraction: float = 0.1,
        kernel_size: int | None = None,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        s = ensure_tuple(sigma)
        self.sigma = (float(s[0]), float(s[-1]))
        if not (0 < self.sigma[0] <= self.sigma[1]):
            raise ValueError(f"sigma must satisfy 0 < min <= max, got {sigma}.")
        if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}.")
        self.kernel_fraction = float(kernel_fraction)
        self.kernel_size = kernel_size
        self.current_sigma = self.sigma[0]

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.current_sigma = float(self.R.uniform(self.sigma[0], self.sigma[1]))

    def _kernel_side(self, side: int) -> int:
        k = (
            self.kernel_size
            if self.kernel_size is not None
            else 2 * (int(self.kernel_fraction * side) // 2) + 1
        )
        k = max(k, 3)
        return min(k, 2 * (side - 1) + 1)  # reflect padding needs pad < side

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=get_track_meta())
        _check_2d(img, type(self).__name__)
        if randomize:
            self.randomize()
        if not self._do_transform or min(img.shape[1:]) < 2:
            return img
        t = _as_plain_float(img)
        kh, kw = (_gaussian_kernel1d(self.current_sigma, self._kernel_side(int(s))) for s in t.shape[1:])
        lo, hi = torch.aminmax(t)
        # a normalised kernel averages, but float rounding can step a pixel of 1.0 to 1.0000002
        t = _separable_blur(t, kh.tolist(), kw.tolist()).clamp_(lo, hi)
        out, *_ = convert_to_dst_type(t, dst=img, dtype=t.dtype)
        return out


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
            from medssl_monai.transforms.presets import get_preset

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
