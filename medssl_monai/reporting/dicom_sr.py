"""Classifier results back to the PACS: one DICOM Comprehensive SR per classified image.

Radiologists and viewers look in the PACS, not in a CSV. Each SR is a TID 1500 Measurement Report holding
one TID 1501 measurement group: the predicted class as a coded finding and every class probability as a
numeric measurement, the algorithm's identity (bundle name, version, SHA-256 of its weights) and DICOM's
own research flag (Content Qualification ``RESEARCH``). It references the source image by its ORIGINAL
Study/Series/SOP Instance UIDs and joins the source's study and patient, which a pseudonymised run only
knows through its private path map (pseudonym -> cached file -> header); without that map the command
refuses. SR UIDs derive from the weights' checksum and the source instance (``sr_uids``), so sending the
results again re-sends the same objects instead of adding copies. Nothing is written until the whole input
is known good: the CSV against the bundle (``reporting.predictions``) and every source file against what was
predicted on (``data.source_record``).
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

from ..data.dicom.originals import PathMapError, source_files
from ..data.manifest import read_manifest
from ..data.source_record import fingerprint, read_source_record, source_record_path
from ..pacs._deps import require
from ..pacs.credentials import Credentials, make_session, server_name
from ..pacs.errors import PacsError, describe_http_error
from ..utils.atomic import atomic_write_bytes, atomic_write_text
from .predictions import Predictions, check_class_names, read_predictions, trained_classes

__all__ = ["CODING_SCHEME", "ModelIdentity", "derived_uid", "model_identity", "probability_meaning", "record_stow",
           "results_to_dicom", "run_results_to_pacs", "sr_uids", "stow_files"]

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
    df = read_manifest(manifest, resolve_paths=False)
    if "frame_index" in df.columns and df["frame_index"].notna().any():
        raise PacsError(f"{manifest} has one row per frame (--expand-frames): a per-image SR needs a per-instance "
                        "manifest")
    try:
        return source_files(manifest, sop_uids)
    except PathMapError as err:
        raise PacsError(str(err)) from None


#: Type 2 patient/study attributes (present, possibly empty): exports often omit them, highdicom copies them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def derived_uid(*parts: str) -> str:
    """A UUID-derived UID (``2.25.<128-bit integer>``, DICOM PS3.5 B.2) named by ``parts``: the first 128 bits
    of their SHA-256, with the RFC 9562 variant and version 8 (custom) bits set. The same parts always give
    the same UID; ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` would not (it ignores them)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()[:16]
    n = int.from_bytes(digest, "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)  # version 8
    n = (n & ~(0x3 << 62)) | (0x2 << 62)  # variant 10
    return f"2.25.{n}"


def sr_uids(source_study_uid: str, source_sop_uid: str, weights_sha256: str) -> tuple[str, str]:
    """The SR's Series and SOP Instance UIDs. The results series is one per (source study, model weights);
    the SR is one per (source instance, weights, results series): sending the same results again re-sends
    the same objects. The SR's Study Instance UID is the source's own (it is filed in the imaged study)."""
    series = derived_uid("medssl-sr-series", weights_sha256, source_study_uid)
    return series, derived_uid("medssl-sr-instance", source_sop_uid, weights_sha256, series)


def _build_sr(source, probs: dict[str, float], pred: str, model: ModelIdentity, series_uid: str, sop_uid: str,
              instance_number: int):
    require("highdicom")
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
            uid=derived_uid("medssl-device", model.weights_sha256), name=model.name[:64], manufacturer_name="medssl-monai",
            model_name=model.version[:64]))
    measurements = [
        Measurement(name=CodedConcept(f"P{i}", CODING_SCHEME, probability_meaning(c)), value=float(probs[c]),
                    unit=codes.UCUM.NoUnits, algorithm_id=algorithm)
        for i, c in enumerate(classes)
    ]
    # TID 1501's "Finding" (DCM 121071) row: the predicted class
    finding = CodedConcept(f"C{classes.index(pred)}", CODING_SCHEME, pred)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=derived_uid("medssl-tracking", sop_uid), identifier="image classification"),
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
        specific_character_set="ISO_IR 192",  # UTF-8: any class name, whatever the source's character set
        series_description=f"RESEARCH USE ONLY - {model.name}"[:64], software_versions=model.version[:64])


def probability_meaning(class_name: str) -> str:
    """The code meaning of a class's probability: "Probability of <class>" where it fits DICOM's 64
    characters, else the class name itself (which always fits: ``check_class_names``)."""
    text = f"Probability of {class_name}"
    return text if len(text) <= 64 else class_name


def _check_sources(predictions: Path, preds: Predictions, files: dict[str, str]) -> dict[str, Any]:
    """Prove every predicted file still holds what was predicted on (``data.source_record``): the headers of
    the good ones, read from the bytes that were checked; else one line counting those that do not."""
    record = read_source_record(predictions)
    headers: dict[str, Any] = {}
    unrecorded = moved = changed = unreadable = not_dicom = 0
    for row in preds.rows:
        if row.sop_uid not in record:
            unrecorded += 1
            continue
        try:
            fp = fingerprint(files[row.sop_uid], keep_header=True)
        except OSError:
            unreadable += 1
            continue
        content, uid = record[row.sop_uid]
        if fp.header is None and not uid:
            not_dicom += 1  # predicted on a PNG or NIfTI file: an SR needs a DICOM source
        elif fp.header is None or fp.uid_sha256 != uid:
            moved += 1
        elif fp.sha256 != content:
            changed += 1
        else:
            headers[row.sop_uid] = fp.header
    bad = unrecorded + moved + changed + unreadable + not_dicom
    if bad:
        parts = [f"{n} {what}" for n, what in ((moved, "hold another instance (another SOP Instance UID)"),
                                                (changed, "changed content"), (unreadable, "cannot be read"),
                                                (not_dicom, "are not DICOM"),
                                                (unrecorded, "were not in the prediction's record")) if n]
        raise PacsError(f"{predictions}: {bad} of {len(preds.rows)} source file(s) no longer hold the image they "
                        f"were predicted on ({', '.join(parts)}; record {source_record_path(predictions).name}): "
                        "nothing written; predict again on the files as they are now")
    return headers


def _with_type2(source):
    """The source image's header, with missing type 2 patient/study attributes present and empty."""
    for keyword in _TYPE2:
        if keyword not in source:
            setattr(source, keyword, "")
    return source


def results_to_dicom(predictions: str | os.PathLike, manifest: str | os.PathLike, bundle_root: str | os.PathLike,
                     out_dir: str | os.PathLike) -> pd.DataFrame:
    """Write one SR per row of ``predictions`` (the bundle's ``write_predictions`` CSV) into ``out_dir`` (0700),
    and ``out_dir/results.csv`` keyed by the original ``study_uid, series_uid, sop_uid``; returns that table.

    Everything is checked first (the CSV against the bundle's classes, every source file against the
    prediction's record) and every SR built in memory: a problem anywhere writes nothing. The SR files and
    the table carry original identifiers: they are meant for the PACS, and stay private.
    """
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # its INFO lines quote the source's original UIDs
    predictions = Path(predictions)
    classes = trained_classes(bundle_root)
    check_class_names(classes, Path(bundle_root) / "models" / "classes.json")
    preds = read_predictions(predictions, classes)
    model = model_identity(bundle_root)
    files = _source_files(Path(manifest), [r.sop_uid for r in preds.rows])
    headers = _check_sources(predictions, preds, files)
    built, rows = [], []
    numbers: dict[str, int] = {}
    for row in preds.rows:
        source = _with_type2(headers[row.sop_uid])
        study, source_sop = str(source.StudyInstanceUID), str(source.SOPInstanceUID)
        series_uid, sop_uid = sr_uids(study, source_sop, model.weights_sha256)
        numbers[series_uid] = numbers.get(series_uid, 0) + 1
        sr = _build_sr(source, row.probs, row.pred, model, series_uid, sop_uid, numbers[series_uid])
        buf = io.BytesIO()
        sr.save_as(buf, enforce_file_format=True)
        built.append((f"{sop_uid}.dcm", buf.getvalue()))
        rows.append({"study_uid": study, "series_uid": str(source.SeriesInstanceUID), "sop_uid": source_sop,
                     **{f"prob_{c}": row.probs[c] for c in classes}, "pred": row.pred, "sr_sop_uid": sop_uid,
                     "sr_file": f"{sop_uid}.dcm"})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    for name, data in built:
        atomic_write_bytes(out / name, data, mode=0o600)
    table = pd.DataFrame(rows)
    atomic_write_text(out / "results.csv", table.to_csv(index=False, float_format="%.6f"), mode=0o600)
    meta = {"model": model.name, "version": model.version, "weights_sha256": model.weights_sha256,
            "classes": classes, "images": len(table), "research_use_only": True}
    atomic_write_text(out / "results.meta.json", json.dumps(meta, indent=1, ensure_ascii=False) + "\n", mode=0o600)
    logger.info("wrote %d SR objects (%s %s) to %s", len(table), model.name, model.version, out)
    return table


def record_stow(server: str, sent: int, already: int, sop_uids: list[str], audit=None) -> None:
    """What one STOW-RS send did: the one place that records it (server name only, never credentials; the
    SR SOP Instance UIDs go to the audit log, which keeps them as keyed hashes)."""
    logger.info("STOW-RS %s: sent %d SR objects, %d of them already held by the server", server, sent, already)
    if audit is not None:
        audit.record("stow", server=server, counts={"sent": sent, "already_held": already}, instances=sop_uids)


def _already_stored(client, datasets: list, name: str) -> int:
    """How many of ``datasets`` the server holds already: one QIDO-RS request per SR series (per study).
    A server that does not answer QIDO-RS here is not counted (the send does not need it)."""
    require("requests")
    import requests

    wanted: dict[tuple[str, str], set[str]] = {}
    for ds in datasets:
        wanted.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), set()).add(str(ds.SOPInstanceUID))
    held = 0
    for (study, series), uids in wanted.items():
        try:
            found = client.search_for_instances(study_instance_uid=study, series_instance_uid=series,
                                                fields=["00080018"], get_remaining=True)
        except requests.RequestException as err:
            logger.info("%s: could not ask which SR objects it holds already (%s)", name, type(err).__name__)
            return 0
        held += len(uids & {str(f.get("00080018", {}).get("Value", [""])[0]) for f in found or []})
    return held


def stow_files(url: str, files: list[str | os.PathLike], credentials: Credentials | None = None,
               ca_bundle: str | None = None, batch: int = 50, timeout: float = 60.0,
               audit=None) -> tuple[int, int]:
    """Send DICOM files to a DICOMweb server by STOW-RS; returns (sent, how many it held already).

    A re-sent SOP Instance UID is the same object (DICOM): Orthanc answers it as stored and keeps its first
    copy unless ``OverwriteInstances`` is true, other archives ignore or reject it; counting them first says
    so instead of a silent "sent". ``audit``: a :class:`~medssl_monai.pacs.audit.AuditLog` that records the
    send (SR instances as keyed hashes).
    """
    import pydicom
    require("requests", "dicomweb_client")
    import requests
    from dicomweb_client import DICOMwebClient

    from ..pacs.dicomweb import quiet_client_loggers

    quiet_client_loggers()
    name = server_name(url)
    client = DICOMwebClient(url.rstrip("/"), session=make_session(credentials or Credentials(), ca_bundle),
                            timeout=timeout)
    client.set_http_retry_params(retry=False)  # a refused or failing server gives its one line at once
    sent = already = 0
    uids: list[str] = []
    for i in range(0, len(files), batch):
        datasets = [pydicom.dcmread(f) for f in files[i : i + batch]]
        already += _already_stored(client, datasets, name)
        try:
            client.store_instances(datasets)
        except requests.RequestException as err:
            raise describe_http_error(name, err) from None
        sent += len(datasets)
        uids.extend(str(ds.SOPInstanceUID) for ds in datasets)
    record_stow(name, sent, already, uids, audit)
    return sent, already


def run_results_to_pacs(spec: Mapping[str, Any], predict_root: Path, manifest: Path, run_dir: Path, base: Path,
                        force: bool = False) -> Path:
    """A pipeline's ``results_to_pacs`` phase: an SR per predicted image in ``run_dir/results_to_pacs``
    (private: original UIDs), sent by STOW-RS when ``spec`` has ``stow`` (a DICOMweb URL; ``auth_file`` and
    ``ca_bundle``, ``@``-relative to ``base``, optional). Credentials come from the environment or
    ``auth_file``, never from the config."""
    from ..experiments.config import resolve_path
    from ..pacs.credentials import load_credentials

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
        from ..pacs.audit import AuditLog
        from ..pacs.index import default_local_copy

        sent, already = stow_files(spec["stow"], [out / f for f in table["sr_file"]], creds, ca_bundle,
                                   audit=AuditLog.for_local_copy(default_local_copy(manifest)))
        print(f"[results_to_pacs] sent (STOW-RS): {sent} ({already} already held by the server)", flush=True)
    return out
