"""One clear line for every way a PACS connection fails.

A research-IT user pointing the index at a PACS needs to know which server refused and what to check
(credentials, certificate, host and port, AE titles), not a traceback through requests or pynetdicom.
"""

from __future__ import annotations

from ._deps import require

__all__ = ["PacsError", "describe_http_error"]


class PacsError(RuntimeError):
    """A PACS could not be used; the message is one line naming the server and what to check.

    ``fatal`` is False for a failure that concerns one request only (an instance gone, a server error on
    one object): a fetch counts those and carries on; anything else (credentials, certificate, an
    unreachable server, a deadline or size cap exceeded, a malformed answer) stops it.
    """

    def __init__(self, message: str, fatal: bool = True, incomplete: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal
        #: the server's answer was refused as not whole or not the instance asked for
        self.incomplete = incomplete


def describe_http_error(server: str, err: BaseException) -> PacsError:
    """Turn a ``requests`` exception from ``server`` into a :class:`PacsError` (never quoting credentials)."""
    require("requests")
    import requests

    from .http import AnswerError, IncompleteAnswer, TlsFailure

    if isinstance(err, AnswerError):  # a deadline, a cap, an answer of the wrong shape: the server misbehaves
        return PacsError(f"{server} {err}")
    if isinstance(err, IncompleteAnswer):
        return PacsError(f"{server} {err}; a later run fetches it again", fatal=False, incomplete=True)
    if isinstance(err, TlsFailure):
        return PacsError(f"{server}: {err}")
    if isinstance(err, requests.HTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 401:
            return PacsError(f"{server} refused the credentials (HTTP 401): check MEDSSL_DICOMWEB_USER/"
                             "MEDSSL_DICOMWEB_PASSWORD, MEDSSL_DICOMWEB_TOKEN or --auth-file")
        if status == 403:
            return PacsError(f"{server} denied access (HTTP 403): the account lacks the right to this "
                             "DICOMweb service; ask the PACS administrator")
        if status == 404:
            return PacsError(f"{server} has no such DICOMweb resource (HTTP 404): check the URL "
                             "(it usually ends in /dicom-web or /dicomweb)", fatal=False)
        return PacsError(f"{server} answered HTTP {status} ({err.response.reason}): check the server's log",
                         fatal=status >= 400 and status < 500 and status != 429)
    if isinstance(err, requests.exceptions.SSLError):
        return PacsError(f"{server}: TLS certificate verification failed: give the hospital CA with --ca-bundle")
    if isinstance(err, requests.Timeout):
        return PacsError(f"{server} did not answer in time: check the network path (VPN, proxy) or raise --timeout",
                         fatal=False)
    if isinstance(err, requests.ConnectionError):
        return PacsError(f"cannot connect to {server}: connection refused or unreachable; check the host, "
                         "the port and that the PACS is running")
    return PacsError(f"{server}: {type(err).__name__}")
