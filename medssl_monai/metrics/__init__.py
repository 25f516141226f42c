"""Metrics as plain functions and Ignite/MONAI metrics: classification (accuracy, balanced accuracy, AUCs),
k-NN accuracy of frozen features, and representation similarity (linear CKA, SVCCA)."""

from .classification import (
    ClassAUCMetric,
    accuracy,
    attach_classification_metrics,
    balanced_accuracy,
    classification_metrics,
    confusion_matrix,
    ignite_pred_label,
    metric_name,
    multilabel_auc,
    per_class_auc,
    pred_label_transform,
    roc_auc_ovr,
)
from .knn import extract_features, knn_accuracy, knn_predict, knn_scores
from .similarity import (
    collect_activations,
    conv_to_matrix,
    linear_cka,
    stage_similarity,
    svcca,
    svd_reduce,
)

__all__ = [
    "ClassAUCMetric",
    "accuracy",
    "attach_classification_metrics",
    "balanced_accuracy",
    "classification_metrics",
    "collect_activations",
    "confusion_matrix",
    "conv_to_matrix",
    "extract_features",
    "ignite_pred_label",
    "knn_accuracy",
    "knn_predict",
    "knn_scores",
    "linear_cka",
    "metric_name",
    "multilabel_auc",
    "per_class_auc",
    "pred_label_transform",
    "roc_auc_ovr",
    "stage_similarity",
    "svcca",
    "svd_reduce",
]
