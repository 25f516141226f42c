"""Fetch a cohort from a DICOMweb PACS (QIDO-RS to select, WADO-RS to retrieve) into the local cache.

Selection walks the DICOM hierarchy (studies matching the study date, their series matching modality, body
part and series description, their instances), with the cohort filter sent to the server and re-checked
here. Retrieval asks for each instance in its stored transfer syntax (``transfer-syntax=*``), so the cache
holds what the PACS holds and its folder index equals an export's; downloads run in a bounded thread pool
with retries and exponential backoff, and only instances not yet in the cache are fetched.
"""

from __future__ import annotations

import io
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from .cohort import CohortFilter
from .credentials import Credentials, make_session, server_name
from .dicom_cache import DicomCache
from .pacs_errors import PacsError, describe_http_error

__all__ = ["FetchStats", "RemoteInstance", "fetch_dicomweb", "select_dicomweb"]

logger = logging.getLogger(__name__)

_PAGE = 500
#: Every transfer syntax the PACS has stored the instance in: no transcoding on the server.
_ANY_SYNTAX = (("application/dicom", "*"),)


@dataclass(frozen=True)
class RemoteInstance:
    """One selected instance on the server (original UIDs: never logged, never written to a manifest)."""

    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    sop_uid: str = field(repr=False)
    sop_class_uid: str = field(default="", repr=False)


@dataclass
class FetchStats:
    """What a fetch did; counts only (the cohort's identifiers stay out of logs)."""

    server: str
    studies: int = 0
    series: int = 0
    instances: int = 0
    fetched: int = 0
    already_cached: int = 0
    failed: int = 0
    partial_removed: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.server}: {self.studies} studies, {self.series} series, {self.instances} instances selected; "
                f"{self.fetched} fetched, {self.already_cached} already cached, {self.failed} failed")


def quiet_client_loggers() -> None:
    """dicomweb-client logs study UIDs at INFO level: keep them out of a pseudonymised run's logs."""
    for name in ("dicomweb_client", "urllib3"):
        lg = logging.getLogger(name)
        lg.setLevel(logging.WARNING)
        lg.propagate = False


def _first(item: dict[str, Any], tag: str) -> str:
    value = (item.get(tag) or {}).get("Value") or [""]
    return str(value[0]).strip() if value[0] is not None else ""


_STUDY_UID, _SERIES_UID, _SOP_UID, _SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
_STUDY_DATE, _MODALITY, _BODY_PART, _SERIES_DESC = "00080020", "00080060", "00180015", "0008103E"


class _Server:
    """A DICOMweb service with retries; one client (and so one HTTP session) per thread."""

    def __init__(self, url: str, credentials: Credentials, ca_bundle: str | None, timeout: float, retries: int,
                 backoff: float) -> None:
        self.url = url.rstrip("/")
        self.name = server_name(url)
        self.credentials = credentials
        self.ca_bundle = ca_bundle
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._local = threading.local()

    def client(self):
        if not hasattr(self._local, "client"):
            from dicomweb_client import DICOMwebClient

            session = make_session(self.credentials, self.ca_bundle)
            client = DICOMwebClient(self.url, session=session, timeout=self.timeout)
            client.set_http_retry_params(retry=False)  # one retry policy (ours), bounded by ``retries``
            self._local.client = client
        return self._local.client

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a DICOMweb client method; transient failures (connection, timeout, 429, 5xx) are retried with
        exponential backoff, others become a :class:`PacsError` at once."""
        import requests

        for attempt in range(self.retries + 1):
            try:
                return getattr(self.client(), method)(*args, **kwargs)
            except requests.RequestException as err:
                status = err.response.status_code if getattr(err, "response", None) is not None else None
                transient = (status is None or status == 429 or status >= 500) and not isinstance(
                    err, requests.exceptions.SSLError) and not isinstance(err, requests.exceptions.InvalidURL)
                if not transient or attempt == self.retries:
                    raise describe_http_error(self.name, err) from None
                time.sleep(self.backoff * 2**attempt * (1 + random.random()))
        raise AssertionError("unreachable")

    def search(self, method: str, *args: Any, **kwargs: Any) -> list[dict]:
        """A QIDO-RS search paged with limit/offset (a server that caps its answers still gives everything)."""
        results: list[dict] = []
        seen: set[str] = set()
        offset = 0
        while True:
            page = self.call(method, *args, limit=_PAGE, offset=offset, **kwargs) or []
            fresh = [r for r in page if repr(sorted(r.items())) not in seen]
            for r in fresh:
                seen.add(repr(sorted(r.items())))
            results.extend(fresh)
            if len(page) < _PAGE or not fresh:  # the last page, or a server that ignores offset
                return results
            offset += len(page)


def select_dicomweb(server: _Server, cohort: CohortFilter) -> tuple[list[RemoteInstance], int, int]:
    """QIDO-RS at study, series and instance level: the cohort's instances, with study and series counts."""
    study_keys, series_keys = cohort.server_keys()
    studies = server.search("search_for_studies", search_filters=study_keys or None, fields=["StudyDate"])
    studies = [s for s in studies if _first(s, _STUDY_UID) and cohort.match_study(_first(s, _STUDY_DATE))]
    instances: list[RemoteInstance] = []
    n_series = 0
    for study in studies:
        study_uid = _first(study, _STUDY_UID)
        series = server.search("search_for_series", study_instance_uid=study_uid, search_filters=series_keys or None,
                               fields=["Modality", "BodyPartExamined", "SeriesDescription"])
        for se in series:
            series_uid = _first(se, _SERIES_UID)
            if not series_uid or not cohort.match_series(_first(se, _MODALITY), _first(se, _BODY_PART),
                                                         _first(se, _SERIES_DESC)):
                continue
            n_series += 1
            for inst in server.search("search_for_instances", study_instance_uid=study_uid,
                                      series_instance_uid=series_uid, fields=["SOPClassUID"]):
                sop_uid = _first(inst, _SOP_UID)
                if sop_uid:
                    instances.append(RemoteInstance(study_uid, series_uid, sop_uid, _first(inst, _SOP_CLASS)))
    unique = list({i.sop_uid: i for i in instances}.values())
    return unique, len(studies), n_series


def _retrieve(server: _Server, cache: DicomCache, inst: RemoteInstance) -> None:
    ds = server.call("retrieve_instance", inst.study_uid, inst.series_uid, inst.sop_uid, media_types=_ANY_SYNTAX)
    if str(getattr(ds, "SOPInstanceUID", "")) != inst.sop_uid:
        raise ValueError("the server returned another instance than requested")
    buf = io.BytesIO()
    # the Part 10 file as the PACS sent it: preamble, file meta and the stored transfer syntax kept
    ds.save_as(buf, enforce_file_format=bool(getattr(ds, "file_meta", None)))
    cache.write(inst.sop_uid, buf.getvalue())


def fetch_dicomweb(
    url: str,
    cache_dir: str | os.PathLike,
    cohort: CohortFilter | None = None,
    credentials: Credentials | None = None,
    *,
    ca_bundle: str | None = None,
    workers: int = 4,
    retries: int = 3,
    timeout: float = 30.0,
    backoff: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
) -> FetchStats:
    """Select the cohort on ``url`` and download its instances missing from ``cache_dir``.

    Args:
        url: the DICOMweb root, e.g. ``https://pacs.example.org/dicom-web`` (no credentials in it).
        credentials: from :func:`~medssl_monai.data.credentials.load_credentials`.
        ca_bundle: PEM file of the hospital's CA; TLS verification is always on.
        workers: parallel downloads (bounded, so a PACS is not flooded).
        retries: attempts after the first for connection errors, timeouts, HTTP 429 and 5xx.
        progress: called with (instances just done, instances to fetch).

    Authentication and authorisation failures stop the fetch with a :class:`PacsError`; an instance that
    still fails after its retries is counted in ``failed`` (a later run fetches it).
    """
    t0 = time.perf_counter()
    quiet_client_loggers()
    cohort = cohort or CohortFilter()
    server = _Server(url, credentials or Credentials(), ca_bundle, timeout, retries, backoff)
    cache = DicomCache(cache_dir)
    stats = FetchStats(server=server.name, partial_removed=cache.clean_partial())
    instances, stats.studies, stats.series = select_dicomweb(server, cohort)
    stats.instances = len(instances)
    todo = [i for i in instances if not cache.has(i.sop_uid)]
    stats.already_cached = len(instances) - len(todo)
    logger.info("%s: %d instances selected, %d to fetch", server.name, len(instances), len(todo))
    lock = threading.Lock()

    def one(inst: RemoteInstance) -> None:
        try:
            _retrieve(server, cache, inst)
            with lock:
                stats.fetched += 1
        except PacsError as err:
            if err.fatal:
                raise
            with lock:
                stats.failed += 1
            logger.warning("an instance failed to download (%s)", str(err).split(":", 1)[-1].strip())
        except Exception as err:  # a damaged answer: count it, keep going
            with lock:
                stats.failed += 1
            logger.warning("an instance could not be stored (%s)", type(err).__name__)
        if progress:
            progress(1, len(todo))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(one, inst) for inst in todo]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                for other in futures:
                    other.cancel()
                raise f.exception()
    stats.seconds = round(time.perf_counter() - t0, 3)
    return stats
