"""Fetch a cohort from a PACS that speaks only classic DICOM: C-FIND to select, C-GET (or C-MOVE) to retrieve.

Selection is a study-level C-FIND with the study-level keys (study date, modalities in study), then series
level inside the matching studies only, then image level in the matching series (Study Root), each answer
re-checked here; retrieval is a C-GET per instance missing from the cache, so no C-MOVE destination (and no
firewall opening towards us) is needed, or C-MOVE where the PACS allows only that (:mod:`.dimse_move`). Each SOP class is offered
with every common transfer syntax as its own presentation context, so the PACS sends what it stores
without transcoding and the cache's folder index equals an export's.

A peer that misbehaves cannot hang or poison a run: each C-FIND and C-GET has an overall deadline (a peer
answering "pending" forever is aborted) and a C-FIND a cap on its results; a C-GET stores only the instance
it asked for, verified whole (:func:`~.local_copy.verify_instance`), and refuses anything else pushed at it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from ..data.cohort import CohortFilter
from ._deps import require
from .errors import PacsError
from .fetch import FetchStats, RemoteInstance
from .local_copy import DamagedInstance, LocalCopy

__all__ = ["DEFAULT_MAX_RESULTS", "default_deadline", "fetch_dimse", "parse_host_port"]

logger = logging.getLogger(__name__)

_MAX_CONTEXTS = 126  # 128 minus the query/retrieve model contexts
_PENDING = (0xFF00, 0xFF01)
#: results of one C-FIND above which the peer is taken as misbehaving, or the query as too wide
DEFAULT_MAX_RESULTS = 1_000_000
#: C-STORE status for an instance we refuse (not asked for, or not whole): "Cannot understand" (Cxxx failure)
_REFUSED = 0xC000


def default_deadline(timeout: float) -> float:
    """Seconds one C-FIND or one C-GET may take in all: 10 x the per-message ``timeout``, at least 2 minutes."""
    return max(120.0, 10.0 * float(timeout))


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


def _no_delay(assoc) -> None:
    """TCP_NODELAY on the association's socket: a DIMSE request is several small writes (command, then data
    set), which Nagle's algorithm holds back until the PACS acknowledges the first; measured on Orthanc 1.10,
    one C-FIND takes 100 ms without it and 50 ms with it."""
    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def abort_now(assoc, wait: float = 1.0) -> None:
    """A-ABORT, then close the connection ourselves. pynetdicom's blocking ``abort()`` waits for the peer to
    close it, and its state machine only reads the A-ABORT's timer between incoming messages: a PACS still
    flooding 'pending' answers keeps our side waiting for as long as it floods (seen: 10 s, the flood's
    length). ``wait`` bounds how long the A-ABORT may take to leave before the socket is closed anyway."""
    assoc.abort(block=False)
    end = time.monotonic() + wait
    while assoc.dul.state_machine.current_state not in ("Sta1", "Sta13") and time.monotonic() < end:
        time.sleep(0.01)
    sock = assoc.dul.socket
    if sock is not None:
        sock.close()
    assoc.kill()


class _Dimse:
    """Association factory for one PACS, turning every failure into one clear line."""

    def __init__(self, host: str, port: int, calling_ae: str, called_ae: str, timeout: float,
                 deadline: float | None = None, max_results: int = DEFAULT_MAX_RESULTS) -> None:
        for flag, ae in (("--calling-ae", calling_ae), ("--called-ae", called_ae)):
            if not ae or len(ae) > 16 or "\\" in ae or not ae.isprintable():
                raise PacsError(f"{flag} {ae!r}: an AE title is 1 to 16 printable characters")
        self.host, self.port, self.calling, self.called, self.timeout = host, port, calling_ae, called_ae, timeout
        self.deadline = default_deadline(timeout) if deadline is None else deadline
        self.max_results = max_results
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
        require("pynetdicom")
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
            _no_delay(assoc)
            return assoc
        # A PACS refusing our AE titles may reject the association or abort it (Orthanc does either, depending
        # on timing): the same causes, so the same advice.
        how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "did not accept"
        raise PacsError(f"{self.name} {how} the association: check both AE titles and that the PACS knows our "
                        "calling AE (with this machine's address); the PACS's log says which")

    def find(self, assoc, identifier) -> list[Any]:
        require("pynetdicom")
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        out = []
        end = time.monotonic() + self.deadline
        for status, ds in assoc.send_c_find(identifier, FIND):
            code = getattr(status, "Status", None)
            if code is None:
                raise PacsError(f"{self.name}: the association broke during C-FIND (timeout or abort)")
            if code in _PENDING:
                if ds is None:  # pynetdicom could not decode the match: a cohort must not lose it silently
                    raise PacsError(f"{self.name} sent a C-FIND match that could not be decoded: check the PACS's log")
                out.append(ds)
                if time.monotonic() > end:
                    abort_now(assoc)
                    raise PacsError(f"{self.name} kept answering one C-FIND 'pending' for more than {self.deadline:g} s "
                                    f"({len(out)} results): aborted; the PACS is stalled or the query far too wide (the "
                                    "deadline is 10 x --timeout, at least 120 s)")
                if len(out) > self.max_results:
                    abort_now(assoc)
                    raise PacsError(f"{self.name} answered more than {self.max_results:,} results to one C-FIND: "
                                    "aborted; narrow the cohort filter (modality, body part, study date)")
            elif code == 0xFE00:  # "matching terminated due to cancel": the PACS's cap on answers (Orthanc)
                raise PacsError(f"{self.name} stopped answering a C-FIND after {len(out)} matches (status 0xFE00, "
                                "its limit on answers per query): narrow the cohort, e.g. --study-date")
            elif code != 0x0000:
                raise PacsError(f"{self.name} refused C-FIND (status 0x{code:04X}): check that the PACS allows our "
                                "calling AE to query")
        return out


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "") if ds is not None else ""
    return str(value).strip() if value is not None else ""


def select_dimse(pacs: _Dimse, cohort: CohortFilter, *, strategy: str = "study"
                 ) -> tuple[list[RemoteInstance], int, int]:
    """C-FIND (Study Root) in requests that grow with the cohort: the cohort's instances, study and series counts.

    ``strategy="study"``: study-level C-FIND with the study-level keys (StudyDate, ModalitiesInStudy: one query
    per modality), then series-level C-FIND (Modality, BodyPartExamined, SeriesDescription) only inside the
    matching studies, then image level only in the matching series; every answer is re-checked here.
    ``strategy="per-study"`` is the former walk (study level by date only, so every study's series are asked
    for), kept to measure against (``bench/bench_cohort_query.py``).
    """
    from pydicom import Dataset
    require("pynetdicom")
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    if strategy not in ("study", "per-study"):
        raise ValueError(f"strategy {strategy!r}: 'study' or 'per-study'")
    per_study = strategy == "per-study"
    study_queries = [{"StudyDate": cohort.dicom_date_range, "ModalitiesInStudy": ""}] if per_study else \
        cohort.study_queries()
    series_keys = cohort.server_keys()[1]
    if cohort.series_description and "\\" not in cohort.series_description and not per_study:
        series_keys["SeriesDescription"] = cohort.series_description.replace(" ", "?")
    assoc = pacs.associate([(FIND, _transfer_syntaxes()[:2])])
    try:
        studies: dict[str, Any] = {}
        for keys in study_queries:
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = ""
            q.StudyDate = keys["StudyDate"]
            q.ModalitiesInStudy = keys["ModalitiesInStudy"]
            q.PatientID = ""  # the cohort summary and the label join read these (never logged)
            q.AccessionNumber = ""
            for st in pacs.find(assoc, q):
                uid = _text(st, "StudyInstanceUID")
                if uid and cohort.match_study(_text(st, "StudyDate")) and (
                        per_study or cohort.match_modalities_in_study(st.get("ModalitiesInStudy"))):
                    studies.setdefault(uid, st)
        instances: list[RemoteInstance] = []
        n_series = 0
        for study_uid in studies:
            q = Dataset()
            q.QueryRetrieveLevel = "SERIES"
            q.StudyInstanceUID = study_uid
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
                q.StudyInstanceUID = study_uid
                q.SeriesInstanceUID = _text(se, "SeriesInstanceUID")
                q.SOPInstanceUID = ""
                q.SOPClassUID = ""
                for inst in pacs.find(assoc, q):
                    if _text(inst, "SOPInstanceUID"):
                        study = studies[study_uid]
                        instances.append(RemoteInstance(
                            study_uid, q.SeriesInstanceUID, _text(inst, "SOPInstanceUID"),
                            _text(inst, "SOPClassUID"), _text(study, "PatientID"), _text(study, "AccessionNumber"),
                            _text(study, "StudyDate"), _text(se, "Modality"), _text(se, "BodyPartExamined")))
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
    deadline: float | None = None,
    max_results: int = DEFAULT_MAX_RESULTS,
    progress: Callable[[int, int], None] | None = None,
    retrieve: str = "get",
    move_ae: str | None = None,
    move_port: int | None = None,
    select_only: bool = False,
) -> FetchStats:
    """Select the cohort on the PACS at ``address`` (``HOST:PORT``) and retrieve its instances missing from
    ``cache_dir``: by C-GET (``retrieve="get"``), or by C-MOVE to a Storage SCP this call runs on ``move_port``
    as ``move_ae`` (default: ``calling_ae``), which the PACS must know (:mod:`.dimse_move`); ``select_only``:
    select (``stats.selection``) and download nothing. Connection and association failures raise
    :class:`PacsError`; an instance the PACS fails to send (or sends damaged) is counted in ``failed`` (a later
    run fetches it); an instance pushed without being asked for is refused and counted in ``unrequested``.
    ``timeout``: seconds one message may wait; ``deadline``: seconds one C-FIND or C-GET may take in all
    (default :func:`default_deadline`); ``max_results``: results one C-FIND may give."""
    from pydicom import Dataset
    require("pynetdicom")
    from pynetdicom import evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    t0 = time.perf_counter()
    if retrieve not in ("get", "move"):
        raise PacsError(f"--retrieve {retrieve!r}: 'get' (C-GET) or 'move' (C-MOVE)")
    if retrieve == "move" and move_port is None:
        raise PacsError("--retrieve move needs --move-port: the port the PACS's entry for our AE names")
    host, port = parse_host_port(address)
    pacs = _Dimse(host, port, calling_ae, called_ae, timeout, deadline, max_results)
    cohort = cohort or CohortFilter()
    cache = LocalCopy(cache_dir)
    stats = FetchStats(server=pacs.name, partial_removed=cache.clean_partial())
    instances, stats.studies, stats.series = select_dimse(pacs, cohort)
    stats.instances, stats.selection = len(instances), instances
    if select_only:
        return stats
    todo = cache.to_fetch(instances, stats)
    if retrieve == "move":
        from .dimse_move import move_instances

        stats.fetched, stats.failed = move_instances(pacs, cache, instances, todo, move_ae or calling_ae,
                                                     move_port, _transfer_syntaxes(), progress) if todo else (0, 0)
        stats.seconds = round(time.perf_counter() - t0, 3)
        return stats
    received: set[str] = set()
    asked: dict[str, RemoteInstance] = {}  # the instance of the C-GET in flight: the only one accepted

    def on_store(event) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
        inst = asked.get(sop_uid)
        if inst is None:  # pushed without being asked for (another patient's, perhaps): never stored
            stats.unrequested += 1
            return _REFUSED
        try:
            cache.write(sop_uid, event.encoded_dataset(include_meta=True), study_uid=inst.study_uid,
                        series_uid=inst.series_uid)
        except DamagedInstance:
            stats.rejected += 1
            return _REFUSED
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
                asked.clear()
                asked[inst.sop_uid] = inst
                end = time.monotonic() + pacs.deadline
                for status, _ in assoc.send_c_get(q, GET):
                    last = getattr(status, "Status", None)
                    if last is None:
                        raise PacsError(f"{pacs.name}: the association broke during C-GET (timeout or abort)")
                    if time.monotonic() > end:
                        abort_now(assoc)
                        raise PacsError(f"{pacs.name} did not finish one C-GET within {pacs.deadline:g} s: aborted; "
                                        "the PACS is stalled or far too slow (the deadline is 10 x --timeout, at least 120 s)")
                asked.clear()
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
    if stats.unrequested:
        logger.warning("%s pushed %d instance(s) that were not requested: refused, not stored", pacs.name,
                       stats.unrequested)
    stats.seconds = round(time.perf_counter() - t0, 3)
    return stats
