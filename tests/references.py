"""Independent references and synthetic data shared by tests in several folders (one copy of each).

Plain loops and numpy, never the package's code: what the package computes is compared with these.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


def ref_confusion(y_true, y_pred, k: int) -> np.ndarray:
    """Confusion matrix by an explicit loop (rows: true class, columns: predicted)."""
    cm = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred):
        cm[t][p] += 1
    return np.array(cm)


def multiclass_probs(seed: int = 7, n: int = 90, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``k`` classes, noisy but informative probabilities rounded to one decimal (many ties)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, np.round(probs, 1)


def clusters(n_per_class: int, num_classes: int, dim: int, noise: float, seed: int):
    """Well-separated Gaussian clusters around scaled basis vectors: features ``(N, dim)`` and labels."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(dim)[:num_classes] * 5
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centers[y] + noise * torch.randn(len(y), dim, generator=g)
    return x, y


class ClusterSet(Dataset):
    """``{"image", "label"}`` items over feature vectors, as the k-NN code reads a loader."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


def numpy_blur(img: np.ndarray, sigma: float, k: int) -> np.ndarray:
    """2D Gaussian as an explicit sum over kernel offsets on a reflect-padded image."""
    x = np.arange(k) - (k - 1) / 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    kernel2d = np.outer(g, g) / np.outer(g, g).sum()
    r = k // 2
    padded = np.pad(img, ((0, 0), (r, r), (r, r)), mode="reflect")
    out = np.zeros_like(img, dtype=np.float64)
    for dy in range(k):
        for dx in range(k):
            out += kernel2d[dy, dx] * padded[:, dy : dy + img.shape[1], dx : dx + img.shape[2]]
    return out
