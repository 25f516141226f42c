"""Representation similarity between network stages: linear CKA and SVCCA (Transfusion-style analyses).

* :func:`linear_cka` is the linear centred kernel alignment of Kornblith et al. 2019 ("Similarity of Neural
  Network Representations Revisited"), computed in float64 as
  ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred activations (or the identical Gram-matrix
  form when there are more features than examples). It is invariant to orthogonal transforms and isotropic
  scaling of either representation, but not to arbitrary invertible linear maps.
* :func:`svcca` is the SVCCA of Raghu et al. 2017, used by Transfusion (Raghu et al. 2019): each centred
  representation is reduced to its top singular directions explaining ``keep_variance`` of the variance, then
  the canonical correlations between the two reduced views are the singular values of ``Ux^T Uy`` for
  orthonormal bases ``Ux``, ``Uy`` of their column spaces; the score is their mean.

Conv activations ``(N, C, *spatial)`` become matrices with :func:`conv_to_matrix`, following the SVCCA authors'
recipe: ``"pool"`` averages over space to ``(N, C)`` (the default, because it works for stages with different
spatial sizes, e.g. across architectures or depths) and ``"positions"`` treats each spatial position as a data
point ``(N*H*W, C)`` (finer, but only comparable between activations with the *same* spatial shape, whose
rows then correspond).

Memory is bounded: :func:`collect_activations` / :func:`stage_similarity` keep at most ``max_examples`` rows
per stage (the *first* rows the loader yields, a fixed and reproducible subsample; shuffle the loader or pass
a random subset for a representative one), so the stored activations take at most
``max_examples * sum(C_stage) * 4`` bytes per model, and the loader stops being read once every stage is full.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

__all__ = [
    "collect_activations",
    "conv_to_matrix",
    "linear_cka",
    "stage_similarity",
    "svcca",
    "svd_reduce",
]

ArrayLike = np.ndarray | torch.Tensor


def _as_matrix(x: ArrayLike, name: str) -> np.ndarray:
    """float64 ``(n, p)`` numpy copy of a 2D tensor/array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2D (n_examples, features) matrix, got shape {arr.shape}; "
                         "convert conv maps with conv_to_matrix first.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf.")
    return arr


def _centred_pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_matrix(x, "X"), _as_matrix(y, "Y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"X and Y need the same examples (rows): {a.shape[0]} vs {b.shape[0]}.")
    if a.shape[0] < 2:
        raise ValueError("at least 2 examples are needed.")
    return a - a.mean(axis=0, keepdims=True), b - b.mean(axis=0, keepdims=True)


def linear_cka(x: ArrayLike, y: ArrayLike) -> float:
    """Linear CKA of two activation matrices ``(n_examples, features)`` with the same rows (examples).

    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` after centring each column, in float64; when the examples
    are fewer than the features the equal kernel form ``<K, L>_F / (||K||_F ||L||_F)`` with ``K = X X^T``,
    ``L = Y Y^T`` is used (cheaper). Returns a value in [0, 1], or NaN if either representation is constant.
    """
    a, b = _centred_pair(x, y)
    n = a.shape[0]
    if n < max(a.shape[1], b.shape[1]):
        k, l_ = a @ a.T, b @ b.T
        num = float(np.sum(k * l_))
        den = float(np.linalg.norm(k) * np.linalg.norm(l_))
    else:
        num = float(np.linalg.norm(b.T @ a) ** 2)
        den = float(np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b))
    if den <= 0.0:
        return float("nan")
    return float(np.clip(num / den, 0.0, 1.0))


def svd_reduce(x: ArrayLike, keep_variance: float = 0.99) -> np.ndarray:
    """Orthonormal basis ``(n, k)`` of the top-``k`` left singular directions of the centred ``x``.

    ``k`` is the smallest number of directions whose squared singular values reach ``keep_variance`` of the
    total (SVCCA's "SVD" step). The reduced data is ``U_k S_k``; its column space, which is all that CCA
    depends on, is spanned by the returned ``U_k``. A constant input gives an ``(n, 0)`` basis.
    """
    if not 0.0 < keep_variance <= 1.0:
        raise ValueError(f"keep_variance must be in (0, 1], got {keep_variance}.")
    a = _as_matrix(x, "X")
    a = a - a.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    var = s**2
    total = var.sum()
    if total <= 0.0:
        return u[:, :0]
    # drop numerically-zero directions (rank deficiency) before applying the variance threshold
    var = var[s > s[0] * max(a.shape) * np.finfo(np.float64).eps]
    k = int(np.searchsorted(np.cumsum(var) / total, keep_variance - 1e-12) + 1)
    return u[:, : min(k, var.size)]


def _cca_from_bases(ux: np.ndarray, uy: np.ndarray) -> np.ndarray:
    if ux.shape[1] == 0 or uy.shape[1] == 0:
        return np.zeros(0)
    corr = np.linalg.svd(ux.T @ uy, compute_uv=False)
    return np.clip(corr, 0.0, 1.0)


def _warn_if_degenerate(n: int, kx: int, ky: int) -> None:
    if kx + ky >= n:
        warnings.warn(
            f"SVCCA with {n} examples and {kx} + {ky} kept directions: the subspaces must intersect, so "
            "correlations are trivially high; use many more examples than directions (>= 10x is advised).",
            stacklevel=3,
        )


def svcca(
    x: ArrayLike, y: ArrayLike, keep_variance: float = 0.99, return_correlations: bool = False
) -> float | tuple[float, np.ndarray]:
    """SVCCA similarity (Raghu et al. 2017) of two activation matrices with the same rows (examples).

    Each centred view is SVD-reduced to the directions explaining ``keep_variance`` of its variance
    (:func:`svd_reduce`); the canonical correlations are the singular values of ``Ux^T Uy`` for the
    orthonormal bases of the reduced views (the cosines of the principal angles between the subspaces),
    clipped to [0, 1]. Returns their mean, and with ``return_correlations=True`` also the correlations
    (descending, ``min(kx, ky)`` of them). NaN if either view is constant.

    CCA overfits when the kept directions are not much fewer than the examples (a warning is raised when
    ``kx + ky >= n``, where all correlations become trivially 1).
    """
    a, b = _centred_pair(x, y)
    ux, uy = svd_reduce(a, keep_variance), svd_reduce(b, keep_variance)
    _warn_if_degenerate(a.shape[0], ux.shape[1], uy.shape[1])
    corr = _cca_from_bases(ux, uy)
    mean = float(corr.mean()) if corr.size else float("nan")
    return (mean, corr) if return_correlations else mean


def conv_to_matrix(
    act: torch.Tensor,
    mode: Literal["pool", "positions"] = "pool",
    max_points: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Activation ``(N, C, *spatial)`` -> matrix; ``(N, D)`` inputs are returned as they are.

    * ``"pool"``: mean over the spatial dims -> ``(N, C)``. Default, because it compares stages of any
      spatial size (different depths or architectures).
    * ``"positions"``: every spatial position of every example is a data point -> ``(N * prod(spatial), C)``
      (rows ordered example-major). With ``max_points`` at most that many rows are kept, chosen at random
      with ``seed``: the same shape and seed give the same rows, so two models' activations of equal shape
      on the same batch stay row-aligned. Only meaningful between activations of the same spatial shape.
    """
    if act.ndim == 2:
        return act
    if act.ndim < 3:
        raise ValueError(f"expected (N, C, *spatial) or (N, D) activations, got shape {tuple(act.shape)}.")
    if mode == "pool":
        return act.mean(dim=tuple(range(2, act.ndim)))
    if mode != "positions":
        raise ValueError(f"mode must be 'pool' or 'positions', got {mode!r}.")
    mat = act.movedim(1, -1).reshape(-1, act.shape[1])
    if max_points is not None and mat.shape[0] > max_points:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(mat.shape[0], generator=gen)[:max_points].sort().values
        mat = mat[idx.to(mat.device)]
    return mat


class _StageBuffer:
    """At most ``limit`` float32 CPU rows of one stage, plus the spatial shape they came from."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0
        self.parts: list[torch.Tensor] = []
        self.spatial: tuple[int, ...] | None = None

    @property
    def full(self) -> bool:
        return self.count >= self.limit

    def add(self, mat: torch.Tensor, spatial: tuple[int, ...]) -> None:
        if self.spatial is None:
            self.spatial = spatial
        elif spatial != self.spatial and mat.shape[0] > 0:
            self.spatial = (-1,)  # varying input sizes: rows stay valid for "pool", positions not aligned
        take = min(self.limit - self.count, mat.shape[0])
        if take > 0:
            self.parts.append(mat[:take].detach().float().cpu())
            self.count += take

    def matrix(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(0, 0)


def _images(batch: Any, image_key: str) -> torch.Tensor:
    if isinstance(batch, Mapping):
        return torch.as_tensor(batch[image_key])
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Sequence) and len(batch) > 0:
        return torch.as_tensor(batch[0])
    raise TypeError(f"batches must be tensors, dicts with '{image_key}' or (image, ...) tuples, "
                    f"got {type(batch).__name__}.")


def _stage_list(model: nn.Module, stages: str | Sequence[str] | None) -> list[str]:
    if not hasattr(model, "forward_features"):
        raise TypeError(f"{type(model).__name__} has no forward_features(); use a backbone from get_backbone.")
    if stages is None:
        return list(model.stage_names)
    return [stages] if isinstance(stages, str) else list(stages)


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _feed(model, x, names, buffers, mode, max_points, seed) -> None:
    feats = model.forward_features(x, names)
    for name in names:
        act = feats[name]
        spatial = tuple(act.shape[2:])
        buffers[name].add(conv_to_matrix(act, mode, max_points, seed), spatial)


@torch.no_grad()
def _collect(
    models: Sequence[nn.Module],
    stage_lists: Sequence[list[str]],
    loader: Iterable,
    device: torch.device | str | None,
    max_examples: int,
    mode: str,
    max_points: int | None,
    image_key: str,
    seed: int,
) -> list[dict[str, _StageBuffer]]:
    if max_examples < 2:
        raise ValueError(f"max_examples must be >= 2, got {max_examples}.")
    if mode not in ("pool", "positions"):
        raise ValueError(f"mode must be 'pool' or 'positions', got {mode!r}.")
    buffers = [{s: _StageBuffer(max_examples) for s in names} for names in stage_lists]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for i, batch in enumerate(loader):
            x = _images(batch, image_key)
            for model, names, bufs in zip(models, stage_lists, buffers):
                dev = torch.device(device) if device is not None else _model_device(model)
                # the same seed for every model on this batch keeps position subsamples row-aligned
                _feed(model, x.to(dev), names, bufs, mode, max_points, seed + i)
            if all(b.full for bufs in buffers for b in bufs.values()):
                break
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    return buffers


def collect_activations(
    model: nn.Module,
    loader: Iterable,
    stages: str | Sequence[str] | None = None,
    device: torch.device | str | None = None,
    max_examples: int = 2000,
    mode: Literal["pool", "positions"] = "pool",
    max_points: int | None = 256,
    image_key: str = "image",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``stage name -> (rows, features)`` float32 CPU matrices of ``model``'s stages over ``loader``.

    The backbone runs once per batch (``forward_features(x, stages)``, in eval mode, without gradients; its
    training flag is restored afterwards); each stage output goes through :func:`conv_to_matrix` with
    ``mode``. Memory bound: at most ``max_examples`` rows per stage are kept, the *first* ones in loader
    order (a fixed subsample), and iteration stops when every stage has them. In ``"positions"`` mode each
    batch contributes at most ``max_points`` random (example, position) rows per stage (``seed + batch
    index``), so the rows span several batches. Inputs are moved to ``device`` (default: the model's).
    Batches may be tensors, dicts (``image_key``) or ``(image, ...)`` tuples.
    """
    names = _stage_list(model, stages)
    (bufs,) = _collect([model], [names], loader, device, max_examples, mode, max_points, image_key, seed)
    return {name: bufs[name].matrix() for name in names}


def stage_similarity(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    method: Literal["cka", "svcca"] = "cka",
    stages_a: Sequence[str] | None = None,
    stages_b: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    max_examples: int = 2000,
    mode: Literal["pool", "positions"] = "pool",
    max_points: int | None = 256,
    keep_variance: float = 0.99,
    image_key: str = "image",
    seed: int = 0,
    name_a: str = "model_a",
    name_b: str = "model_b",
) -> pd.DataFrame:
    """Similarity of every stage of ``model_a`` (rows) with every stage of ``model_b`` (columns).

    Both models see the same batches in one pass over ``loader`` (so rows correspond even for a shuffling
    loader); activations are gathered as in :func:`collect_activations` (at most ``max_examples`` rows per
    stage). ``method`` is ``"cka"`` (:func:`linear_cka`) or ``"svcca"`` (:func:`svcca` with
    ``keep_variance``). In ``"positions"`` mode, pairs of stages with different spatial shapes have no
    corresponding rows and get NaN. The frame's index/columns are named ``name_a``/``name_b`` and
    ``df.attrs`` records the method, mode and number of rows.
    """
    if method not in ("cka", "svcca"):
        raise ValueError(f"method must be 'cka' or 'svcca', got {method!r}.")
    names_a, names_b = _stage_list(model_a, stages_a), _stage_list(model_b, stages_b)
    same = model_a is model_b
    models = [model_a] if same else [model_a, model_b]
    lists = [sorted(set(names_a) | set(names_b), key=model_a.stage_names.index)] if same else [names_a, names_b]
    collected = _collect(models, lists, loader, device, max_examples, mode, max_points, image_key, seed)
    bufs_a, bufs_b = collected[0], collected[-1]
    mats_a = {s: bufs_a[s].matrix().double().numpy() for s in names_a}
    mats_b = {s: bufs_b[s].matrix().double().numpy() for s in names_b}
    n_rows = {m.shape[0] for m in (*mats_a.values(), *mats_b.values())}
    if n_rows == {0}:
        raise ValueError("the loader yielded no examples.")

    bases: dict[tuple[str, str], np.ndarray] = {}
    if method == "svcca":
        for tag, mats in (("a", mats_a), ("b", mats_b)):
            for s, m in mats.items():
                bases[tag, s] = svd_reduce(m, keep_variance)

    out = np.full((len(names_a), len(names_b)), np.nan)
    for i, sa in enumerate(names_a):
        for j, sb in enumerate(names_b):
            xa, xb = mats_a[sa], mats_b[sb]
            if xa.shape[0] != xb.shape[0]:
                continue
            if mode == "positions" and (bufs_a[sa].spatial != bufs_b[sb].spatial or bufs_a[sa].spatial == (-1,)):
                continue
            if method == "cka":
                out[i, j] = linear_cka(xa, xb)
            else:
                ux, uy = bases["a", sa], bases["b", sb]
                _warn_if_degenerate(xa.shape[0], ux.shape[1], uy.shape[1])
                corr = _cca_from_bases(ux, uy)
                out[i, j] = float(corr.mean()) if corr.size else math.nan
    df = pd.DataFrame(out, index=pd.Index(names_a, name=name_a), columns=pd.Index(names_b, name=name_b))
    df.attrs.update(method=method, mode=mode, n_rows=int(max(n_rows)))
    return df
