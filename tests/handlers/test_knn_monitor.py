"""KNNMonitor: its value in ``engine.state.metrics``, logged by MONAI's StatsHandler and TensorBoardStatsHandler."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import StatsHandler, TensorBoardStatsHandler
from references import ClusterSet, clusters
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from medssl_monai.handlers import KNNMonitor


def _monitor(interval: int = 2) -> KNNMonitor:
    train_x, train_y = clusters(20, 3, 8, noise=0.2, seed=0)
    val_x, val_y = clusters(10, 3, 8, noise=0.2, seed=1)
    return KNNMonitor(
        nn.Identity(),
        DataLoader(ClusterSet(train_x, train_y), batch_size=8, shuffle=True),  # iterating draws from torch RNG
        DataLoader(ClusterSet(val_x, val_y), batch_size=8),
        interval=interval, k=5, name="knn_top1",
    )


def _train(handlers: list, max_epochs: int = 4) -> tuple[Engine, torch.Tensor, list[dict]]:
    """A 3-iteration-per-epoch engine drawing training randomness; records the metrics seen at each epoch end."""
    torch.manual_seed(0)
    draws = []
    engine = Engine(lambda e, b: draws.append(torch.rand(1)) or 0.0)
    for h in handlers:
        h.attach(engine)
    seen: list[dict] = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(dict(e.state.metrics)))
    engine.run(range(3), max_epochs=max_epochs)
    return engine, torch.cat(draws), seen


def test_monitor_value_in_state_metrics_only_at_its_epochs_and_training_rng_untouched():
    engine, draws, seen = _train([_monitor(interval=2)])
    assert seen == [{}, {"knn_top1": 1.0}, {}, {"knn_top1": 1.0}]  # no stale value between evaluations
    assert engine.state.metrics["knn_top1"] == 1.0
    _, draws_without, _ = _train([])
    assert torch.equal(draws, draws_without)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_monitor_value_reaches_tensorboard_event_file_and_log_through_monai_handlers(tmp_path):
    """Listed before MONAI's Stats/TensorBoard handlers (as the bundles do), its value is logged by them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = SummaryWriter(log_dir=str(tmp_path))
    stats = StatsHandler(name="knn_test", iteration_log=False, output_transform=lambda out: None)
    tb = TensorBoardStatsHandler(summary_writer=writer, iteration_log=False, output_transform=lambda out: None)
    log = logging.getLogger("knn_test")
    lines_handler = _Lines()
    log.addHandler(lines_handler)
    log.setLevel(logging.INFO)
    try:
        _train([_monitor(interval=2), stats, tb])
    finally:
        log.removeHandler(lines_handler)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert "knn_top1" in acc.Tags()["scalars"]
    assert [(e.step, e.value) for e in acc.Scalars("knn_top1")] == [(2, pytest.approx(1.0)), (4, pytest.approx(1.0))]
    lines = [m for m in lines_handler.lines if "knn_top1" in m]
    assert len(lines) == 2 and all("knn_top1: 1.0000" in m for m in lines), lines
    assert lines[0].startswith("Epoch[2]") and lines[1].startswith("Epoch[4]")


def test_monitor_is_near_chance_for_random_labels():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 16, generator=g)
    y = torch.randint(0, 2, (600,), generator=g)
    monitor = KNNMonitor(nn.Identity(), [{"image": x[:400], "label": y[:400]}],
                         [{"image": x[400:], "label": y[400:]}], k=20)
    assert 0.38 < monitor.compute() < 0.62


def test_monitor_rejects_bad_interval():
    with pytest.raises(ValueError, match="interval"):
        KNNMonitor(nn.Identity(), [], [], interval=0)


def test_bundle_knn_monitor_runs_on_rank_0_only(monkeypatch):
    """Under DDP only rank 0 logs, so the other ranks skip the (identical) k-NN pass."""
    import ignite.distributed as idist
    from conftest import require_data

    from medssl_monai.bundle import knn_monitor
    from medssl_monai.data import ImageCacheSpec
    from medssl_monai.networks import get_backbone

    natural = require_data("imagenette")
    net = get_backbone("cbr_tiny")
    kw = {"dataset_dir": natural, "interval": 1, "image_cache": ImageCacheSpec(image_size=16), "max_images": 20}
    assert isinstance(knn_monitor(net, **kw), KNNMonitor)
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    off = knn_monitor(net, **kw)
    assert not isinstance(off, KNNMonitor)
    engine = Engine(lambda e, b: None)
    off.attach(engine)
    engine.run(range(2), max_epochs=1)
    assert "knn_top1" not in engine.state.metrics
