"""Training engines: the contrastive step and trainer (phases 1-2), fine-tuning handlers (phase 3), metrics."""

from .amp import amp_dtype, autocast_kwargs
from .checkpoint import (
    RNGState,
    TrainingCheckpoint,
    UnsafeCheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    save_model_atomic,
)
from .contrastive import ContrastiveTrainer
from .finetune import EvaluatorBest, LearningRateLogger
from .knn import KNNMonitor, extract_features, knn_accuracy, knn_predict
from .metrics import (
    ClassAUCMetric,
    ConfusionMatrixWriter,
    accuracy,
    attach_classification_metrics,
    balanced_accuracy,
    classification_metrics,
    confusion_matrix,
    multilabel_auc,
    roc_auc_ovr,
)
from .seeding import ReseedEachEpoch
from .step import ContrastiveStep
from .tb_images import ViewPairsImageHandler, view_pairs_grid

__all__ = [
    "ClassAUCMetric",
    "ConfusionMatrixWriter",
    "ContrastiveStep",
    "ContrastiveTrainer",
    "EvaluatorBest",
    "KNNMonitor",
    "LearningRateLogger",
    "RNGState",
    "ReseedEachEpoch",
    "TrainingCheckpoint",
    "UnsafeCheckpointError",
    "ViewPairsImageHandler",
    "accuracy",
    "amp_dtype",
    "attach_classification_metrics",
    "autocast_kwargs",
    "balanced_accuracy",
    "classification_metrics",
    "confusion_matrix",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "latest_checkpoint",
    "list_checkpoints",
    "load_training_state",
    "multilabel_auc",
    "roc_auc_ovr",
    "save_model_atomic",
    "view_pairs_grid",
]
