"""Ignite handlers the bundles attach (one per file, each with ``attach(engine)``), in MONAI's handler style.

Values an engine should log go into ``engine.state.metrics`` (e.g. :class:`KNNMonitor`), where MONAI's
``StatsHandler`` and ``TensorBoardStatsHandler`` pick them up; files and images are written by the handler.
"""

from ..utils.rng import RNGState
from .checkpoint import TrainingCheckpoint, UnsafeCheckpointError, load_training_state, save_model_atomic
from .checkpoint_files import latest_checkpoint, list_checkpoints
from .confusion_matrix import ConfusionMatrixWriter, confusion_matrix_csv, confusion_matrix_png
from .evaluator_best import EvaluatorBest
from .knn_monitor import KNNMonitor
from .lr_logger import LearningRateLogger
from .metrics_csv import MetricsCSV, read_metrics_csv
from .reseed import ReseedEachEpoch
from .view_pairs import ViewPairsImageHandler, view_pairs_grid

__all__ = [
    "ConfusionMatrixWriter",
    "EvaluatorBest",
    "KNNMonitor",
    "LearningRateLogger",
    "MetricsCSV",
    "RNGState",
    "ReseedEachEpoch",
    "TrainingCheckpoint",
    "UnsafeCheckpointError",
    "ViewPairsImageHandler",
    "confusion_matrix_csv",
    "confusion_matrix_png",
    "latest_checkpoint",
    "list_checkpoints",
    "load_training_state",
    "read_metrics_csv",
    "save_model_atomic",
    "view_pairs_grid",
]
