"""Fetch a cohort from a DICOMweb PACS (QIDO-RS to select, WADO-RS to retrieve) into the local cache.

Selection asks for the cohort's series directly (one series-level QIDO-RS with the study date, modality,
body part and series description as matching keys, paged), then for the instances of those series only, so
its requests grow with the cohort, not with the archive; every answer is re-checked here. Retrieval asks
for each instance in its stored transfer syntax (``transfer-syntax=*``), so the cache holds what the PACS
holds and its folder index equals an export's; downloads run in a bounded thread pool with retries and
exponential backoff, and only instances not yet in the cache are fetched.

A server that misbehaves cannot hang, flood or poison a run: every request has an overall deadline and a
cap on its answer (:mod:`.http`), a QIDO-RS answer must be a JSON array of DICOM datasets, one search stops
at a cap on its results, a WADO-RS answer must be a whole multipart message (closing boundary included) and
the instance in it is verified before it enters the cache (:func:`~.local_copy.verify_instance`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import quote

from ..data.cohort import CohortFilter
from ._deps import require
from .credentials import Credentials, make_session, server_name
from .errors import PacsError, describe_http_error
from .fetch import FetchStats, RemoteInstance
from .local_copy import DamagedInstance, LocalCopy

__all__ = ["DEFAULT_MAX_RESULTS", "default_deadline", "fetch_dicomweb", "quiet_client_loggers", "select_dicomweb"]

logger = logging.getLogger(__name__)

_PAGE = 500
#: Every transfer syntax the PACS has stored the instance in: no transcoding on the server.
_WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: results of one search (all its pages) above which the server is taken as misbehaving, or the query as too wide
DEFAULT_MAX_RESULTS = 1_000_000
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def default_deadline(timeout: float) -> float:
    """Seconds one request may take in all: 10 x the per-read ``timeout``, at least 2 minutes."""
    return max(120.0, 10.0 * float(timeout))


_DEADLINE_HINT = " (the deadline is 10 x --timeout, at least 120 s)"


def _check_dicom_json(method: str, response) -> None:
    """A GET that asked for JSON (QIDO-RS, metadata) must get a JSON array of DICOM datasets (objects whose
    attributes are objects with an optional ``Value`` array), or :class:`MalformedAnswer`."""
    from .http import MalformedAnswer

    if method != "GET" or "json" not in response.request.headers.get("Accept", "") or not response.ok:
        return
    if not response.content:
        return  # 204 No Content: no match
    try:
        payload = json.loads(response.content)
    except ValueError:
        raise MalformedAnswer("answered a query with a body that is not JSON") from None
    if not isinstance(payload, list):
        raise MalformedAnswer(f"answered a query with {_JSON_NAMES.get(type(payload), 'a value')} instead of a "
                              "JSON array of DICOM datasets")
    for i, item in enumerate(payload):
        if not isinstance(item, dict):
            raise MalformedAnswer(f"answered a query with {_JSON_NAMES.get(type(item), 'a value')} as item {i} of "
                                  f"{len(payload)} instead of a DICOM dataset (a JSON object)")
        for tag, attr in item.items():
            if not isinstance(attr, dict) or not isinstance(attr.get("Value", []), list):
                raise MalformedAnswer(f"answered a query with a malformed attribute {str(tag)[:8]!r} in item {i} "
                                      "(DICOM JSON wants an object with a 'Value' array)")


def quiet_client_loggers() -> None:
    """dicomweb-client logs study UIDs at INFO level, and ``retrying`` (its retry decorator, even with retries
    off) logs every failed request's traceback, URL with UIDs included, at WARNING: keep them out of a
    pseudonymised run's logs (our own lines say what failed)."""
    for name, level in (("dicomweb_client", logging.WARNING), ("urllib3", logging.WARNING),
                        ("retrying", logging.ERROR)):
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.propagate = False


def _first(item: dict[str, Any], tag: str) -> str:
    value = (item.get(tag) or {}).get("Value") or [""]
    return str(value[0]).strip() if value[0] is not None else ""


_STUDY_UID, _SERIES_UID, _SOP_UID, _SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
_STUDY_DATE, _MODALITY, _BODY_PART, _SERIES_DESC = "00080020", "00080060", "00180015", "0008103E"
_PATIENT_ID, _ACCESSION = "00100020", "00080050"
_N_SERIES, _N_INSTANCES = "00201206", "00201209"  # NumberOfStudyRelatedSeries, NumberOfSeriesRelatedInstances


class _Server:
    """A DICOMweb service with retries, deadlines and caps; one HTTP session (and client) per thread."""

    def __init__(self, url: str, credentials: Credentials, ca_bundle: str | None, timeout: float, retries: int,
                 backoff: float, *, client_cert: str | None = None, client_key: str | None = None,
                 deadline: float | None = None, max_results: int = DEFAULT_MAX_RESULTS) -> None:
        self.url = url.rstrip("/")
        self.name = server_name(url)
        self.credentials = credentials
        self.ca_bundle = ca_bundle
        self.client_cert, self.client_key = client_cert, client_key
        self.timeout = timeout
        self.deadline = default_deadline(timeout) if deadline is None else deadline
        self.max_results = max_results
        self.retries = retries
        self.backoff = backoff
        self._local = threading.local()
        self.session()  # a missing CA bundle or client certificate is one line now, not in a worker thread

    def session(self):
        if not hasattr(self._local, "session"):
            session = make_session(self.credentials, self.ca_bundle, self.client_cert, self.client_key,
                                   deadline=self.deadline)
            session.answer_check = _check_dicom_json
            session.deadline_hint = _DEADLINE_HINT
            self._local.session = session
        return self._local.session

    def client(self):
        if not hasattr(self._local, "client"):
            require("dicomweb_client")
            from dicomweb_client import DICOMwebClient

            client = DICOMwebClient(self.url, session=self.session(), timeout=self.timeout)
            client.set_http_retry_params(retry=False)  # one retry policy (ours), bounded by ``retries``
            self._local.client = client
        return self._local.client

    def retried(self, fn: Callable[[], Any]) -> Any:
        """``fn()``; transient failures (connection, timeout, 429, 5xx, an answer cut short) are retried with
        exponential backoff, others (and a deadline, a cap, a malformed answer) become a :class:`PacsError` at once."""
        require("requests")
        import requests

        from .http import AnswerError

        for attempt in range(self.retries + 1):
            try:
                return fn()
            except requests.RequestException as err:
                status = err.response.status_code if getattr(err, "response", None) is not None else None
                transient = (status is None or status == 429 or status >= 500) and not isinstance(
                    err, (requests.exceptions.SSLError, requests.exceptions.InvalidURL, AnswerError))
                if not transient or attempt == self.retries:
                    raise describe_http_error(self.name, err) from None
                time.sleep(self.backoff * 2**attempt * (1 + random.random()))
        raise AssertionError("unreachable")

    def call(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a DICOMweb client method (a name, or a function taking the client first; see :meth:`retried`)."""

        def run() -> Any:
            client = self.client()
            fn = getattr(client, method) if isinstance(method, str) else functools.partial(method, client)
            return fn(*args, **kwargs)

        return self.retried(run)

    def search(self, method: str | Callable[..., Any], *args: Any, expected: int | None = None,
               **kwargs: Any) -> list[dict]:
        """A QIDO-RS search paged with limit/offset, so a server that caps its answers still gives everything.

        Servers cap a response below the asked ``limit`` (Google's Healthcare API, dcm4chee's maximum results;
        a short page then means "more may follow"), so a short page ends the search only when it is shorter
        than a page the server has already filled, or when it brings the answers to ``expected`` (a count the
        server gave, e.g. NumberOfSeriesRelatedInstances); otherwise one more page is asked for (an empty
        page, or repeated answers from a server that ignores ``offset``, end it).
        More than ``max_results`` results (paging that never ends) is a :class:`PacsError`."""
        results: list[dict] = []
        seen: set[str] = set()
        offset, filled = 0, None
        while True:
            page = self.call(method, *args, limit=_PAGE, offset=offset, **kwargs) or []
            fresh = [r for r in page if repr(sorted(r.items())) not in seen]
            for r in fresh:
                seen.add(repr(sorted(r.items())))
            results.extend(fresh)
            if len(results) > self.max_results:
                what = method if isinstance(method, str) else getattr(method, "__name__", "search")
                raise PacsError(f"{self.name} answered more than {self.max_results:,} results to one query "
                                f"({what.lstrip('_').removeprefix('search_for_').removeprefix('search_')}, {offset // _PAGE + 1} pages): "
                                "stopped; narrow the cohort filter (modality, body part, study date) or check the "
                                "server's paging")
            done = expected is not None and len(results) >= expected and len(page) < _PAGE
            if not fresh or done or (filled is not None and len(page) < filled):
                return results
            filled = max(filled or 0, len(page))
            offset += len(page)


def _search_series(client: Any, *, search_filters: dict[str, str] | None, fields: list[str], limit: int,
                   offset: int) -> list[dict]:
    """``GET {root}/series?...`` with ``*`` and ``?`` sent as they are: Orthanc 1.10 does not percent-decode
    query values, so dicomweb-client's ``%2A`` would match a literal ``%2A`` (and so nothing)."""
    params = [*(search_filters or {}).items(), *(("includefield", f) for f in fields), ("limit", limit),
              ("offset", offset)]
    query = "&".join(f"{k}={quote(str(v), safe='*?')}" for k, v in params)
    response = client._session.get(f"{client.base_url}/series?{query}", timeout=client._timeout,
                                   headers={"Accept": "application/dicom+json, application/json"})
    response.raise_for_status()
    if not response.content:
        return []
    return response.json()  # the session checked it: a JSON array of DICOM datasets


def _count(item: dict[str, Any], tag: str) -> int | None:
    text = _first(item, tag)
    return int(text) if text.isdigit() else None


def select_dicomweb(server: _Server, cohort: CohortFilter, *, strategy: str = "series"
                    ) -> tuple[list[RemoteInstance], int, int]:
    """The cohort's instances, with study and series counts, in requests that grow with the cohort.

    ``strategy="series"``: one series-level QIDO-RS (``/series``, paged) per :meth:`CohortFilter.series_queries`
    key set, with the study date, modality, body part and series description as matching keys; then the
    instances of each matching series only. Every answer is re-checked here. ``strategy="per-study"`` is the
    former walk (every study, then its series), kept to measure against (``bench/bench_cohort_query.py``).
    """
    if strategy == "per-study":
        return _select_per_study(server, cohort)
    if strategy != "series":
        raise ValueError(f"strategy {strategy!r}: 'series' or 'per-study'")
    fields = ["StudyInstanceUID", "StudyDate", "Modality", "BodyPartExamined", "SeriesDescription",
              "NumberOfSeriesRelatedInstances", "PatientID", "AccessionNumber"]
    selected: dict[str, tuple[str, int | None, dict]] = {}  # series UID -> (study UID, instance count, answer)
    undated: dict[str, tuple[str, int | None, dict]] = {}  # matching series whose answer lacks the study date
    for keys in cohort.series_queries():
        for se in server.search(_search_series, search_filters=keys or None, fields=fields):
            study_uid, series_uid = _first(se, _STUDY_UID), _first(se, _SERIES_UID)
            if not study_uid or not series_uid or not cohort.match_series(
                    _first(se, _MODALITY), _first(se, _BODY_PART), _first(se, _SERIES_DESC)):
                continue
            date = _first(se, _STUDY_DATE)
            if date or cohort.study_date is None:
                if cohort.match_study(date):
                    selected.setdefault(series_uid, (study_uid, _count(se, _N_INSTANCES), se))
            else:
                undated.setdefault(series_uid, (study_uid, _count(se, _N_INSTANCES), se))
    studies: dict[str, dict] = {}
    for study_uid in dict.fromkeys(s for s, _, _ in undated.values()):  # a server that omits study attributes
        found = server.search("search_for_studies", search_filters={"StudyInstanceUID": study_uid},
                              fields=["StudyDate", "PatientID", "AccessionNumber"], expected=1)
        studies[study_uid] = found[0] if found else {}
    for series_uid, (study_uid, n, se) in undated.items():
        study = studies.get(study_uid, {})
        if cohort.match_study(_first(study, _STUDY_DATE)):
            selected.setdefault(series_uid, (study_uid, n, {**se, **study}))
    instances = [inst for series_uid, (study_uid, n, se) in selected.items()
                 for inst in _series_instances(server, study_uid, series_uid, n, se)]
    unique = list({i.sop_uid: i for i in instances}.values())
    return unique, len({s for s, _, _ in selected.values()}), len(selected)


def _series_instances(server: _Server, study_uid: str, series_uid: str, expected: int | None = None,
                      series: dict[str, Any] | None = None) -> list[RemoteInstance]:
    """The instances of one series; ``series`` (its QIDO answer, with the study's attributes) gives what the
    cohort summary and the label join read: patient, accession number, study date, modality, body part."""
    found = server.search("search_for_instances", study_instance_uid=study_uid, series_instance_uid=series_uid,
                          fields=["SOPClassUID"], expected=expected)
    se = series or {}
    meta = (_first(se, _PATIENT_ID), _first(se, _ACCESSION), _first(se, _STUDY_DATE), _first(se, _MODALITY),
            _first(se, _BODY_PART))
    return [RemoteInstance(study_uid, series_uid, _first(i, _SOP_UID), _first(i, _SOP_CLASS), *meta)
            for i in found if _first(i, _SOP_UID)]


def _select_per_study(server: _Server, cohort: CohortFilter) -> tuple[list[RemoteInstance], int, int]:
    """The former walk: every study (date filter only), each study's series, the matching series' instances:
    one request per study in the archive. For the benchmark's baseline only."""
    study_keys, series_keys = cohort.server_keys()
    studies = server.search("search_for_studies", search_filters=study_keys or None,
                            fields=["StudyDate", "PatientID", "AccessionNumber", "NumberOfStudyRelatedSeries"])
    studies = [s for s in studies if _first(s, _STUDY_UID) and cohort.match_study(_first(s, _STUDY_DATE))]
    instances: list[RemoteInstance] = []
    n_series = 0
    for study in studies:
        study_uid = _first(study, _STUDY_UID)
        series = server.search("search_for_series", study_instance_uid=study_uid, search_filters=series_keys or None,
                               fields=["Modality", "BodyPartExamined", "SeriesDescription",
                                       "NumberOfSeriesRelatedInstances"],
                               expected=None if series_keys else _count(study, _N_SERIES))
        for se in series:
            series_uid = _first(se, _SERIES_UID)
            if not series_uid or not cohort.match_series(_first(se, _MODALITY), _first(se, _BODY_PART),
                                                         _first(se, _SERIES_DESC)):
                continue
            n_series += 1
            instances += _series_instances(server, study_uid, series_uid, _count(se, _N_INSTANCES),
                                           {**se, **{k: v for k, v in study.items() if k != _SERIES_UID}})
    unique = list({i.sop_uid: i for i in instances}.values())
    return unique, len(studies), n_series


def _single_part(response) -> bytes:
    """The one DICOM part of a WADO-RS multipart answer; an answer without its closing boundary (cut short,
    even with an honest Content-Length) or with another number of parts is :class:`IncompleteAnswer`."""
    from .http import IncompleteAnswer

    media_type, *params = [p.strip() for p in response.headers.get("Content-Type", "").split(";")]
    body = response.content
    if media_type.lower() == "application/dicom":
        return body  # a single instance sent bare
    if media_type.lower() != "multipart/related":
        raise IncompleteAnswer(f"answered a retrieve with {media_type or 'no content type'!r}, not multipart/related")
    boundary = next((v.strip('"') for k, _, v in (p.partition("=") for p in params) if k.strip().lower() == "boundary"),
                    "")
    if not boundary:
        raise IncompleteAnswer("sent a multipart answer without a boundary")
    marker = b"--" + boundary.encode("latin-1")
    first = body.find(marker)
    close = body.rfind(b"\r\n" + marker + b"--")
    if first < 0 or close < first:
        raise IncompleteAnswer("sent a multipart answer without its closing boundary (cut short)")
    parts = body[first + len(marker):close].split(b"\r\n" + marker)
    if len(parts) != 1:
        raise IncompleteAnswer(f"sent {len(parts)} parts for one instance")
    _head, sep, content = parts[0].partition(b"\r\n\r\n")
    if not sep:
        raise IncompleteAnswer("sent a multipart part without headers")
    return content


def _retrieve(server: _Server, cache: LocalCopy, inst: RemoteInstance) -> None:
    """WADO-RS one instance in its stored transfer syntax and store the bytes as sent, once verified whole and
    the instance asked for (an answer that is not is retried, then counted as failed)."""
    from .http import IncompleteAnswer

    if not all(_UID_RE.fullmatch(u) for u in (inst.study_uid, inst.series_uid)):
        raise DamagedInstance("the server's study or series UID is not a DICOM UID")
    cache.path_for(inst.sop_uid)  # refuses a SOP Instance UID that is no UID, before any request
    url = f"{server.url}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"

    def once() -> None:
        response = server.session().get(url, headers={"Accept": _WADO_ACCEPT}, timeout=server.timeout)
        response.raise_for_status()
        try:
            cache.write(inst.sop_uid, _single_part(response), study_uid=inst.study_uid, series_uid=inst.series_uid)
        except DamagedInstance as err:
            raise IncompleteAnswer(f"sent an instance that is not whole or not the one asked for ({err})") from None

    server.retried(once)


def fetch_dicomweb(
    url: str,
    cache_dir: str | os.PathLike,
    cohort: CohortFilter | None = None,
    credentials: Credentials | None = None,
    *,
    ca_bundle: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    workers: int = 4,
    retries: int = 3,
    timeout: float = 30.0,
    deadline: float | None = None,
    max_results: int = DEFAULT_MAX_RESULTS,
    backoff: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
    select_only: bool = False,
) -> FetchStats:
    """Select the cohort on ``url`` and download its instances missing from ``cache_dir``.

    Args:
        url: the DICOMweb root, e.g. ``https://pacs.example.org/dicom-web`` (no credentials in it).
        credentials: from :func:`~medssl_monai.data.credentials.load_credentials`.
        ca_bundle: PEM file of the hospital's CA; TLS verification is always on, and this file wins over
            ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``.
        client_cert, client_key: PEM client certificate (and its private key) for mutual TLS.
        timeout: seconds one socket read may wait; ``deadline``: seconds one request may take in all
            (default :func:`default_deadline`); ``max_results``: results one search may give.
        workers: parallel downloads (bounded, so a PACS is not flooded).
        retries: attempts after the first for connection errors, timeouts, HTTP 429 and 5xx.
        progress: called with (instances just done, instances to fetch).
        select_only: select (``stats.selection``) and download nothing (``--count-only``).

    Authentication and authorisation failures stop the fetch with a :class:`PacsError`; an instance that
    still fails after its retries is counted in ``failed`` (a later run fetches it).
    """
    t0 = time.perf_counter()
    quiet_client_loggers()
    cohort = cohort or CohortFilter()
    server = _Server(url, credentials or Credentials(), ca_bundle, timeout, retries, backoff, client_cert=client_cert,
                     client_key=client_key, deadline=deadline, max_results=max_results)
    cache = LocalCopy(cache_dir)
    stats = FetchStats(server=server.name, partial_removed=cache.clean_partial())
    instances, stats.studies, stats.series = select_dicomweb(server, cohort)
    stats.instances, stats.selection = len(instances), instances
    if select_only:
        return stats
    todo = cache.to_fetch(instances, stats)
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
                stats.rejected += err.incomplete
            logger.warning("an instance failed to download (%s)", str(err).removeprefix(server.name).strip(" :"))
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
