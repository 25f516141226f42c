"""HTTP for the DICOMweb client: every request has an overall deadline and a cap on its answer's size, and the
TLS settings given here win over the environment.

``requests``' ``timeout`` bounds each socket read, not a request: a server that drips one byte every few
seconds never trips it, and a body is read into memory whatever its size. So each request here runs under
a wall-clock watchdog that shuts the request's socket down when the deadline passes (which ends a blocked
read at once, in the headers as in the body), and the body is read in chunks against a cap (a declared
``Content-Length`` above the cap is refused before anything is read). ``requests`` also lets
``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` replace a session's ``verify`` (``merge_environment_settings``):
the CA bundle and client certificate set on a :class:`GuardedSession` are passed with every request, where
the environment cannot override them.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

from ._deps import require

require("requests", "urllib3")  # the PACS extra: one line naming it when it is missing

import requests  # noqa: E402
from requests.adapters import HTTPAdapter  # noqa: E402
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool  # noqa: E402

__all__ = [
    "DEFAULT_MAX_ANSWER_BYTES",
    "DEFAULT_MAX_JSON_BYTES",
    "AnswerError",
    "AnswerTooLarge",
    "DeadlineExceeded",
    "GuardedSession",
    "IncompleteAnswer",
    "MalformedAnswer",
    "TlsFailure",
]

#: one answer (a DICOM instance): 4 GiB, above any single radiograph or CT series instance
DEFAULT_MAX_ANSWER_BYTES = 4 * 2**30
#: one JSON answer (a QIDO-RS page of 500 datasets is a few MB)
DEFAULT_MAX_JSON_BYTES = 256 * 2**20
_CHUNK = 2**16


class AnswerError(requests.RequestException):
    """An answer the transport refuses; the message completes ``"<server> ..."``. Never retried."""


class DeadlineExceeded(AnswerError):
    pass


class AnswerTooLarge(AnswerError):
    pass


class MalformedAnswer(AnswerError):
    pass


class IncompleteAnswer(requests.RequestException):
    """An answer cut short or damaged in transit: retried, then counted as one failed instance."""


class TlsFailure(requests.exceptions.SSLError):
    """A TLS failure described with the CA bundle and client certificate in use."""


_current = threading.local()


class _Watch:
    """Shuts down the sockets a request uses once its deadline passes, unless the request finished first."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.conns: list = []
        self.fired = False
        self._done = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def finish(self) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            for conn in self.conns:
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    try:  # the plain socket's shutdown: ends a read blocked in another thread (TLS included)
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except OSError:
                        pass


class _WatchedPool:
    """Connection pool mixin: hands each connection it gives out to the calling thread's watchdog."""

    def _get_conn(self, timeout=None):
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        watch = getattr(_current, "watch", None)
        if watch is not None:
            watch.conns.append(conn)
        return conn


class _HTTPPool(_WatchedPool, HTTPConnectionPool):
    pass


class _HTTPSPool(_WatchedPool, HTTPSConnectionPool):
    pass


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_POOLS)
        return manager


def _is_json(response: requests.Response) -> bool:
    return "json" in response.headers.get("Content-Type", "").lower()


class GuardedSession(requests.Session):
    """A ``requests.Session`` whose requests end by ``deadline`` seconds and whose answers stay under a cap.

    ``answer_check(method, response)`` (optional) may raise :class:`MalformedAnswer` for an answer whose
    body does not have the shape the caller needs (e.g. a QIDO-RS answer that is not a JSON array).
    """

    def __init__(self, deadline: float | None = None, max_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
                 max_json_bytes: int = DEFAULT_MAX_JSON_BYTES) -> None:
        super().__init__()
        self.deadline = deadline
        self.max_bytes = max_bytes
        self.max_json_bytes = max_json_bytes
        self.answer_check: Callable[[str, requests.Response], None] | None = None
        #: what the user can do about a deadline, appended to its message
        self.deadline_hint = ""
        adapter = _Adapter()
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    # -- TLS: what verifies the server, and which certificate we show -----------------------------------
    def ca_source(self) -> str:
        """Where the CA certificates verifying servers come from, as a user would name it."""
        if self.verify is not True:
            return f"--ca-bundle {self.verify}"
        for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            if self.trust_env and os.environ.get(var):
                return f"${var} ({os.environ[var]})"
        return "the default CA certificates (certifi), as no --ca-bundle was given"

    def _tls_failure(self, err: BaseException) -> TlsFailure:
        text = str(err)
        low = text.lower()
        cert = self.cert[0] if isinstance(self.cert, tuple) else self.cert
        if "certificate_verify_failed" in low or "certificate verify failed" in low:
            if "mismatch" in low or "doesn't match" in low:
                why = "the server's certificate does not name this host"
            else:
                why = "its certificate is not signed by a CA in " + self.ca_source()
            hint = ("check that the file holds the CA that signed the server's certificate" if self.verify is not True
                    else "give the hospital CA with --ca-bundle")
            return TlsFailure(f"TLS certificate verification failed: {why}; {hint}")
        if any(s in low for s in ("certificate required", "certificate_required", "handshake failure",
                                  "bad certificate", "bad_certificate", "unknown ca", "unknown_ca")):
            if not cert:
                return TlsFailure("the server requires a client certificate (mutual TLS) and none was given: "
                                  "give --client-cert (and --client-key)")
            return TlsFailure(f"the server refused our client certificate --client-cert {cert}: check that the "
                              "server trusts the CA that signed it and that --client-key matches it")
        if any(s in low for s in ("eof occurred", "unexpected eof", "connection reset", "zero_return")):
            # many servers close the handshake without an alert when a client certificate is missing or refused
            if not cert:
                return TlsFailure("the server ended the TLS handshake without a reason, as servers requiring a client "
                                  "certificate (mutual TLS) do when none is given: give --client-cert (and --client-key)")
            return TlsFailure(f"the server ended the TLS handshake without a reason: it may not trust our client "
                              f"certificate --client-cert {cert}; check the CA that signed it and that --client-key "
                              "matches it")
        return TlsFailure(f"TLS handshake failed ({type(err).__name__}): check the server's TLS configuration")

    # -- the request -----------------------------------------------------------------------------------
    def request(self, method, url, *args, **kwargs):
        kwargs["stream"] = True  # read here, in chunks, against the cap
        if kwargs.get("verify") is None and self.verify is not True:
            kwargs["verify"] = self.verify  # --ca-bundle wins over REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE
        if kwargs.get("cert") is None and self.cert:
            kwargs["cert"] = self.cert
        watch = _Watch(self.deadline) if self.deadline else None
        _current.watch = watch
        try:
            if watch is not None:
                watch.start()
            try:
                response = super().request(method, url, *args, **kwargs)
                self._read_body(response)
            except AnswerError:
                raise
            except (requests.RequestException, OSError) as err:
                if watch is not None and watch.fired:
                    raise self._late(watch) from None
                if isinstance(err, requests.exceptions.SSLError) or "certificate required" in str(err).lower():
                    raise self._tls_failure(err) from None
                raise
            if watch is not None:
                watch.finish()
                if watch.fired:  # the shut-down socket may read as a clean end of the answer
                    raise self._late(watch)
        finally:
            if watch is not None:
                watch.finish()
            _current.watch = None
        if self.answer_check is not None:
            self.answer_check(str(method).upper(), response)
        return response

    def _late(self, watch: _Watch) -> DeadlineExceeded:
        return DeadlineExceeded(f"did not finish answering within {watch.seconds:g} s (the overall deadline of one "
                                f"request): the server is stalled or far too slow{self.deadline_hint}")

    def _read_body(self, response: requests.Response) -> None:
        cap = self.max_json_bytes if _is_json(response) else self.max_bytes
        declared = response.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > cap:
            response.close()
            raise AnswerTooLarge(f"declared an answer of {int(declared):,} bytes, more than the cap of {cap:,} "
                                 "bytes; refused without reading it")
        body = bytearray()
        for chunk in response.iter_content(_CHUNK):
            body += chunk
            if len(body) > cap:
                response.close()
                raise AnswerTooLarge(f"sent more than the cap of {cap:,} bytes in one answer; stopped reading")
        response._content = bytes(body)
        response._content_consumed = True
