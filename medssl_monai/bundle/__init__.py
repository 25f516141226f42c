"""Factories and run-time helpers referenced by the bundles' configs (shared by all three bundles)."""

from .data import (
    classification_dataset,
    contrastive_dataset,
    eval_dataset,
    fit_classes,
    imagefolder_manifest,
    inference_items,
    knn_monitor,
    load_rows,
    make_loader,
)
from .distributed import (
    finalize_distributed,
    init_distributed,
    is_main,
    summary_writer,
    unwrap,
    world_size,
    wrap_ddp,
)
from .overrides import check_cli_overrides
from .run import (
    bundle_classes,
    evaluate_classifier,
    save_classifier_outputs,
    save_pretraining_outputs,
    setup_run,
    write_embeddings,
    write_predictions,
)
from .weights import classifier_def, load_pretrained

__all__ = [
    "bundle_classes",
    "check_cli_overrides",
    "classification_dataset",
    "classifier_def",
    "contrastive_dataset",
    "eval_dataset",
    "evaluate_classifier",
    "finalize_distributed",
    "fit_classes",
    "imagefolder_manifest",
    "inference_items",
    "init_distributed",
    "is_main",
    "knn_monitor",
    "load_pretrained",
    "load_rows",
    "make_loader",
    "save_classifier_outputs",
    "save_pretraining_outputs",
    "setup_run",
    "summary_writer",
    "unwrap",
    "world_size",
    "wrap_ddp",
    "write_embeddings",
    "write_predictions",
]
