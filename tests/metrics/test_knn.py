"""Weighted kNN maths: agreement with a naive implementation, sanity on easy/impossible data, feature extraction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from references import ClusterSet, clusters
from torch import nn
from torch.utils.data import DataLoader

from medssl_monai.metrics.knn import extract_features, knn_accuracy, knn_predict, knn_scores


def _naive_knn(train_x, train_y, test_x, k, temperature, num_classes):
    """Loops over test samples in float64 numpy: similarity, sort, exp-weighted votes."""
    train_x = np.asarray(train_x, dtype=np.float64)
    test_x = np.asarray(test_x, dtype=np.float64)
    preds, all_votes = [], []
    for q in test_x:
        sims = [float(q @ t / (np.linalg.norm(q) * np.linalg.norm(t))) for t in train_x]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[: min(k, len(sims))]
        votes = [0.0] * num_classes
        for j in order:
            votes[int(train_y[j])] += math.exp(sims[j] / temperature)
        all_votes.append(votes)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return np.array(preds), np.array(all_votes)


@pytest.mark.parametrize(("k", "temperature", "chunk_size"), [(20, 0.07, 1024), (5, 0.5, 7), (500, 0.1, 16)])
def test_matches_naive_implementation(k, temperature, chunk_size):
    g = torch.Generator().manual_seed(k)
    train_x, test_x = torch.randn(200, 16, generator=g), torch.randn(60, 16, generator=g)
    train_y = torch.randint(0, 5, (200,), generator=g)
    want_pred, want_votes = _naive_knn(train_x.numpy(), train_y.numpy(), test_x.numpy(), k, temperature, 5)
    got = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=5, chunk_size=chunk_size)
    assert got.dtype == torch.int64 and got.shape == (60,)
    np.testing.assert_array_equal(got.numpy(), want_pred)
    # the votes too, not only their argmax (k=500 > 200 train samples: every sample votes)
    votes = knn_scores(train_x, train_y, test_x, k, temperature, 5, chunk_size)
    np.testing.assert_allclose(votes.numpy(), want_votes, rtol=1e-4)
    test_y = torch.randint(0, 5, (60,), generator=g)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=temperature) == pytest.approx(
        float((want_pred == test_y.numpy()).mean()))


def test_separated_clusters_are_classified_perfectly():
    train_x, train_y = clusters(30, 4, 8, noise=0.3, seed=0)
    test_x, test_y = clusters(20, 4, 8, noise=0.3, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20) == 1.0
    # cosine, not euclidean: scaling a sample does not change its neighbours
    assert knn_accuracy(train_x * 100, train_y, test_x * 0.01, test_y, k=20) == 1.0


def test_random_labels_give_chance_accuracy():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    train_y, test_y = torch.randint(0, 4, (2000,), generator=g), torch.randint(0, 4, (1000,), generator=g)
    acc = knn_accuracy(train_x, train_y, test_x, test_y, k=20)
    assert 0.19 < acc < 0.31  # chance is 0.25; the standard error on 1000 samples is 0.014


def test_input_validation():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="same D"):
        knn_predict(x, y, torch.randn(3, 5))
    with pytest.raises(ValueError, match="train labels"):
        knn_predict(x, y[:5], x)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(x, y, x, temperature=0)


class _Recorder(nn.Module):
    """A backbone that records how it is called."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.calls: list[tuple[int, bool, bool]] = []  # (batch size, grad enabled, training)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((x.shape[0], torch.is_grad_enabled(), self.training))
        f = self.proj(x)
        return f, f * 2  # (features, projections) like SSLModel


def test_extract_features_batchwise_without_graph_and_restores_mode():
    x, y = clusters(25, 2, 8, noise=0.1, seed=0)
    backbone = _Recorder()
    backbone.train()
    feats, labels = extract_features(backbone, DataLoader(ClusterSet(x, y), batch_size=16))
    assert backbone.calls == [(16, False, False), (16, False, False), (16, False, False), (2, False, False)]
    assert backbone.training  # put back in train mode
    assert feats.shape == (50, 8) and feats.dtype == torch.float32 and not feats.requires_grad
    assert feats.grad_fn is None
    torch.testing.assert_close(feats, backbone.proj(x).detach())  # first element of the tuple, eval mode
    assert torch.equal(labels, y)

    backbone.eval()
    extract_features(backbone, [(x[:4], y[:4])], amp="bf16")  # tuple batches, CPU autocast
    assert not backbone.training  # an eval-mode model stays in eval mode
