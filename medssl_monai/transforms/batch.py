"""Contrastive views made on the accelerator, a whole batch at a time.

The per-item views pipeline (:class:`~medssl_monai.transforms.ContrastiveViewsd` over a preset) runs in
DataLoader workers on the CPU. On a GPU that is the bottleneck: a ResNet-50 at 128 px on one H100 was
idle 90% of the time behind 14 workers (``docs/results.md``). :class:`BatchViews` applies the same preset
(same transforms, same parameters, overrides included) to a ``(B, C, H, W)`` batch on the batch's device,
each item with its own draw; the loader then only decodes and resizes (``views_on="device"`` in the
contrastive bundles).

Per item, in the preset's order: random resized crop (a box drawn as torchvision does, sampled
bilinearly, no antialiasing: keep the source at most about twice the view size), horizontal/vertical
flips, quarter turns, colour jitter (brightness, contrast, saturation, hue in a random order, each item
its own), grayscale, Gaussian blur (SimCLR's isotropic sigma and kernel side). Presets with other
transforms (e.g. ``chest_xray``'s elastic deformation) are refused with the names of what is missing.

The maths is :mod:`.functional`'s, the same functions the per-image transforms call, here with one
parameter per item (``(B, 1, 1, 1)`` tensors); only the crop's resampling differs (one ``grid_sample`` for
boxes of different sizes instead of an antialiased resize per image).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import RandFlipd, Randomizable, RandRotate90d

from ..utils.deprecation import current_value
from .dictionary import (
    EnsureFloatImaged,
    RandColorJitterd,
    RandGaussianBlurd,
    RandGrayscaled,
    RandomResizedCropd,
)
from .functional import (
    COLOR_ADJUSTMENTS,
    centre_crop_box,
    crop_box_size,
    gaussian_blur,
    gray_to_rgb_luma,
    sample_boxes,
)
from .presets import get_preset

__all__ = ["VIEWS_ON", "BatchViews", "batch_views_for", "views_location"]

#: where the contrastive views are made: ``host`` (per item, loader workers) or ``device`` (per batch)
VIEWS_ON = ("host", "device")

logger = logging.getLogger(__name__)


class BatchViews(Randomizable, torch.nn.Module):
    """A views preset applied to a batch on its own device; every item gets its own random draw.

    Args:
        spatial_size: output ``(h, w)`` (square when quarter turns are on).
        crop_scale, crop_ratio, crop_attempts: the random resized crop (area fraction, aspect ratio).
        hflip_prob, vflip_prob: flip probabilities (width axis, height axis).
        rot90_prob: probability of a quarter turn by k in {1, 2, 3}, uniform (``RandRotate90d``, max_k=3).
        jitter_prob: probability of the colour jitter; ``brightness`` ... ``hue``: factor ranges
            ``(lo, hi)`` or ``None`` (off), as :class:`~medssl_monai.transforms.RandColorJitter` holds them.
        grayscale_prob: probability of replacing RGB by its luma (3 channels kept).
        blur_prob, blur_sigma, blur_kernel_fraction, blur_kernel_size: SimCLR's Gaussian blur.
    """

    def __init__(
        self,
        spatial_size: Sequence[int] | int,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        crop_attempts: int = 10,
        hflip_prob: float = 0.0,
        vflip_prob: float = 0.0,
        rot90_prob: float = 0.0,
        jitter_prob: float = 0.0,
        brightness: Sequence[float] | None = None,
        contrast: Sequence[float] | None = None,
        saturation: Sequence[float] | None = None,
        hue: Sequence[float] | None = None,
        grayscale_prob: float = 0.0,
        blur_prob: float = 0.0,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        blur_kernel_fraction: float = 0.1,
        blur_kernel_size: int | None = None,
    ) -> None:
        torch.nn.Module.__init__(self)
        size = (int(spatial_size),) * 2 if isinstance(spatial_size, (int, np.integer)) else tuple(spatial_size)
        if rot90_prob > 0 and size[0] != size[1]:
            raise ValueError(f"quarter turns need a square spatial_size, got {size}")
        self.spatial_size = (int(size[0]), int(size[1]))
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.crop_attempts = int(crop_attempts)
        self.hflip_prob, self.vflip_prob, self.rot90_prob = float(hflip_prob), float(vflip_prob), float(rot90_prob)
        self.jitter_prob = float(jitter_prob)
        self.ranges = tuple(None if r is None else (float(r[0]), float(r[1]))
                            for r in (brightness, contrast, saturation, hue))
        self.grayscale_prob = float(grayscale_prob)
        self.blur_prob = float(blur_prob)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[-1]))
        self.blur_kernel_fraction = float(blur_kernel_fraction)
        self.blur_kernel_size = blur_kernel_size
        self.params: dict[str, np.ndarray] = {}
        probs = {"hflip_prob": hflip_prob, "vflip_prob": vflip_prob, "rot90_prob": rot90_prob,
                 "jitter_prob": jitter_prob, "grayscale_prob": grayscale_prob, "blur_prob": blur_prob}
        problems = [f"{k}={v} is not in [0, 1]" for k, v in probs.items() if not 0.0 <= float(v) <= 1.0]
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            problems.append(f"crop_scale {self.crop_scale} and crop_ratio {self.crop_ratio} need 0 < min <= max")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            problems.append(f"blur_sigma {self.blur_sigma} needs 0 < min <= max")
        if blur_kernel_size is not None and (blur_kernel_size < 1 or blur_kernel_size % 2 == 0):
            problems.append(f"blur_kernel_size must be a positive odd int, got {blur_kernel_size}")
        for name, r in zip(("brightness", "contrast", "saturation", "hue"), self.ranges):
            if r is not None and not (r[0] <= r[1] and (name == "hue" or r[0] >= 0)):
                problems.append(f"{name} range {r} is not a valid (lo, hi)")
        if problems:
            raise ValueError("BatchViews: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------------ draws
    def draw_boxes(self, n: int, height: int, width: int) -> np.ndarray:
        """``(n, 4)`` integer boxes (top, left, h, w): torchvision's rejection sampling, then its fallback."""
        area = height * width
        log_r = np.log(self.crop_ratio)
        boxes = np.zeros((n, 4), dtype=np.int64)
        done = np.zeros(n, dtype=bool)
        for _ in range(self.crop_attempts):
            fraction = self.R.uniform(self.crop_scale[0], self.crop_scale[1], n)
            h, w = crop_box_size(area, fraction, self.R.uniform(log_r[0], log_r[1], n))
            top_u, left_u = self.R.uniform(size=n), self.R.uniform(size=n)
            ok = ~done & (w > 0) & (h > 0) & (w <= width) & (h <= height)
            top = np.floor(top_u * (height - h + 1)).astype(np.int64)
            left = np.floor(left_u * (width - w + 1)).astype(np.int64)
            boxes[ok] = np.stack([top, left, h, w], axis=1)[ok]
            done |= ok
            if done.all():
                break
        if not done.all():  # the same fallback as the per-item crop
            boxes[~done] = centre_crop_box(height, width, self.crop_ratio)
        return boxes

    def randomize(self, data: tuple[int, int, int]) -> None:
        """Draw every item's parameters (on the CPU, from ``self.R``: reproducible whatever the device)."""
        n, height, width = data
        u = self.R.uniform
        self.params = {
            "box": self.draw_boxes(n, height, width),
            "hflip": u(size=n) < self.hflip_prob,
            "vflip": u(size=n) < self.vflip_prob,
            "rot90": np.where(u(size=n) < self.rot90_prob, self.R.randint(1, 4, size=n), 0),
            "jitter": u(size=n) < self.jitter_prob,
            "order": np.argsort(u(size=(n, 4)), axis=1),  # a uniform random permutation per item
            "factors": np.stack([u(r[0], r[1], n) if r is not None else np.full(n, np.nan) for r in self.ranges], 1),
            "gray": u(size=n) < self.grayscale_prob,
            "blur": u(size=n) < self.blur_prob,
            "sigma": u(self.blur_sigma[0], self.blur_sigma[1], n),
        }

    # --------------------------------------------------------------------------------------- applying
    def _device_params(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The draws as tensors on ``device``, moved in one copy.

        Every mask below is applied with ``torch.where`` on the whole batch, never by indexing with a mask:
        a mask read back on the host (``mask.any()``, boolean indexing) or a pageable host-to-device copy
        per op would wait for the GPU each time, and the views would then not overlap with training.
        """
        p = self.params
        n = len(p["box"])
        factors = np.where(np.isnan(p["factors"]), [1.0, 1.0, 1.0, 0.0], p["factors"])  # unused: neutral
        packed = np.concatenate([p["box"], np.stack([p["hflip"], p["vflip"], p["rot90"], p["jitter"], p["gray"],
                                                     p["blur"], p["sigma"]], 1), p["order"], factors], 1)
        t = torch.as_tensor(packed.reshape(n, -1), dtype=torch.float32)
        if device.type == "cuda":
            t = t.pin_memory()  # an asynchronous copy: the host does not wait for the GPU's queue
        t = t.to(device, non_blocking=True)
        flag = lambda j: t[:, j] > 0.5  # noqa: E731
        return {"box": t[:, 0:4], "hflip": flag(4), "vflip": flag(5), "rot90": t[:, 6].round().long(),
                "jitter": flag(7), "gray": flag(8), "blur": flag(9), "sigma": t[:, 10],
                "order": t[:, 11:15].round().long(), "factors": t[:, 15:19]}

    @staticmethod
    def _where(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.view(-1, 1, 1, 1), new, old)

    def _jitter(self, x: torch.Tensor, d: dict[str, torch.Tensor]) -> torch.Tensor:
        """Brightness, contrast, saturation, hue in each item's own order, each item's own factors."""
        # saturation and hue do nothing to gray images (as the per-item transform)
        active = [i for i in range(4) if self.ranges[i] is not None and (x.shape[1] == 3 or i < 2)]
        for position in range(4):
            for i in active:
                mask = d["jitter"] & (d["order"][:, position] == i)
                x = self._where(mask, COLOR_ADJUSTMENTS[i](x, d["factors"][:, i].view(-1, 1, 1, 1)), x)
        return x

    @torch.no_grad()
    def forward(self, x: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        """``(B, C, H, W)`` floats in [0, 1] -> ``(B, C, h, w)`` views, each item with its own draw.

        ``randomize=False`` applies the draws in :attr:`params` again (as MONAI's array transforms do),
        e.g. parameters set by hand.
        """
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"BatchViews expects a (B, C, H, W) batch with 1 or 3 channels, got {tuple(x.shape)}")
        x = torch.as_tensor(x).as_subclass(torch.Tensor)
        # float32 throughout: a bf16 sampling grid is off by up to half a pixel, and half-precision
        # grid_sample on the CPU returns NaNs; uint8 images are scaled to [0, 1] as the loader does
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if randomize:
            self.randomize((x.shape[0], x.shape[2], x.shape[3]))
        elif len(self.params.get("box", ())) != x.shape[0]:
            raise RuntimeError(f"BatchViews: no draws for a batch of {x.shape[0]}; call randomize() first.")
        d = self._device_params(x.device)
        x = sample_boxes(x, d["box"], self.spatial_size)
        if self.hflip_prob > 0:
            x = self._where(d["hflip"], x.flip(-1), x)
        if self.vflip_prob > 0:
            x = self._where(d["vflip"], x.flip(-2), x)
        if self.rot90_prob > 0:
            for k in (1, 2, 3):
                x = self._where(d["rot90"] == k, torch.rot90(x, k, dims=(-2, -1)), x)
        if self.jitter_prob > 0:
            x = self._jitter(x, d)
        if self.grayscale_prob > 0 and x.shape[1] == 3:
            x = self._where(d["gray"], gray_to_rgb_luma(x), x)
        if self.blur_prob > 0:  # each item's own sigma; kernels built on the device
            blurred = gaussian_blur(x, d["sigma"], self.blur_kernel_fraction, self.blur_kernel_size)
            x = self._where(d["blur"], blurred, x)
        return x

    @classmethod
    def from_preset(cls, preset: str, spatial_size: Sequence[int] | int,
                    preset_overrides: Mapping[str, Any] | None = None) -> BatchViews:
        """The batch version of a views preset: its transforms instantiated (overrides applied), then read."""
        kw: dict[str, Any] = {"spatial_size": spatial_size}
        unsupported: list[str] = []
        seen: list[str] = []
        for t in get_preset(preset, "image", spatial_size, **dict(preset_overrides or {})).transforms:
            if isinstance(t, EnsureFloatImaged):
                continue
            kind = _kind(t)
            if kind is None:
                unsupported.append(type(t).__name__)
                continue
            if kind in seen or any(_ORDER.index(kind) < _ORDER.index(k) for k in seen):
                raise ValueError(f"preset {preset!r}: BatchViews runs at most one of each transform, in the order "
                                 f"{' -> '.join(_ORDER)}; this preset has {' -> '.join([*seen, kind])}")
            seen.append(kind)
            if kind == "crop":
                c = t.cropper
                kw.update(crop_scale=c.scale, crop_ratio=c.ratio, crop_attempts=c.max_attempts)
            elif kind in ("hflip", "vflip", "rot90", "gray"):
                kw[{"gray": "grayscale_prob"}.get(kind, f"{kind}_prob")] = t.prob
            elif kind == "jitter":
                j = t.inner
                kw.update(jitter_prob=t.prob, brightness=j.brightness, contrast=j.contrast,
                          saturation=j.saturation, hue=j.hue)
            else:
                b = t.inner
                kw.update(blur_prob=t.prob, blur_sigma=b.sigma, blur_kernel_fraction=b.kernel_fraction,
                          blur_kernel_size=b.kernel_size)
        if unsupported:
            raise ValueError(f"preset {preset!r} has transforms BatchViews cannot run on the device: "
                             f"{', '.join(unsupported)}; use views_on='host' for it")
        return cls(**kw)


_ORDER = ("crop", "hflip", "vflip", "rot90", "jitter", "gray", "blur")


def _kind(t: Any) -> str | None:
    """Which of BatchViews' steps a preset transform is (``None``: not one of them)."""
    if isinstance(t, RandomResizedCropd):
        return "crop"
    if isinstance(t, RandFlipd) and _axes(t.flipper.spatial_axis) in ((0,), (1,)):
        return "hflip" if _axes(t.flipper.spatial_axis) == (1,) else "vflip"
    if isinstance(t, RandRotate90d) and t.max_k == 3 and tuple(t.spatial_axes) == (0, 1):
        return "rot90"
    if isinstance(t, RandColorJitterd) and t.inner.random_order:
        return "jitter"
    if isinstance(t, RandGrayscaled):
        return "gray"
    if isinstance(t, RandGaussianBlurd):
        return "blur"
    return None


def _axes(axis: Any) -> tuple[int, ...]:
    return () if axis is None else tuple(int(a) for a in np.atleast_1d(axis))


def views_location(views_on: str) -> str:
    """``views_on`` checked: ``"host"`` (per item, in the loader's workers) or ``"device"`` (per batch,
    :class:`BatchViews`), the words ``cache`` uses; ``"cpu"``, the former name of ``"host"``, with a warning."""
    where = current_value("views_on", views_on)
    if where not in VIEWS_ON:
        raise ValueError(f"views_on must be 'host' or 'device', got {views_on!r}")
    return where


def batch_views_for(preset: str, image_size: int, preset_overrides: Mapping[str, Any] | None = None,
                    views_on: str = "host", seed: int = 0) -> BatchViews | None:
    """For the bundles: the device-side views when ``views_on == "device"``, else ``None`` (host workers;
    ``"cpu"`` is the former name of ``"host"``)."""
    if views_location(views_on) == "host":
        return None
    views = BatchViews.from_preset(preset, image_size, preset_overrides)
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    views.set_random_state(seed=seed + rank)  # under DDP each rank draws its own views
    logger.info("views made on the training device, per batch: preset %r at %d px", preset, image_size)
    return views
