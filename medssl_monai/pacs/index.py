"""Index a PACS cohort: fetch it into the local copy (DICOMweb or DIMSE), then index the local copy as a folder.

Going through the folder index (same header reader, same grouping, same pseudonymisation, same cohort
filter applied to the headers) is what makes a network index produce exactly the manifest a folder index
of the same instances produces. Only the instances the PACS selects now are indexed: one that left the
selection (withdrawn, deleted or corrected in the PACS) leaves the manifest at the next index and is
counted as ``withdrawn``; :func:`prune_local_copy` then deletes its file. Every query, retrieve, prune and
purge is written to the local copy's audit log (:mod:`.audit`).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from ..data.cohort import CohortFilter
from ..data.dicom import IndexResult, index_tree
from ..data.manifest import pathmap_path
from ..data.pseudonymize import Pseudonymizer
from ._deps import DICOMWEB_PACKAGES, DIMSE_PACKAGES, require
from .audit import AuditLog
from .credentials import Credentials, server_name
from .dicomweb import fetch_dicomweb
from .dimse import fetch_dimse
from .errors import PacsError
from .fetch import FetchStats
from .local_copy import LocalCopy

__all__ = ["EmptyCohortError", "default_local_copy", "index_pacs", "prune_local_copy", "purge_local_copy"]

logger = logging.getLogger(__name__)


class EmptyCohortError(PacsError):
    """The PACS selected nothing: a wrong filter, server or account, never a cohort to train on."""


def default_local_copy(out: str | os.PathLike) -> Path:
    """``runs/x/manifest.csv`` -> ``runs/x/manifest.cache`` (private, 0700: it holds the original DICOM; the
    folder name is kept from before it was called the local copy, so existing runs resume)."""
    p = Path(out)
    return p.with_name(p.stem + ".cache")


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


def index_pacs(
    out: str | os.PathLike,
    *,
    dicomweb: str | None = None,
    dimse: str | None = None,
    cohort: CohortFilter | None = None,
    local_copy: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    credentials: Credentials | None = None,
    ca_bundle: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    calling_ae: str = "MEDSSL",
    called_ae: str = "ANY-SCP",
    download_workers: int = 4,
    timeout: float = 30.0,
    fetch_progress=None,
    count_only: bool = False,
    retrieve: str = "get",
    move_ae: str | None = None,
    move_port: int | None = None,
    **index_kwargs: Any,
) -> tuple[FetchStats, IndexResult | None]:
    """Fetch the cohort from ``dicomweb`` (a URL) or ``dimse`` (``HOST:PORT``) into ``local_copy`` (default
    :func:`default_local_copy`; ``cache`` is its former name), then :func:`~medssl_monai.data.dicom.index_tree`
    the selected instances of the local copy into ``out`` with the same cohort filter; ``index_kwargs`` go
    to ``index_tree`` (pseudonymizer, labels, ...).

    ``count_only``: select and return ``(stats, None)``, downloading and writing nothing but the audit line
    (``stats.selection`` holds the cohort for :func:`~medssl_monai.pacs.summary.summarize_selection`). An
    empty selection raises :class:`PacsError` (one line), as an empty cohort is a wrong filter or server.
    ``retrieve="move"`` (DIMSE only) fetches by C-MOVE to ``move_ae`` on ``move_port``.
    """
    if retrieve != "get" and dimse is None:
        raise ValueError("retrieve 'move' (C-MOVE) is for a DIMSE source (--dimse HOST:PORT)")
    if (dicomweb is None) == (dimse is None):
        raise ValueError("give exactly one of dicomweb (a URL) and dimse (HOST:PORT)")
    require(*(DICOMWEB_PACKAGES if dicomweb is not None else DIMSE_PACKAGES))  # before any folder or audit line
    if cache is not None:
        if local_copy is not None:
            raise ValueError("give local_copy (cache is its former name), not both")
        warnings.warn("index_pacs(cache=...) is now local_copy=...", DeprecationWarning, stacklevel=2)
        local_copy = cache
    cohort = cohort or CohortFilter()
    local_dir = Path(local_copy) if local_copy is not None else default_local_copy(out)
    pz: Pseudonymizer | None = index_kwargs.get("pseudonymizer")
    audit = AuditLog.for_local_copy(local_dir, pz)
    server = server_name(dicomweb) if dicomweb is not None else str(dimse)
    filt = cohort.as_dict()
    before = LocalCopy(local_dir, create=False).known() if local_dir.is_dir() else set()
    try:
        if dicomweb is not None:
            stats = fetch_dicomweb(dicomweb, local_dir, cohort, credentials, ca_bundle=ca_bundle,
                                   client_cert=client_cert, client_key=client_key, workers=download_workers, timeout=timeout, progress=fetch_progress,
                                   select_only=count_only)
        else:
            stats = fetch_dimse(dimse, local_dir, cohort, calling_ae=calling_ae, called_ae=called_ae,
                                timeout=timeout, progress=fetch_progress, select_only=count_only,
                                retrieve=retrieve, move_ae=move_ae, move_port=move_port)
    except BaseException as err:  # what did arrive before the failure is still on record
        try:
            arrived = LocalCopy(local_dir, create=False).known() - before if local_dir.is_dir() else set()
            audit.record("retrieve" if arrived else "query", server=server, cohort=filt,
                         counts={"fetched": len(arrived)}, instances=arrived, error=_first_line(err))
        except Exception as audit_err:  # the fetch's own error is what the user must see
            logger.warning("the audit log %s could not be written (%s)", audit.path, type(audit_err).__name__)
        raise
    selected = {i.sop_uid for i in stats.selection}
    audit.record("query", server=stats.server, cohort=filt,
                 counts={"studies": stats.studies, "series": stats.series, "instances": stats.instances},
                 instances=selected, count_only=count_only)
    copy = LocalCopy(local_dir)
    if not count_only:
        copy.record_selection(selected, audit.local_key().uid)
        fetched = (copy.known() - before) & selected
        if stats.fetched or stats.failed:
            audit.record("retrieve", server=stats.server, cohort=filt, instances=fetched,
                         counts={"fetched": stats.fetched, "already_local": stats.already_cached,
                                 "failed": stats.failed})
    stats.withdrawn = len(copy.withdrawn(selected))
    if not selected:
        where = f" matching {filt}" if filt else ""
        raise EmptyCohortError(f"{stats.server}: no instance{where}: the cohort is empty, nothing to index (check the "
                        "filters and the server)")
    if count_only:
        return stats, None
    result = index_tree(local_dir, out, cohort=cohort, include=copy.selected_files(selected), **index_kwargs)
    return stats, result


def prune_local_copy(local_copy: str | os.PathLike, pseudonymizer: Pseudonymizer | None = None) -> list[str]:
    """Delete the local copies of instances that left the last recorded selection (audited); their UIDs."""
    copy = LocalCopy(local_copy, create=False)
    if not copy.root.is_dir():
        raise ValueError(f"{copy.root}: no such local copy")
    audit = AuditLog.for_local_copy(copy.root, pseudonymizer)
    if copy.selection_file.exists() and not audit.key_path.exists():  # a new key would match nothing: delete all
        raise ValueError(f"{audit.key_path}: the key of the recorded selection is missing: run `medssl index` "
                         "against the PACS again (it records the selection anew), then prune")
    gone = copy.prune(audit.local_key().uid)
    audit.record(
        "prune", counts={"deleted": len(gone), "kept": len(copy.known())}, instances=gone,
        local_copy=copy.root.name)
    return gone


def purge_local_copy(local_copy: str | os.PathLike, manifest: str | os.PathLike | None = None,
                     salt: str | os.PathLike | None = None) -> dict[str, int]:
    """Delete the whole local copy, the manifest's private path map and, with ``salt``, the salt (the
    re-identification key): what a data-protection request to forget a cohort needs. Audited (hashed with
    the salt before it goes); the audit log and its key stay. Returns what was deleted, by kind."""
    copy = LocalCopy(local_copy, create=False)
    pz = None
    if salt is not None and Path(salt).is_file():
        from ..data.pseudonymize import load_or_create_salt

        pz = Pseudonymizer(load_or_create_salt(salt))
    audit = AuditLog.for_local_copy(copy.root, pz)
    uids = copy.purge()
    deleted = {"instances": len(uids), "path_map": 0, "salt": 0}
    if manifest is not None and pathmap_path(manifest).is_file():
        pathmap_path(manifest).unlink()
        deleted["path_map"] = 1
    if salt is not None and Path(salt).is_file():
        Path(salt).unlink()
        deleted["salt"] = 1
    audit.record("purge", counts=deleted, instances=uids, local_copy=copy.root.name)
    return deleted
