"""Per-image view transforms (MONAI's array transforms): channel-first ``(C, H, W)`` in, same out.

The pieces of the SimCLR recipe that MONAI lacks or does differently: torchvision-style random resized
crop, colour jitter with saturation/hue, random grayscale and an isotropic Gaussian blur whose kernel scales
with the image, plus :class:`EnsureFloatImage`, which brings any loaded image to float [0, 1] first. Each is
``Randomizable`` (draws from ``self.R``, so ``set_random_state`` makes pipelines reproducible), takes
``randomize=False`` to apply the last draw (what the dictionary versions in :mod:`.dictionary` use to give
every key the same draw), and keeps ``MetaTensor`` in and out. The maths is in :mod:`.functional`, shared
with the batch path (:class:`~medssl_monai.transforms.BatchViews`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.data.utils import to_affine_nd
from monai.transforms import Randomizable, RandomizableTransform, SpatialCrop, Transform
from monai.transforms.utils import scale_affine
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple

from ..utils.deprecation import renamed_arg
from .functional import (
    COLOR_ADJUSTMENTS,
    centre_crop_box,
    crop_box_size,
    gaussian_blur,
    gray_to_rgb_luma,
    resize_image,
    rgb_to_grayscale,
)

__all__ = [
    "EnsureFloatImage",
    "RandColorJitter",
    "RandGaussianBlur",
    "RandGrayscale",
    "RandomResizedCrop",
]


def _as_plain_float(img: torch.Tensor) -> torch.Tensor:
    """Strip MetaTensor: its ``__torch_function__`` costs more than the maths on a 64x64 image."""
    t = img.as_tensor() if isinstance(img, MetaTensor) else img
    return t if t.is_floating_point() else t.float()


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
        in_channels: 3 to repeat gray to RGB, 1 to convert RGB to ITU-R 601 luma, None to keep (the
            channel count of the network input, MONAI's ``in_channels``).
        channel_dim: where the channels are: an int, ``"no_channel"`` for (H, W) input, or
            ``"auto"`` (by shape: (H, W) has no channel, a 3D array whose last dim is 1/3/4 and first
            is not is channel-last, anything else channel-first).
        scale: ``"auto"`` divides unsigned integers by their dtype max, and integer-valued floats in
            [0, 255] (8-bit pixels loaded as float) by 255; it min-max rescales anything else outside
            [0, 1]; ``"minmax"`` always min-max rescales; ``"none"`` only casts.
        drop_alpha: drop a 4th (alpha) channel of RGBA images.
        num_channels: former name of ``in_channels`` (accepted with a ``FutureWarning``).
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH, TransformBackends.NUMPY]

    @renamed_arg("num_channels", "in_channels")
    def __init__(
        self,
        in_channels: int | None = None,
        channel_dim: int | str = "auto",
        scale: str = "auto",
        drop_alpha: bool = True,
        num_channels: int | None = None,
    ) -> None:
        if in_channels not in (None, 1, 3):
            raise ValueError(f"in_channels must be None, 1 or 3, got {in_channels}.")
        if scale not in ("auto", "minmax", "none"):
            raise ValueError(f"scale must be 'auto', 'minmax' or 'none', got {scale!r}.")
        if isinstance(channel_dim, str) and channel_dim not in ("auto", "no_channel"):
            raise ValueError(f"channel_dim must be an int, 'auto' or 'no_channel', got {channel_dim!r}.")
        self.in_channels = in_channels
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
        if self.in_channels == 3 and t.shape[0] == 1:
            t = t.expand(3, -1, -1).contiguous()
        elif self.in_channels == 1 and t.shape[0] == 3:
            t = rgb_to_grayscale(t)
        elif self.in_channels is not None and t.shape[0] != self.in_channels:
            raise ValueError(f"cannot convert a {t.shape[0]}-channel image to {self.in_channels} channels.")
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
            fraction = self.R.uniform(self.scale[0], self.scale[1])
            h, w = (int(v) for v in crop_box_size(area, fraction, self.R.uniform(log_ratio[0], log_ratio[1])))
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
        t = resize_image(_as_plain_float(img), self.spatial_size, self.mode, self.antialias)
        out, *_ = convert_to_dst_type(t, dst=img, dtype=t.dtype)
        if isinstance(out, MetaTensor) and in_size != self.spatial_size:
            affine = out.affine.to(torch.float64)
            scale = to_affine_nd(affine.shape[-1] - 1, scale_affine(in_size, self.spatial_size))
            out.affine = affine @ torch.as_tensor(scale, dtype=torch.float64)
        return out


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
        for i in self.order:
            factor = self.factors[i]
            if factor is not None:
                t = COLOR_ADJUSTMENTS[i](t, factor)
        out, *_ = convert_to_dst_type(t, dst=img, dtype=t.dtype)
        return out


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
        t = gray_to_rgb_luma(_as_plain_float(img)).contiguous()
        out, *_ = convert_to_dst_type(t, dst=img, dtype=t.dtype)
        return out


# --------------------------------------------------------------------------------------------------
# blur
# --------------------------------------------------------------------------------------------------
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

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        img = convert_to_tensor(img, track_meta=get_track_meta())
        _check_2d(img, type(self).__name__)
        if randomize:
            self.randomize()
        if not self._do_transform or min(img.shape[1:]) < 2:
            return img
        t = gaussian_blur(_as_plain_float(img), self.current_sigma, self.kernel_fraction, self.kernel_size)
        out, *_ = convert_to_dst_type(t, dst=img, dtype=t.dtype)
        return out


