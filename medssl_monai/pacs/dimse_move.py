"""C-MOVE retrieval: many PACS send images only to a destination they know (C-MOVE), not back on the query's
own association (C-GET).

For the duration of the retrieve a pynetdicom Storage SCP listens on ``move_port`` under ``move_ae``; the PACS
must list that AE title with this machine's address and port (its "modality" or "remote AE" table), which is
why an unknown destination is reported as such. Received instances go to the same local copy as C-GET's
(atomic, one file per SOP Instance UID), so resume and the folder index behave the same; only instances this
run asked for are accepted. A series whose every selected instance is missing moves in one request, the
rest instance by instance.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from ._deps import require
from .errors import PacsError
from .fetch import RemoteInstance
from .local_copy import DamagedInstance, LocalCopy

__all__ = ["move_instances"]

logger = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
_UNKNOWN_DESTINATION = 0xA801


def _storage_scp(move_ae: str, move_port: int, classes: Sequence[str], syntaxes: list[str], timeout: float,
                 on_store: Callable[[Any], int], on_connect: Callable[[Any], None]):
    require("pynetdicom")
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    ae = AE(ae_title=move_ae)
    ae.require_called_aet = True  # associations addressed to another AE title are refused
    for attr in ("acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, attr, timeout)
    for abstract in dict.fromkeys([c.abstract_syntax for c in AllStoragePresentationContexts] + list(classes)):
        ae.add_supported_context(abstract, syntaxes)
    try:
        return ae.start_server(("", move_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store),
                                                                          (evt.EVT_CONN_OPEN, on_connect)])
    except OSError as err:
        raise PacsError(f"cannot listen on port {move_port} for C-MOVE ({err.strerror or type(err).__name__}): "
                        "choose a free --move-port that the PACS's entry for our AE names") from None


def move_instances(pacs, cache: LocalCopy, selected: Sequence[RemoteInstance], todo: Sequence[RemoteInstance],
                   move_ae: str, move_port: int, syntaxes: list[str],
                   progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """C-MOVE ``todo`` (a subset of the ``selected`` cohort) to our Storage SCP into ``cache``; returns
    (fetched, failed). ``pacs`` is the :class:`~medssl_monai.pacs.dimse._Dimse` of the query."""
    from pydicom import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    require("pynetdicom")
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    if not move_ae or len(move_ae) > 16 or "\\" in move_ae or not move_ae.isprintable():
        raise PacsError(f"--move-ae {move_ae!r}: an AE title is 1 to 16 printable characters")
    if not isinstance(move_port, int) or not 0 < move_port < 65536:
        raise PacsError(f"--move-port {move_port!r}: give the port the PACS sends C-MOVE results to (1-65535)")
    wanted = {i.sop_uid: i for i in todo}
    received: set[str] = set()
    connections = [0]  # how often the PACS connected to our Storage SCP
    lock = threading.Lock()

    def on_connect(event) -> None:
        with lock:
            connections[0] += 1

    def on_store(event) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        inst = wanted.get(sop_uid)
        if inst is None:
            return 0xC000  # not part of this retrieve: refused, nothing written
        try:  # verified before it is stored: whole, and the instance of the study and series asked for
            cache.write(sop_uid, event.encoded_dataset(include_meta=True), study_uid=inst.study_uid,
                        series_uid=inst.series_uid)
        except DamagedInstance:
            return 0xC000
        except (OSError, ValueError):
            return 0xA700  # out of resources: the PACS reports a failed sub-operation
        with lock:
            received.add(sop_uid)
        return 0x0000

    per_series: dict[tuple[str, str], list[RemoteInstance]] = defaultdict(list)
    for inst in todo:
        per_series[(inst.study_uid, inst.series_uid)].append(inst)
    size = defaultdict(int)
    for inst in selected:
        size[(inst.study_uid, inst.series_uid)] += 1
    requests: list[tuple[str, str, str, list[RemoteInstance]]] = []  # (level, study, series, instances)
    for (study, series), insts in per_series.items():
        if len(insts) == size[(study, series)] and len(insts) > 1:
            requests.append(("SERIES", study, series, insts))
        else:
            requests += [("IMAGE", study, series, [i]) for i in insts]

    scp = _storage_scp(move_ae, move_port, sorted({i.sop_class_uid for i in todo if i.sop_class_uid}), syntaxes,
                       pacs.timeout, on_store, on_connect)
    fetched = failed = 0
    try:
        assoc = pacs.associate([(MOVE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
        try:
            for level, study, series, insts in requests:
                q = Dataset()
                q.QueryRetrieveLevel = level
                q.StudyInstanceUID = study
                q.SeriesInstanceUID = series
                if level == "IMAGE":
                    q.SOPInstanceUID = insts[0].sop_uid
                last = None
                for status, _ in assoc.send_c_move(q, move_ae, MOVE):
                    last = getattr(status, "Status", None)
                    if last is None:
                        raise PacsError(f"{pacs.name}: the association broke during C-MOVE (timeout or abort)")
                with lock:
                    got = sum(1 for i in insts if i.sop_uid in received)
                    anything, connected = bool(received), connections[0] > 0
                failed_move = last not in _PENDING and last not in (0x0000, 0xB000)
                if last == _UNKNOWN_DESTINATION or (failed_move and not anything and not connected):
                    # 0xA801, or (Orthanc) 0xC000 without ever connecting to us: the PACS has no entry for our AE
                    raise PacsError(f"{pacs.name} does not know the C-MOVE destination AE {move_ae!r} (status "
                                    f"0x{last or 0:04X}, no connection reached our port {move_port}): the PACS "
                                    f"must list AE {move_ae} with this machine's address and port {move_port}; ask "
                                    "its administrator, or use --retrieve get")
                if failed_move and not anything:
                    raise PacsError(f"{pacs.name} connected to our C-MOVE destination AE {move_ae} on port "
                                    f"{move_port} but sent nothing (status 0x{last or 0:04X}): check the PACS's "
                                    f"entry for AE {move_ae} (AE title, port) and its log")
                fetched += got
                failed += len(insts) - got
                if got < len(insts):
                    logger.warning("the PACS did not send %d instance(s) (C-MOVE status 0x%04X)", len(insts) - got,
                                   last or 0)
                if progress:
                    progress(len(insts), len(todo))
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        scp.shutdown()
    return fetched, failed
