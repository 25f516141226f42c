"""k-NN accuracy of the frozen backbone during SSL pretraining, as an epoch metric of the trainer.

The maths is :mod:`medssl_monai.metrics.knn`; this handler runs it every ``interval`` epochs and puts the
value into ``engine.state.metrics``, where MONAI's ``StatsHandler`` and ``TensorBoardStatsHandler`` log it
with the trainer's other epoch metrics (tag: the metric's name, step: the epoch), as MONAI's own metric
handlers do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..metrics.knn import extract_features, knn_accuracy
from ..utils.rng import RNGState

__all__ = ["KNNMonitor"]


class KNNMonitor:
    """Ignite handler: top-1 weighted-kNN accuracy of the frozen backbone every ``interval`` epochs.

    Features of ``train_loader`` form the bank, ``val_loader`` is classified against it; the accuracy goes to
    ``engine.state.metrics[name]``. Attach it *before* ``StatsHandler`` / ``TensorBoardStatsHandler``: Ignite
    runs ``EPOCH_COMPLETED`` handlers in the order they were attached, and those log the metrics present when
    they run. The value is dropped again at the next ``EPOCH_STARTED``, so the epochs between evaluations log
    nothing instead of repeating the last value.

    The global RNGs (torch, numpy, python) are saved before and restored after the evaluation: iterating a
    ``DataLoader`` draws a seed from torch's RNG, and a monitor must not change the training run it watches
    (nor break the bit-exact resume of :class:`~medssl_monai.handlers.TrainingCheckpoint`).

    Args:
        backbone: the feature extractor (``(N, ...) -> (N, D)``), typically ``ssl_model.backbone``.
        train_loader, val_loader: labelled loaders without random augmentation (dicts with ``image_key`` and
            ``label_key``, or ``(image, label)`` pairs).
        interval: epochs between evaluations.
        k, temperature: as :func:`~medssl_monai.metrics.knn_predict` (solo-learn defaults).
        device: where the backbone runs and the kNN is computed.
        name: metric name (and so the TensorBoard tag).
        amp: ``None``, ``"bf16"`` or ``"fp16"`` autocast for the forward passes.
        num_classes: number of classes (default: the largest label seen + 1).
    """

    def __init__(
        self,
        backbone: nn.Module,
        train_loader: Iterable,
        val_loader: Iterable,
        interval: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        device: torch.device | str = "cpu",
        name: str = "knn_top1",
        image_key: str = "image",
        label_key: str = "label",
        amp: Literal["bf16", "fp16", "none"] | None = None,
        num_classes: int | None = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.backbone = backbone
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.interval = interval
        self.k = k
        self.temperature = temperature
        self.device = torch.device(device)
        self.name = name
        self.image_key = image_key
        self.label_key = label_key
        self.amp = amp
        self.num_classes = num_classes

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._drop_previous)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def _drop_previous(self, engine: Engine) -> None:
        engine.state.metrics.pop(self.name, None)

    def compute(self) -> float:
        """kNN top-1 accuracy of the backbone now (RNG state preserved)."""
        rng = RNGState()
        saved = rng.state_dict()
        try:
            kw = {"device": self.device, "image_key": self.image_key, "label_key": self.label_key, "amp": self.amp}
            bank, bank_labels = extract_features(self.backbone, self.train_loader, **kw)
            query, query_labels = extract_features(self.backbone, self.val_loader, **kw)
            num_classes = self.num_classes
            if num_classes is None:
                num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
            return knn_accuracy(bank.to(self.device), bank_labels, query, query_labels, k=self.k,
                                temperature=self.temperature, num_classes=num_classes)
        finally:
            rng.load_state_dict(saved)

    def __call__(self, engine: Engine) -> None:
        engine.state.metrics[self.name] = self.compute()
