"""Layer-wise similarity between two checkpoints on a manifest's images (``medssl similarity``).

The CLI only parses flags; loading the two backbones strictly (a wrong architecture is an error, not a
silently half-loaded net) and feeding both the same shuffled rows lives here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from ..bundle.data import eval_dataset, load_rows
from ..data.bad_images import collate_readable
from ..metrics.similarity import stage_similarity
from ..networks import get_backbone, load_backbone_weights

__all__ = ["compare_checkpoints"]

logger = logging.getLogger(__name__)


def compare_checkpoints(ckpt_a: str, ckpt_b: str, manifest: str, *, backbone_a: str = "resnet18",
                        backbone_b: str | None = None, kwargs_a: Mapping[str, Any] | None = None,
                        kwargs_b: Mapping[str, Any] | None = None, split: str | None = None,
                        limit: int | None = None, image_size: int = 64, in_channels: int = 3,
                        method: str = "cka", mode: str = "pool", max_examples: int | None = None,
                        num_workers: int = 0, batch_size: int = 64) -> pd.DataFrame:
    """Per-stage similarity of ``ckpt_a`` and ``ckpt_b`` (each loaded strictly into its backbone).

    ``backbone_b`` defaults to ``backbone_a``, and ``kwargs_b`` to ``kwargs_a`` when the backbones are the
    same (a slimmed net compared with itself); the rows are shuffled once with a fixed seed so that
    ``max_examples`` takes a random subset, the same for both nets.
    """
    rows = load_rows(manifest=manifest, split=split, limit=limit)
    rows = rows.sample(frac=1.0, random_state=0)
    loader = torch.utils.data.DataLoader(eval_dataset(rows, image_size, in_channels), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate_readable)
    kw_a = dict(kwargs_a or {})
    same = backbone_b is None or backbone_b == backbone_a
    kw_b = dict(kwargs_b) if kwargs_b is not None else (kw_a if same else {})
    models = []
    for ckpt, name, kw in ((ckpt_a, backbone_a, kw_a), (ckpt_b, backbone_b or backbone_a, kw_b)):
        net = get_backbone(name, in_channels=in_channels, **kw)
        report = load_backbone_weights(net, ckpt, strict=True)
        logger.info("%s -> %s: %s", ckpt, name, report.summary())
        models.append(net.eval())
    return stage_similarity(models[0], models[1], loader, method=method, max_examples=max_examples, mode=mode,
                            name_a=ckpt_a, name_b=ckpt_b)
