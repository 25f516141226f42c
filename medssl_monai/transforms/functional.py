"""The maths of the contrastive views, on plain tensors: crop boxes and resampling, colour, blur.

One formula in one place for both paths that make views: the per-image transforms (:mod:`.array`,
:mod:`.dictionary`, run in DataLoader workers) and :class:`~medssl_monai.transforms.BatchViews` (a whole
batch on the training device, each item with its own parameters). So every function takes a channel-first
image ``(C, H, W)`` or a batch ``(B, C, H, W)``; a parameter is a number (one value for the whole input) or a
tensor that broadcasts against the input (``(B, 1, 1, 1)``: one value per item). Nothing here draws random
numbers, touches ``MetaTensor`` metadata or moves data between devices: the transforms do that.

All images are floats in [0, 1]; colour functions that only make sense for RGB leave 1-channel input as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "COLOR_ADJUSTMENTS",
    "LUMA_WEIGHTS",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernel_side",
    "centre_crop_box",
    "crop_box_size",
    "gaussian_blur",
    "gaussian_kernel1d",
    "gray_to_rgb_luma",
    "hsv_to_rgb",
    "resize_image",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "sample_boxes",
    "separable_filter",
]

#: ITU-R BT.601 luma weights (what PIL's ``convert("L")`` and torchvision's ``rgb_to_grayscale`` use).
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

#: A factor: one number for the whole input, or a tensor broadcasting against it (``(B, 1, 1, 1)``).
Factor = float | torch.Tensor


# --------------------------------------------------------------------------------------------------
# crop
# --------------------------------------------------------------------------------------------------
def crop_box_size(area: float, fraction: np.ndarray | float, log_aspect: np.ndarray | float):
    """torchvision's ``RandomResizedCrop`` box ``(h, w)`` for drawn area fractions and log aspect ratios.

    Works on numbers (one box) and on arrays (one box per item); sides are rounded half to even, as
    Python's ``round`` and ``np.round`` both do. Whether the box fits is the caller's test.
    """
    target = area * np.asarray(fraction, dtype=np.float64)
    aspect = np.exp(np.asarray(log_aspect, dtype=np.float64))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    return h, w


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


def resize_image(img: torch.Tensor, size: Sequence[int], mode: str = "bilinear", antialias: bool = True):
    """Resize a ``(C, H, W)`` crop to ``size`` with torch's interpolation (antialiased when downsampling).

    The per-image path: MONAI's ``Resize(anti_aliasing=True)`` pre-filters with a zero-padded Gaussian,
    which darkens the border by ~10-20 % and is ~20x slower.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(img.shape[-2:]) == size:
        return img
    aa = antialias and mode in ("bilinear", "bicubic")
    align = False if mode in ("bilinear", "bicubic") else None
    out = F.interpolate(img.unsqueeze(0), size=size, mode=mode, align_corners=align, antialias=aa)[0]
    return out.clamp_(0.0, 1.0) if mode == "bicubic" else out


def sample_boxes(x: torch.Tensor, boxes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear sampling of each item's box ``(top, left, h, w)`` of a ``(B, C, H, W)`` batch onto a ``size``
    grid (pixel centres, ``align_corners=False``, border clamp; no antialiasing).

    The batch path: one ``grid_sample`` for boxes of different sizes. On a whole-image box it equals a plain
    bilinear resize; keep the source at most about twice the output size, as nothing low-passes it.
    """
    _, _, height, width = x.shape
    oh, ow = int(size[0]), int(size[1])
    top, left, bh, bw = boxes.to(torch.float32).unbind(1)
    # output pixel centre i -> source coordinate top + (i + 0.5) * bh / oh - 0.5, then to [-1, 1]
    iy = (torch.arange(oh, device=x.device, dtype=torch.float32) + 0.5) / oh
    ix = (torch.arange(ow, device=x.device, dtype=torch.float32) + 0.5) / ow
    ys = (top[:, None] + iy[None] * bh[:, None]) * (2.0 / height) - 1.0
    xs = (left[:, None] + ix[None] * bw[:, None]) * (2.0 / width) - 1.0
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------------------------------
# colour
# --------------------------------------------------------------------------------------------------
def rgb_to_grayscale(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of a ``(..., 3, H, W)`` tensor, keeping a channel dim of size 1."""
    r, g, b = img.unbind(dim=-3)
    return (LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b).unsqueeze(-3)


def gray_to_rgb_luma(img: torch.Tensor) -> torch.Tensor:
    """The luma of an RGB ``(..., 3, H, W)`` image repeated to 3 channels (an expanded view, not a copy)."""
    return rgb_to_grayscale(img).expand_as(img)


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


def _blend(img: torch.Tensor, other: torch.Tensor | float, factor: Factor) -> torch.Tensor:
    """torchvision's ``_blend``: ``factor * img + (1 - factor) * other`` clipped to [0, 1]."""
    return (factor * img + (1.0 - factor) * other).clamp_(0.0, 1.0)


def adjust_brightness(img: torch.Tensor, factor: Factor) -> torch.Tensor:
    """Scale the intensities (torchvision: blend with black), clipped to [0, 1]."""
    return (img * factor).clamp_(0.0, 1.0)


def adjust_contrast(img: torch.Tensor, factor: Factor) -> torch.Tensor:
    """Blend each image with its mean luminance (one number per image), as torchvision/PIL do."""
    mean = (rgb_to_grayscale(img) if img.shape[-3] == 3 else img).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(img, mean, factor)


def adjust_saturation(img: torch.Tensor, factor: Factor) -> torch.Tensor:
    """Blend with the luma; a gray image has no saturation to change (torchvision/PIL behave the same)."""
    if img.shape[-3] == 1:
        return img
    return _blend(img, rgb_to_grayscale(img), factor)


def adjust_hue(img: torch.Tensor, shift: Factor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]); hue is undefined on gray pixels, 1-channel input
    is returned as is."""
    if img.shape[-3] == 1:
        return img
    hsv = rgb_to_hsv(img)
    h = torch.remainder(hsv.narrow(-3, 0, 1) + shift, 1.0)
    return hsv_to_rgb(torch.cat((h, hsv.narrow(-3, 1, 2)), dim=-3)).clamp_(0.0, 1.0)


#: The colour jitter's four adjustments, indexed as its ``order`` and ``factors`` are:
#: 0 brightness, 1 contrast, 2 saturation, 3 hue.
COLOR_ADJUSTMENTS: tuple[Callable[[torch.Tensor, Factor], torch.Tensor], ...] = (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_hue,
)


# --------------------------------------------------------------------------------------------------
# blur
# --------------------------------------------------------------------------------------------------
def blur_kernel_side(side: int, kernel_fraction: float = 0.1, kernel_size: int | None = None) -> int:
    """SimCLR's kernel side for an image side: ``2 * (int(kernel_fraction * side) // 2) + 1`` (23 at 224,
    7 at 64) or a fixed odd ``kernel_size``; at least 3, and small enough for reflect padding."""
    k = kernel_size if kernel_size is not None else 2 * (int(kernel_fraction * side) // 2) + 1
    return min(max(k, 3), 2 * (side - 1) + 1)  # reflect padding needs pad < side


def gaussian_kernel1d(
    sigma: float | torch.Tensor, size: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Normalised 1-D Gaussian taps: ``(size,)`` for a number, ``(B, size)`` for a ``(B,)`` tensor of sigmas."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    if isinstance(sigma, torch.Tensor):
        x = x / sigma.to(device=x.device, dtype=dtype).unsqueeze(-1)
    else:
        x = x / sigma
    k = torch.exp(-0.5 * x**2)
    return k / k.sum(dim=-1, keepdim=True)


def _shifted_sum(x: torch.Tensor, taps: list[float], size: int, dim: int) -> torch.Tensor:
    """``sum_i taps[i] * x.narrow(dim, i, size)``."""
    out = x.narrow(dim, 0, size) * taps[0]
    for i in range(1, len(taps)):
        out.add_(x.narrow(dim, i, size), alpha=taps[i])
    return out


def separable_filter(img: torch.Tensor, kh: torch.Tensor, kw: torch.Tensor) -> torch.Tensor:
    """Separable filter of ``(C, H, W)`` or ``(B, C, H, W)`` with reflect padding.

    ``kh``/``kw`` are odd-length taps: ``(K,)``, one kernel for everything, or ``(B, K)``, one per item of a
    batch. One kernel is applied as sums of shifted slices: for view-sized images and kernels of a few taps
    ~3x faster on the CPU than a grouped ``conv2d`` (MONAI's ``separable_filtering``). Per-item kernels go
    through one grouped ``conv2d`` per axis for the whole batch (two kernel launches on an accelerator; on
    the CPU also faster than the slices once the kernel has ~10 taps or more). Both compute the same sums.
    """
    height, width = img.shape[-2:]
    rh, rw = kh.shape[-1] // 2, kw.shape[-1] // 2
    if kh.ndim == 1 and kw.ndim == 1:
        batch = img if img.ndim == 4 else img.unsqueeze(0)
        padded = F.pad(batch, (rw, rw, rh, rh), mode="reflect")
        padded = padded if img.ndim == 4 else padded[0]
        rows = _shifted_sum(padded, kh.tolist(), height, dim=-2)
        return _shifted_sum(rows, kw.tolist(), width, dim=-1)
    if img.ndim != 4 or kh.shape[0] != img.shape[0] or kw.shape[0] != img.shape[0]:
        raise ValueError(f"per-item taps {tuple(kh.shape)}, {tuple(kw.shape)} need a batch of as many items, "
                         f"got {tuple(img.shape)}")
    n, c = img.shape[:2]
    wy = kh.to(img.dtype).repeat_interleave(c, 0).view(n * c, 1, -1, 1)
    wx = kw.to(img.dtype).repeat_interleave(c, 0).view(n * c, 1, 1, -1)
    y = F.pad(img.reshape(1, n * c, height, width), (rw, rw, rh, rh), mode="reflect")
    return F.conv2d(F.conv2d(y, wy, groups=n * c), wx, groups=n * c).view(n, c, height, width)


def gaussian_blur(
    img: torch.Tensor, sigma: float | torch.Tensor, kernel_fraction: float = 0.1, kernel_size: int | None = None
) -> torch.Tensor:
    """SimCLR's isotropic Gaussian blur of a ``(C, H, W)`` image (``sigma`` a number) or a ``(B, C, H, W)`` batch
    (``sigma`` a number or ``(B,)``), kernel side from :func:`blur_kernel_side`, reflect padding.

    Each image stays within its own [min, max]: a normalised kernel averages, but float rounding can step a
    pixel of 1.0 to 1.0000002.
    """
    height, width = (int(s) for s in img.shape[-2:])
    kh = gaussian_kernel1d(sigma, blur_kernel_side(height, kernel_fraction, kernel_size), img.device, img.dtype)
    kw = gaussian_kernel1d(sigma, blur_kernel_side(width, kernel_fraction, kernel_size), img.device, img.dtype)
    lo, hi = (v[..., None, None, None] for v in img.flatten(-3).aminmax(dim=-1))
    return separable_filter(img, kh, kw).clamp_(lo, hi)
