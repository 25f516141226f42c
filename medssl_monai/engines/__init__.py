"""Training engines: the contrastive step and trainer (phases 1-2) and the bundles' AMP setting.

Handlers the bundles attach to these (and to MONAI's) engines are in :mod:`medssl_monai.handlers`, metrics in
:mod:`medssl_monai.metrics`.
"""

from .amp import amp_dtype, autocast_kwargs
from .contrastive import ContrastiveTrainer
from .step import ContrastiveStep

__all__ = ["ContrastiveStep", "ContrastiveTrainer", "amp_dtype", "autocast_kwargs"]
