"""Classifier results back to the PACS: one DICOM Comprehensive SR per classified image.

Radiologists and viewers look in the PACS, not in a CSV. Each SR is a TID 1500 Measurement Report holding
one TID 1501 measurement group: the predicted class as a coded finding and every class probability as a
numeric measurement, the algorithm's identity (bundle name, version, SHA-256 of its weights) and DICOM's
own research flag (Content Qualification ``RESEARCH``). It references the source image by its ORIGINAL
Study/Series/SOP Instance UIDs and joins the source's study and patient, which a pseudonymised run only
knows through its private path map (pseudonym -> cached file -> header); without that map the command
refuses. SR UIDs derive from the weights' checksum and the source instance, so sending the results again
replaces them instead of adding copies.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..data.credentials import Credentials, make_session, server_name
from ..data.manifest import PATHMAP_PREFIX, atomic_write_bytes, atomic_write_text, pathmap_path, read_manifest
from ..data.pacs_errors import PacsError, describe_http_error

__all__ = ["CODING_SCHEME", "ModelIdentity", "model_identity", "results_to_dicom", "run_results_to_pacs", "stow_files"]

logger = logging.getLogger(__name__)

#: Private coding scheme of the class concepts (``C<i>``: class i; ``P<i>``: probability of class i).
CODING_SCHEME = "99MEDSSL"


@dataclass(frozen=True)
class ModelIdentity:
    """What produced the results: shown to whoever reads the SR."""

    name: str
    version: str
    weights_sha256: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(bundle_root: str | os.PathLike) -> ModelIdentity:
    """Name and version from the bundle's ``configs/metadata.json``, checksum of ``models/model.pt``."""
    root = Path(bundle_root)
    meta_file, weights = root / "configs" / "metadata.json", root / "models" / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the bundle has no trained weights (train it first)")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return ModelIdentity(str(meta.get("name") or root.name), str(meta.get("version") or "unknown"), _sha256(weights))


def _source_files(manifest: Path, sop_uids: list[str]) -> dict[str, str]:
    """Pseudonymised (or plain) SOP UID -> the source file, through the private path map when keyed."""
    raw = read_manifest(manifest, resolve_paths=False)
    keyed = raw["path"].str.startswith(PATHMAP_PREFIX).fillna(False)
    if keyed.any() and not pathmap_path(manifest).is_file():
        raise PacsError(f"{manifest} is pseudonymised and its private pseudonym map {pathmap_path(manifest)} is missing: "
                        "results can only go back to the original images through it")
    df = read_manifest(manifest)
    if "frame_index" in df.columns and df["frame_index"].notna().any():
        raise PacsError(f"{manifest} has one row per frame (--expand-frames): a per-image SR needs a per-instance "
                        "manifest")
    by_sop = df.drop_duplicates("sop_uid").set_index("sop_uid")["path"]
    missing = [u for u in sop_uids if u not in by_sop.index]
    if missing:
        raise PacsError(f"{len(missing)} predicted image(s) are not in {manifest} (e.g. {missing[0]}): give the "
                        "manifest the predictions were made from")
    return {u: str(by_sop[u]) for u in sop_uids}


#: Type 2 patient/study attributes (present, possibly empty): exports often omit them, highdicom copies them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def _evidence(path: str):
    """The source image's header, with missing type 2 patient/study attributes present and empty."""
    import pydicom

    source = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword in _TYPE2:
        if keyword not in source:
            setattr(source, keyword, "")
    return source


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix=None, entropy_srcs=list(parts))


def _build_sr(source, probs: dict[str, float], pred: str, model: ModelIdentity, series_uid: str, sop_uid: str,
              instance_number: int):
    import highdicom as hd
    from highdicom.sr import (
        AlgorithmIdentification,
        CodedConcept,
        ComprehensiveSR,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )
    from highdicom.sr.templates import DeviceObserverIdentifyingAttributes
    from pydicom.sr.codedict import codes

    classes = list(probs)
    algorithm = AlgorithmIdentification(name=model.name[:64], version=model.version[:64],
                                        parameters=[f"weights sha256 {model.weights_sha256}", "research use only"])
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=_uid("device", model.weights_sha256), name=model.name[:64], manufacturer_name="medssl-monai",
            model_name=model.version[:64]))
    measurements = [
        Measurement(name=CodedConcept(f"P{i}", CODING_SCHEME, f"Probability of {c}"[:64]), value=float(probs[c]),
                    unit=codes.UCUM.NoUnits, algorithm_id=algorithm)
        for i, c in enumerate(classes)
    ]
    # TID 1501's "Finding" (DCM 121071) row: the predicted class
    finding = CodedConcept(f"C{classes.index(pred)}", CODING_SCHEME, pred[:64])
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=_uid("tracking", sop_uid), identifier="image classification"),
        algorithm_id=algorithm, measurements=measurements, finding_type=finding,
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)])
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=device),
                               procedure_reported=codes.SCT.DiagnosticImaging, imaging_measurements=[group],
                               title=codes.DCM.ImagingMeasurementReport)
    scheme = hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=CODING_SCHEME, name="medssl-monai classifier classes")
    return ComprehensiveSR(
        evidence=[source], content=report, series_instance_uid=series_uid, series_number=9901,
        sop_instance_uid=sop_uid, instance_number=instance_number, manufacturer="medssl-monai",
        is_complete=True, content_qualification="RESEARCH", coding_schemes=[scheme],
        series_description=f"RESEARCH USE ONLY - {model.name}"[:64], software_versions=model.version[:64])


def results_to_dicom(predictions: str | os.PathLike, manifest: str | os.PathLike, bundle_root: str | os.PathLike,
                     out_dir: str | os.PathLike) -> pd.DataFrame:
    """Write one SR per row of ``predictions`` (the bundle's ``write_predictions`` CSV) into ``out_dir`` (0700),
    and ``out_dir/results.csv`` keyed by the original ``study_uid, series_uid, sop_uid``; returns that table.

    The SR files and the table carry original identifiers: they are meant for the PACS, and stay private.
    """
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines quote the source's original UIDs
    preds = pd.read_csv(predictions, dtype={"sop_uid": "string", "patient_id": "string", "pred": "string"})
    prob_cols = [c for c in preds.columns if c.startswith("prob_")]
    if preds.empty or not prob_cols or "sop_uid" not in preds.columns or "pred" not in preds.columns:
        raise ValueError(f"{predictions}: not a predictions CSV (needs sop_uid, prob_<class>..., pred)")
    classes = [c[len("prob_"):] for c in prob_cols]
    if preds["sop_uid"].duplicated().any():
        raise ValueError(f"{predictions}: an image appears twice (one row per frame?): one SR per image needs one row")
    unknown = sorted(set(preds["pred"].dropna()) - set(classes))
    if unknown:
        raise ValueError(f"{predictions}: predicted classes {unknown} have no probability column (multi-label?)")
    model = model_identity(bundle_root)
    files = _source_files(Path(manifest), list(preds["sop_uid"]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    rows = []
    numbers: dict[str, int] = {}
    for rec in preds.itertuples(index=False):
        rec = rec._asdict()
        source = _evidence(files[rec["sop_uid"]])
        study = str(source.StudyInstanceUID)
        series_uid = _uid("sr-series", model.weights_sha256, study)
        sop_uid = _uid("sr", model.weights_sha256, str(source.SOPInstanceUID))
        numbers[series_uid] = numbers.get(series_uid, 0) + 1
        probs = {c: float(rec[p]) for c, p in zip(classes, prob_cols)}
        sr = _build_sr(source, probs, str(rec["pred"]), model, series_uid, sop_uid, numbers[series_uid])
        path = out / f"{sop_uid}.dcm"
        buf = io.BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        atomic_write_bytes(path, buf.getvalue(), mode=0o600)
        rows.append({"study_uid": study, "series_uid": str(source.SeriesInstanceUID),
                     "sop_uid": str(source.SOPInstanceUID), **{p: rec[p] for p in prob_cols}, "pred": rec["pred"],
                     "sr_sop_uid": sop_uid, "sr_file": path.name})
    table = pd.DataFrame(rows)
    atomic_write_text(out / "results.csv", table.to_csv(index=False, float_format="%.6f"), mode=0o600)
    meta = {"model": model.name, "version": model.version, "weights_sha256": model.weights_sha256,
            "classes": classes, "images": len(table), "research_use_only": True}
    atomic_write_text(out / "results.meta.json", json.dumps(meta, indent=1) + "\n", mode=0o600)
    logger.info("wrote %d SR objects (%s %s) to %s", len(table), model.name, model.version, out)
    return table


def stow_files(url: str, files: list[str | os.PathLike], credentials: Credentials | None = None,
               ca_bundle: str | None = None, batch: int = 50, timeout: float = 60.0) -> int:
    """Send DICOM files to a DICOMweb server by STOW-RS; returns how many were sent."""
    import pydicom
    import requests
    from dicomweb_client import DICOMwebClient

    from ..data.dicomweb_source import quiet_client_loggers

    quiet_client_loggers()
    name = server_name(url)
    client = DICOMwebClient(url.rstrip("/"), session=make_session(credentials or Credentials(), ca_bundle),
                            timeout=timeout)
    client.set_http_retry_params(retry=False)  # a refused or failing server gives its one line at once
    sent = 0
    for i in range(0, len(files), batch):
        datasets = [pydicom.dcmread(f) for f in files[i : i + batch]]
        try:
            client.store_instances(datasets)
        except requests.RequestException as err:
            raise describe_http_error(name, err) from None
        sent += len(datasets)
    logger.info("sent %d SR objects to %s", sent, name)
    return sent


def run_results_to_pacs(spec: Mapping[str, Any], predict_root: Path, manifest: Path, run_dir: Path, base: Path,
                        force: bool = False) -> Path:
    """A pipeline's ``results_to_pacs`` phase: an SR per predicted image in ``run_dir/results_to_pacs``
    (private: original UIDs), sent by STOW-RS when ``spec`` has ``stow`` (a DICOMweb URL; ``auth_file`` and
    ``ca_bundle``, ``@``-relative to ``base``, optional). Credentials come from the environment or
    ``auth_file``, never from the config."""
    from ..data.credentials import load_credentials
    from ..experiments.config import resolve_path

    out = run_dir / "results_to_pacs"
    if (out / "results.csv").is_file() and not force:
        logger.info("results_to_pacs: %s exists, skipped (use --force to re-run)", out / "results.csv")
        return out
    unknown = sorted(set(spec) - {"stow", "auth_file", "ca_bundle"})
    if unknown:
        raise ValueError(f"phases.results_to_pacs: unknown keys {unknown} (stow, auth_file, ca_bundle); credentials "
                         "come from the environment or auth_file")
    auth_file, ca_bundle = (resolve_path(spec[k], base) if spec.get(k) else None for k in ("auth_file", "ca_bundle"))
    creds = load_credentials(auth_file) if spec.get("stow") else None
    table = results_to_dicom(Path(predict_root) / "output" / "predictions.csv", manifest, predict_root, out)
    print(f"[results_to_pacs] {len(table)} SR objects -> {out}", flush=True)
    if spec.get("stow"):
        sent = stow_files(spec["stow"], [out / f for f in table["sr_file"]], creds, ca_bundle)
        print(f"[results_to_pacs] sent (STOW-RS): {sent}", flush=True)
    return out
