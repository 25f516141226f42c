"""ConfusionMatrixWriter: the CSV against explicit loops, a valid PNG, atomic replacement on every evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from ignite.engine import Engine
from PIL import Image
from references import ref_confusion

from medssl_monai.handlers import ConfusionMatrixWriter


def _engine(y, probs, batch=16):
    """An engine whose output looks like a MONAI evaluator's (decollated list of per-item dicts)."""
    y_t, p_t = torch.as_tensor(y), torch.as_tensor(probs, dtype=torch.float32)
    batches = [(p_t[i : i + batch], y_t[i : i + batch]) for i in range(0, len(y_t), batch)]

    def step(engine, b):
        p, t = b
        return [{"pred": p[i], "label": t[i]} for i in range(len(t))]

    return Engine(step), batches


def test_confusion_matrix_writer(tmp_path, multiclass_data):
    y, probs = multiclass_data
    names = ["akiec", "bcc", "bkl", "df"]
    engine, batches = _engine(y, probs)
    writer = ConfusionMatrixWriter(tmp_path / "out", names)
    writer.attach(engine)
    engine.run(batches)
    assert "confusion_matrix" not in engine.state.metrics  # kept out of the scalar metrics on purpose
    expected = ref_confusion(y.tolist(), probs.argmax(1).tolist(), 4)
    df = pd.read_csv(tmp_path / "out" / "confusion_matrix.csv", index_col=0)
    assert list(df.columns) == names and list(df.index) == names
    np.testing.assert_array_equal(df.to_numpy(), expected)
    np.testing.assert_array_equal(writer.matrix, expected)
    with Image.open(tmp_path / "out" / "confusion_matrix.png") as im:
        im.verify()
    with Image.open(tmp_path / "out" / "confusion_matrix.png") as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    files = sorted(p.name for p in (tmp_path / "out").iterdir())  # no temp files left behind
    assert files == ["confusion_matrix.csv", "confusion_matrix.png"]

    # a later evaluation replaces the files with its own counts
    engine.run(batches[:1])
    df2 = pd.read_csv(tmp_path / "out" / "confusion_matrix.csv", index_col=0)
    assert df2.to_numpy().sum() == len(batches[0][1])
