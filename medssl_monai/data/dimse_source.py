"""Fetch a cohort from a PACS that speaks only classic DICOM: C-FIND to select, C-GET to retrieve.

The same walk as the DICOMweb source (study -> series -> instance, the cohort filter sent as matching keys
and re-checked here) over the Study Root query model; retrieval is a C-GET per instance missing from the
cache, so no C-MOVE destination (and no firewall opening towards us) is needed. Each SOP class is offered
with every common transfer syntax as its own presentation context, so the PACS sends what it stores
without transcoding and the cache's folder index equals an export's.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from .cohort import CohortFilter
from .dicom_cache import DicomCache
from .dicomweb_source import FetchStats, RemoteInstance
from .pacs_errors import PacsError

__all__ = ["fetch_dimse", "parse_host_port"]

logger = logging.getLogger(__name__)

_MAX_CONTEXTS = 126  # 128 minus the query/retrieve model contexts
_PENDING = (0xFF00, 0xFF01)


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port)."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PacsError(f"--dimse {text!r}: expected HOST:PORT, e.g. pacs.example.org:104")
    return host.strip("[]"), int(port)


def _quiet_pynetdicom() -> None:
    """pynetdicom logs datasets and association details (identifiers among them): keep them out of our logs."""
    lg = logging.getLogger("pynetdicom")
    lg.setLevel(logging.CRITICAL)
    lg.propagate = False


def _transfer_syntaxes() -> list[str]:
    from pydicom import uid

    return [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.RLELossless, uid.JPEGBaseline8Bit,
            uid.JPEGExtended12Bit, uid.JPEGLosslessSV1, uid.JPEGLossless, uid.JPEGLSLossless, uid.JPEGLSNearLossless,
            uid.JPEG2000Lossless, uid.JPEG2000, uid.DeflatedExplicitVRLittleEndian, uid.ExplicitVRBigEndian]


class _Dimse:
    """Association factory for one PACS, turning every failure into one clear line."""

    def __init__(self, host: str, port: int, calling_ae: str, called_ae: str, timeout: float) -> None:
        for flag, ae in (("--calling-ae", calling_ae), ("--called-ae", called_ae)):
            if not ae or len(ae) > 16 or "\\" in ae or not ae.isprintable():
                raise PacsError(f"{flag} {ae!r}: an AE title is 1 to 16 printable characters")
        self.host, self.port, self.calling, self.called, self.timeout = host, port, calling_ae, called_ae, timeout
        self.name = f"{host}:{port} (called AE {called_ae}, calling AE {calling_ae})"

    def _check_reachable(self) -> None:
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout):
                pass
        except TimeoutError:
            raise PacsError(f"{self.host}:{self.port} did not answer in {self.timeout:g} s: check the host, the "
                            "port and any firewall between us and the PACS") from None
        except OSError as err:
            raise PacsError(f"cannot connect to {self.host}:{self.port} ({err.strerror or type(err).__name__}): "
                            "check the host, the port and that the PACS's DICOM service is running") from None

    def associate(self, contexts: list[tuple[str, list[str]]], scp_classes: list[str] = (),
                  handlers: list | None = None):
        from pynetdicom import AE, build_role

        _quiet_pynetdicom()
        self._check_reachable()
        ae = AE(ae_title=self.calling)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, attr, self.timeout)
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, syntaxes)
        roles = [build_role(c, scp_role=True) for c in scp_classes]
        assoc = ae.associate(self.host, self.port, ae_title=self.called, ext_neg=roles or None,
                             evt_handlers=handlers or None)
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            raise PacsError(f"{self.name} rejected the association: check both AE titles and that the PACS knows our "
                            "calling AE (with this machine's address)")
        raise PacsError(f"{self.name} aborted the association: check the AE titles and the PACS's log")

    def find(self, assoc, identifier) -> list[Any]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        out = []
        for status, ds in assoc.send_c_find(identifier, FIND):
            code = getattr(status, "Status", None)
            if code is None:
                raise PacsError(f"{self.name}: the association broke during C-FIND (timeout or abort)")
            if code in _PENDING:
                if ds is not None:
                    out.append(ds)
            elif code != 0x0000:
                raise PacsError(f"{self.name} refused C-FIND (status 0x{code:04X}): check that the PACS allows our "
                                "calling AE to query")
        return out


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "") if ds is not None else ""
    return str(value).strip() if value is not None else ""


def select_dimse(pacs: _Dimse, cohort: CohortFilter) -> tuple[list[RemoteInstance], int, int]:
    """C-FIND at study, series and image level (Study Root): the cohort's instances, with study and series counts."""
    from pydicom import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    study_keys, series_keys = cohort.server_keys()
    assoc = pacs.associate([(FIND, _transfer_syntaxes()[:2])])
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        q.StudyDate = study_keys.get("StudyDate", "")
        studies = [s for s in pacs.find(assoc, q)
                   if _text(s, "StudyInstanceUID") and cohort.match_study(_text(s, "StudyDate"))]
        instances: list[RemoteInstance] = []
        n_series = 0
        for study in studies:
            q = Dataset()
            q.QueryRetrieveLevel = "SERIES"
            q.StudyInstanceUID = _text(study, "StudyInstanceUID")
            q.SeriesInstanceUID = ""
            q.Modality = series_keys.get("Modality", "")
            q.BodyPartExamined = series_keys.get("BodyPartExamined", "")
            q.SeriesDescription = series_keys.get("SeriesDescription", "")
            for se in pacs.find(assoc, q):
                if not _text(se, "SeriesInstanceUID") or not cohort.match_series(
                        _text(se, "Modality"), _text(se, "BodyPartExamined"), _text(se, "SeriesDescription")):
                    continue
                n_series += 1
                q = Dataset()
                q.QueryRetrieveLevel = "IMAGE"
                q.StudyInstanceUID = _text(study, "StudyInstanceUID")
                q.SeriesInstanceUID = _text(se, "SeriesInstanceUID")
                q.SOPInstanceUID = ""
                q.SOPClassUID = ""
                for inst in pacs.find(assoc, q):
                    if _text(inst, "SOPInstanceUID"):
                        instances.append(RemoteInstance(q.StudyInstanceUID, q.SeriesInstanceUID,
                                                        _text(inst, "SOPInstanceUID"), _text(inst, "SOPClassUID")))
    finally:
        assoc.release()
    return list({i.sop_uid: i for i in instances}.values()), len(studies), n_series


def _class_groups(classes: list[str]) -> list[tuple[list[str], list[str]]]:
    """Split SOP classes into associations that fit the 128-context limit: (classes, transfer syntaxes)."""
    syntaxes = _transfer_syntaxes()
    per = max(1, _MAX_CONTEXTS // len(syntaxes))
    if len(classes) > per:  # many classes: offer only the uncompressed syntaxes, the PACS transcodes if it must
        syntaxes = syntaxes[:2]
        per = _MAX_CONTEXTS // len(syntaxes)
    return [(classes[i : i + per], syntaxes) for i in range(0, len(classes), per)]


def fetch_dimse(
    address: str,
    cache_dir: str | os.PathLike,
    cohort: CohortFilter | None = None,
    *,
    calling_ae: str = "MEDSSL",
    called_ae: str = "ANY-SCP",
    timeout: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> FetchStats:
    """Select the cohort on the PACS at ``address`` (``HOST:PORT``) and C-GET its instances missing from
    ``cache_dir``. Connection and association failures raise :class:`PacsError`; an instance the PACS fails to
    send is counted in ``failed`` (a later run fetches it)."""
    from pydicom import Dataset
    from pynetdicom import evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    t0 = time.perf_counter()
    host, port = parse_host_port(address)
    pacs = _Dimse(host, port, calling_ae, called_ae, timeout)
    cohort = cohort or CohortFilter()
    cache = DicomCache(cache_dir)
    stats = FetchStats(server=pacs.name, partial_removed=cache.clean_partial())
    instances, stats.studies, stats.series = select_dimse(pacs, cohort)
    stats.instances = len(instances)
    todo = [i for i in instances if not cache.has(i.sop_uid)]
    stats.already_cached = len(instances) - len(todo)
    logger.info("%s: %d instances selected, %d to fetch", pacs.name, len(instances), len(todo))
    received: set[str] = set()

    def on_store(event) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        try:
            cache.write(sop_uid, event.encoded_dataset(include_meta=True))
        except (OSError, ValueError):
            return 0xA700  # out of resources: the PACS reports a failed sub-operation
        received.add(sop_uid)
        return 0x0000

    from pydicom.uid import ImplicitVRLittleEndian

    classes = sorted({i.sop_class_uid for i in todo if i.sop_class_uid})
    for group, syntaxes in _class_groups(classes) if todo else []:
        contexts = [(GET, [ImplicitVRLittleEndian])] + [(c, [ts]) for c in group for ts in syntaxes]
        assoc = pacs.associate(contexts, scp_classes=group, handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            for inst in (i for i in todo if i.sop_class_uid in group):
                q = Dataset()
                q.QueryRetrieveLevel = "IMAGE"
                q.StudyInstanceUID = inst.study_uid
                q.SeriesInstanceUID = inst.series_uid
                q.SOPInstanceUID = inst.sop_uid
                last = None
                for status, _ in assoc.send_c_get(q, GET):
                    last = getattr(status, "Status", None)
                    if last is None:
                        raise PacsError(f"{pacs.name}: the association broke during C-GET (timeout or abort)")
                if inst.sop_uid in received:
                    stats.fetched += 1
                else:
                    stats.failed += 1
                    logger.warning("the PACS did not send an instance (C-GET status 0x%04X)", last or 0)
                if progress:
                    progress(1, len(todo))
        finally:
            if assoc.is_established:
                assoc.release()
    stats.failed += sum(1 for i in todo if not i.sop_class_uid)
    stats.seconds = round(time.perf_counter() - t0, 3)
    return stats
