"""Weighted k-nearest-neighbour accuracy of frozen features: the maths of SSL pretraining's cheap monitor.

Linear evaluation needs its own training run; a kNN classifier on the current backbone's features needs only
two forward passes over labelled data, so it can run every few epochs and show whether the representation
improves (as in InstDisc, DINO and solo-learn). Votes are weighted by ``exp(cosine_similarity / T)``.
:class:`~medssl_monai.handlers.KNNMonitor` runs it on an engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "knn_scores"]

_AMP = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class votes ``(N_test, num_classes)``: the summed ``exp(sim / temperature)`` of each sample's ``k`` most
    cosine-similar train samples, per class (:func:`knn_predict` takes their argmax)."""
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(train_features.shape)} and "
                         f"{tuple(test_features.shape)}")
    train_labels = torch.as_tensor(train_labels, device=train_features.device).long().reshape(-1)
    if train_labels.numel() != train_features.shape[0]:
        raise ValueError(f"{train_labels.numel()} train labels for {train_features.shape[0]} train features")
    if train_labels.numel() == 0:
        raise ValueError("empty feature bank")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    bank = nn.functional.normalize(train_features.float(), dim=1)
    test_features = test_features.to(bank.device)
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):  # bounds the (chunk x N_train) similarity matrix
        query = nn.functional.normalize(test_features[start:start + chunk_size].float(), dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        scores.append(votes)
    if not scores:
        return torch.zeros(0, num_classes, device=bank.device)
    return torch.cat(scores)


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted labels ``(N_test,)`` by weighted kNN on cosine similarity.

    Each test sample takes its ``k`` most similar train samples; each neighbour votes for its class with weight
    ``exp(sim / temperature)`` (InstDisc / solo-learn); the class with the largest total wins (ties: lowest
    class index). ``num_classes`` defaults to ``max(train_labels) + 1``. Computed on the device of
    ``train_features``, ``chunk_size`` test samples at a time.
    """
    scores = knn_scores(train_features, train_labels, test_features, k, temperature, num_classes, chunk_size)
    return scores.argmax(dim=1)


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy (in [0, 1]) of :func:`knn_predict` against ``test_labels``."""
    pred = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes, chunk_size)
    test_labels = torch.as_tensor(test_labels, device=pred.device).long().reshape(-1)
    if test_labels.numel() != pred.numel():
        raise ValueError(f"{test_labels.numel()} test labels for {pred.numel()} test features")
    if pred.numel() == 0:
        raise ValueError("no test samples")
    return (pred == test_labels).float().mean().item()


def _split_batch(batch: Any, image_key: str, label_key: str) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, Mapping):
        return batch[image_key], batch[label_key]
    if isinstance(batch, Sequence) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"batches must be dicts with '{image_key}'/'{label_key}' or (image, label) pairs, "
                    f"got {type(batch).__name__}")


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    image_key: str = "image",
    label_key: str = "label",
    amp: Literal["bf16", "fp16", "none"] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D) float32 on CPU, labels (N,) int64)`` of ``backbone`` over ``loader``.

    Runs in eval mode (batch norm uses its running statistics, as a deployed model would) without autograd,
    one batch at a time, and puts the backbone back in the mode it was in: it is called from inside training.
    Features go to the CPU as they are computed so that GPU memory holds one batch, not the whole set. A model
    returning a tuple (e.g. ``SSLModel``: features, projections) contributes its first element: the kNN
    monitor evaluates the backbone features, not the projections (SimCLR's finding: they are better).
    """
    if amp not in _AMP:
        raise ValueError(f"amp must be one of {sorted(k for k in _AMP if k)} or None, got {amp!r}")
    device = torch.device(device)
    amp_dtype = _AMP[amp]
    was_training = backbone.training
    backbone.eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in loader:
            if batch is None:  # every image of this batch was unreadable (bad_images.collate_readable)
                continue
            images, targets = _split_batch(batch, image_key, label_key)
            x = torch.as_tensor(images).as_subclass(torch.Tensor).to(device, non_blocking=True)
            ctx = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                   else contextlib.nullcontext())
            with ctx:
                out = backbone(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = out.as_subclass(torch.Tensor).float().reshape(out.shape[0], -1)
            y = torch.as_tensor(targets).as_subclass(torch.Tensor).long().reshape(-1)
            if y.numel() != out.shape[0]:
                raise ValueError(f"batch has {out.shape[0]} images but {y.numel()} labels under '{label_key}' "
                                 "(class indices expected, not one-hot)")
            feats.append(out.cpu())
            labels.append(y.cpu())
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)
