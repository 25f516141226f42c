"""ViewPairsImageHandler, read back from a real TensorBoard event file."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from medssl_monai.handlers.view_pairs import ViewPairsImageHandler, view_pairs_grid

B, H, W = 5, 6, 7


def _batches(channels: int, n: int = 3) -> list[dict]:
    """Batch j: view_1 is black with one white pixel at column j of row 0; view_2 is uniformly 0.5."""
    out = []
    for j in range(n):
        v1 = torch.zeros(B, channels, H, W)
        v1[:, :, 0, j] = 1.0
        out.append({"view_1": v1, "view_2": torch.full((B, channels, H, W), 0.5), "label": torch.zeros(B)})
    return out


def _read_images(logdir, tag: str) -> list:
    acc = EventAccumulator(str(logdir), size_guidance={IMAGES: 0})
    acc.Reload()
    assert tag in acc.Tags()["images"], acc.Tags()
    return acc.Images(tag)


@pytest.mark.parametrize("channels", [1, 3])
def test_pairs_are_written_to_a_real_event_file(tmp_path, channels):
    writer = SummaryWriter(log_dir=str(tmp_path))
    engine = Engine(lambda e, b: None)
    ViewPairsImageHandler(writer, max_pairs=3, interval_epochs=2, tag="train/views").attach(engine)
    engine.run(_batches(channels), max_epochs=5)
    writer.close()

    events = _read_images(tmp_path, "train/views")
    assert [e.step for e in events] == [1, 3, 5]  # epochs 1, 3, 5: once each, not once per iteration
    gap = 2
    want_h, want_w = 3 * H + 2 * gap, 2 * W + gap  # 3 pairs stacked, two views side by side
    assert all((e.height, e.width) == (want_h, want_w) for e in events)

    img = np.asarray(Image.open(io.BytesIO(events[0].encoded_image_string)).convert("RGB"))
    assert img.shape == (want_h, want_w, 3)
    for row in range(3):
        top = row * (H + gap)
        left, right = img[top:top + H, :W], img[top:top + H, W + gap:]
        assert (left[0, 0] == 255).all()  # first iteration's batch (bright pixel at column 0)
        assert (left[0, 1:] == 0).all() and (left[1:] == 0).all()
        # joint min-max over the pair: the flat 0.5 view is mid-grey (per-image scaling would make it black)
        assert np.all(np.abs(right.astype(int) - 128) <= 1)
        assert (img[top:top + H, W:W + gap] == 255).all()  # white separator between the views


def test_rgb_views_keep_their_colours(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    engine = Engine(lambda e, b: None)
    red = torch.zeros(2, 3, H, W)
    red[:, 0] = 1.0
    blue = torch.zeros(2, 3, H, W)
    blue[:, 2] = 1.0
    ViewPairsImageHandler(writer, max_pairs=8).attach(engine)  # more pairs asked than the batch has
    engine.run([{"view_1": red, "view_2": blue}], max_epochs=2)
    writer.close()

    events = _read_images(tmp_path, "views")
    assert [e.step for e in events] == [1, 2]
    assert (events[0].height, events[0].width) == (2 * H + 2, 2 * W + 2)
    img = np.asarray(Image.open(io.BytesIO(events[0].encoded_image_string)).convert("RGB"))
    assert (img[:H, :W] == [255, 0, 0]).all()
    assert (img[:H, W + 2:] == [0, 0, 255]).all()


def test_grid_handles_volumes_odd_channels_and_constant_images():
    vol = torch.arange(2 * 1 * 4 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 4, 5)
    grid = view_pairs_grid(vol, vol, max_pairs=1)
    assert grid.shape == (1, 4, 2 * 4 + 2)  # middle slice of the last axis
    assert 0.0 <= grid.min() and grid.max() <= 1.0
    two_channel = view_pairs_grid(torch.rand(3, 2, 4, 4), torch.rand(3, 2, 4, 4))
    assert two_channel.shape == (1, 3 * 4 + 2 * 2, 2 * 4 + 2)
    flat = view_pairs_grid(torch.full((1, 1, 3, 3), 7.0), torch.full((1, 1, 3, 3), 7.0))
    assert torch.isfinite(flat).all() and flat[:, :, :3].eq(0).all()


def test_batch_without_views_is_skipped_with_a_warning(caplog):
    class Writer:
        calls = 0

        def add_image(self, *args, **kwargs):
            Writer.calls += 1

    engine = Engine(lambda e, b: None)
    ViewPairsImageHandler(Writer()).attach(engine)
    with caplog.at_level(logging.WARNING):
        engine.run([{"image": torch.zeros(2, 1, 4, 4)}], max_epochs=1)
    assert Writer.calls == 0
    assert "no ('view_1', 'view_2')" in caplog.text
