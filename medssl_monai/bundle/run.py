"""Run-time helpers the bundles call from ``initialize``/``finalize``: logging, outputs, embeddings."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..data.privacy import silence_pydicom_logger
from ..data.run_context import (
    DEFAULT_MAX_BAD_IMAGES,
    BadImageSettings,
    RunContext,
    current_run,
    install_path_redaction,
    start_run,
)
from ..utils.atomic import atomic_write_text

__all__ = [
    "bundle_classes",
    "save_classifier_outputs",
    "save_pretraining_outputs",
    "setup_run",
    "write_embeddings",
    "write_metrics",
    "write_predictions",
]

logger = logging.getLogger(__name__)


def setup_run(output_dir: str | os.PathLike, log_name: str = "train.log", max_bad_images: float | None = None
              ) -> Path:
    """Create ``output_dir``, start this run's :class:`~medssl_monai.data.run_context.RunContext` and add a
    plain log file there (the console handler comes from logging.conf).

    The context holds what the run's logging and data wrappers share (redaction keys, bad-image settings,
    the log file handler); a second run in the same process starts a fresh one, so nothing of the first
    (keys, counts, its log file) reaches the second. Called again for the same folder and log, it keeps
    the run's keys and handler (only the bad-image settings start afresh).

    pydicom's logger is detached from these handlers: its warnings quote element values (patient names).
    Log records, warnings and a fatal traceback name the images of a pseudonymised manifest by their
    ``pm:`` keys, never their real paths (``privacy.install_path_redaction``). Unreadable images are skipped
    and listed in ``output_dir/bad_images.csv``; past ``max_bad_images`` (a count, or a fraction of each
    dataset; default 0.01) the run stops (``data.bad_images``).
    """
    import ignite.distributed as idist

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = idist.get_rank(), idist.get_world_size()
    if rank > 0:  # one log per process, rank 0 keeps the plain name
        log_name = f"{Path(log_name).stem}.rank{rank}{Path(log_name).suffix}"
    log_path = out / log_name
    root = logging.getLogger()
    settings = BadImageSettings(str(out / "bad_images.csv"),
                                DEFAULT_MAX_BAD_IMAGES if max_bad_images is None else max_bad_images)
    run = current_run()
    handler = next((h for h in root.handlers if isinstance(h, logging.FileHandler)
                    and Path(h.baseFilename) == log_path.resolve()), None)
    if handler is None or run.log_handler is not handler:  # a new run (the same one keeps its keys)
        if handler is None:
            handler = logging.FileHandler(log_path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(handler)
        run = start_run(RunContext(output_dir=out, log_handler=handler))
    run.bad_images = settings
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    silence_pydicom_logger()
    install_path_redaction()
    # MONAI announces at every import that an optional GPU codec is absent: noise in a CPU run's log
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    if world > 1:
        logger.info("rank %d of %d, backend %s, device %s", rank, world, idist.backend(), idist.device())
    return out


def _save_state(module: nn.Module, path: Path) -> None:
    from ..handlers.checkpoint import save_model_atomic

    save_model_atomic(module, path)


def save_pretraining_outputs(ssl_model: nn.Module, models_dir: str | os.PathLike) -> Path:
    """Write ``model.pt`` (the backbone: what the bundle's ``network_def`` is and what the next phase loads)
    and ``projection_head.pt`` (for SimCLRv2-style fine-tuning from a middle head layer), atomically."""
    from .distributed import is_main, unwrap

    models = Path(models_dir)
    if not is_main():
        return models / "model.pt"
    ssl_model = unwrap(ssl_model)
    models.mkdir(parents=True, exist_ok=True)
    _save_state(ssl_model.backbone, models / "model.pt")
    _save_state(ssl_model.projection_head, models / "projection_head.pt")
    logger.info("saved %s and %s", models / "model.pt", models / "projection_head.pt")
    return models / "model.pt"


@torch.no_grad()
def write_embeddings(network: nn.Module, loader: torch.utils.data.DataLoader, out_csv: str | os.PathLike,
                     device: torch.device | str = "cpu", id_keys: tuple[str, ...] = ("sop_uid", "patient_id")) -> Path:
    """Backbone features for every image of ``loader`` as a table: ``sop_uid, patient_id, f0 .. f{D-1}``."""
    network = network.to(device).eval()
    ids: dict[str, list[str]] = {k: [] for k in id_keys}
    feats: list[torch.Tensor] = []
    for batch in loader:
        if batch is None:  # only unreadable images in this batch (listed in bad_images.csv)
            continue
        feats.append(network(torch.as_tensor(batch["image"]).to(device)).float().cpu())
        for k in id_keys:
            ids[k].extend(map(str, batch[k]))
    table = torch.cat(feats).numpy()
    df = pd.DataFrame(table, columns=[f"f{i}" for i in range(table.shape[1])])
    for i, k in enumerate(id_keys):
        df.insert(i, k, ids[k])
    out = Path(out_csv)
    atomic_write_text(out, df.to_csv(index=False, float_format="%.6g"))
    logger.info("wrote %d embeddings of dimension %d to %s", len(df), table.shape[1], out)
    return out


def bundle_classes(bundle_root: str | os.PathLike) -> list[str]:
    """Class names of a classifier bundle: ``models/classes.json`` (written by training), else the metadata's
    output ``channel_def`` (what MONAI Label shows)."""
    root = Path(bundle_root)
    trained = root / "models" / "classes.json"
    if trained.is_file():
        return list(json.loads(trained.read_text()))
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    channel_def = next(iter(meta["network_data_format"]["outputs"].values()))["channel_def"]
    return [channel_def[str(i)] for i in range(len(channel_def))]


def save_classifier_outputs(network: nn.Module, classes: list[str], bundle_root: str | os.PathLike,
                            architecture: Mapping[str, Any] | None = None) -> Path:
    """``models/model.pt`` (the whole classifier), ``models/classes.json`` (logit order), with ``architecture``
    ``models/architecture.json`` (what rebuilds the network: a copied bundle's ``inference.json`` and
    ``evaluate.json`` read it), and the metadata's input/output ``num_channels``, input ``spatial_shape`` and
    output ``channel_def`` (what MONAI Label and ``verify_net_in_out`` read), all atomically."""
    from ..handlers.checkpoint import save_model_atomic
    from .distributed import is_main, unwrap

    root = Path(bundle_root)
    models = root / "models"
    if not is_main():
        return models / "model.pt"
    save_model_atomic(unwrap(network), models / "model.pt")
    atomic_write_text(models / "classes.json", json.dumps(list(classes), indent=1) + "\n")
    meta_file = root / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    out = next(iter(meta["network_data_format"]["outputs"].values()))
    out["num_channels"] = len(classes)
    out["channel_def"] = {str(i): c for i, c in enumerate(classes)}
    if architecture is not None:
        arch = {**dict(architecture), "classes": list(classes)}
        atomic_write_text(models / "architecture.json", json.dumps(arch, indent=1) + "\n")
        inp = next(iter(meta["network_data_format"]["inputs"].values()))
        channels = int(arch["in_channels"])
        inp["num_channels"] = channels
        inp["spatial_shape"] = [int(arch["image_size"])] * 2
        inp["channel_def"] = {"0": "R", "1": "G", "2": "B"} if channels == 3 else (
            {"0": "intensity"} if channels == 1 else {str(i): f"channel {i}" for i in range(channels)})
    atomic_write_text(meta_file, json.dumps(meta, indent=2) + "\n")
    logger.info("saved %s with classes %s", models / "model.pt", list(classes))
    return models / "model.pt"


@torch.no_grad()
def write_predictions(network: nn.Module, loader: torch.utils.data.DataLoader, classes: list[str],
                      out_csv: str | os.PathLike, device: torch.device | str = "cpu", multi_label: bool = False,
                      sources: pd.DataFrame | None = None) -> Path:
    """Class probabilities per image: ``sop_uid, patient_id, prob_<class>..., pred`` (CSV, atomic; any class
    name: the columns are written and read by name, never as identifiers).

    With ``sources`` (the manifest rows predicted on, paths resolved), each predicted image's file is
    fingerprinted into ``<out_csv stem>.sources.csv`` (``data.source_record``): what ``results-to-dicom``
    checks before it puts a result under that file's identity. Without it an older record is removed, so a
    record always describes the predictions beside it.
    """
    from ..data.source_record import source_record_path, write_source_record

    network = network.to(device).eval()
    rows = []
    for batch in loader:
        if batch is None:  # only unreadable images in this batch (listed in bad_images.csv)
            continue
        logits = network(torch.as_tensor(batch["image"]).to(device)).float()
        probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)
        for i, p in enumerate(probs.cpu().tolist()):
            row = {"sop_uid": batch["sop_uid"][i], "patient_id": batch["patient_id"][i]}
            row.update({f"prob_{c}": v for c, v in zip(classes, p)})
            row["pred"] = "|".join(c for c, v in zip(classes, p) if v >= 0.5) if multi_label \
                else classes[int(max(range(len(p)), key=p.__getitem__))]
            rows.append(row)
    out = Path(out_csv)
    columns = ["sop_uid", "patient_id", *(f"prob_{c}" for c in classes), "pred"]
    atomic_write_text(out, pd.DataFrame(rows, columns=columns).to_csv(index=False, float_format="%.6f"))
    logger.info("wrote class probabilities of %d images to %s", len(rows), out)
    if sources is not None:
        files = {str(r.get("sop_uid") or r["path"]): str(r["path"]) for r in sources.to_dict("records")}
        record = write_source_record(out, files, [r["sop_uid"] for r in rows])
        logger.info("recorded the fingerprints of %d source files in %s", len(rows), record)
    else:
        source_record_path(out).unlink(missing_ok=True)
    return out


def write_metrics(evaluator: Any, output_dir: str | os.PathLike) -> dict[str, float]:
    """The scalar metrics of an evaluator's last run as ``output_dir/metrics.json`` (atomic) and in the log."""
    metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float)) or
               (torch.is_tensor(v) and v.numel() == 1)}
    atomic_write_text(Path(output_dir) / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    logger.info("evaluation: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return metrics
