"""Training engines: the contrastive step and trainer (phases 1-2), fine-tuning (phase 3), metrics, handlers."""

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
from .finetune import (
    CLASS_WEIGHT_MODES,
    EncodeLabeld,
    IndexCrossEntropyLoss,
    LabelEncoder,
    MultiHotBCEWithLogitsLoss,
    build_finetune,
    class_weights,
    select_labelled,
)
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
    "CLASS_WEIGHT_MODES",
    "ClassAUCMetric",
    "ConfusionMatrixWriter",
    "ContrastiveStep",
    "ContrastiveTrainer",
    "EncodeLabeld",
    "IndexCrossEntropyLoss",
    "KNNMonitor",
    "LabelEncoder",
    "MultiHotBCEWithLogitsLoss",
    "RNGState",
    "ReseedEachEpoch",
    "TrainingCheckpoint",
    "UnsafeCheckpointError",
    "ViewPairsImageHandler",
    "accuracy",
    "attach_classification_metrics",
    "balanced_accuracy",
    "build_finetune",
    "class_weights",
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
    "select_labelled",
    "view_pairs_grid",
]
