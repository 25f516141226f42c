"""DICOMweb credentials from the environment or a private file, never from the command line.

A value on the command line lands in shell history, ``ps`` output and every config copy and log that
records the command; so credentials come from ``MEDSSL_DICOMWEB_USER`` + ``MEDSSL_DICOMWEB_PASSWORD``
(HTTP basic), ``MEDSSL_DICOMWEB_TOKEN`` (bearer) or an auth file of one line (``user:password`` or a token)
that only its owner can read. :class:`Credentials` never shows its secret in ``repr`` or ``str``.

HTTP basic credentials are sent UTF-8 encoded (RFC 7617, section 2.1: UTF-8 is the one charset a server
may announce, and what Orthanc and htpasswd-style servers compare against), so any Unicode password works;
``requests`` alone would encode Latin-1 and fail on anything beyond it. Control characters, a ``:`` in a
user name (RFC 7617 forbids it) and a bearer token outside printable ASCII (RFC 6750) are refused when the
credentials are loaded, naming the variable or file they came from.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ._deps import require
from .errors import PacsError

__all__ = ["ENV_PASSWORD", "ENV_TOKEN", "ENV_USER", "Credentials", "load_credentials", "make_session", "server_name"]

ENV_USER = "MEDSSL_DICOMWEB_USER"
ENV_PASSWORD = "MEDSSL_DICOMWEB_PASSWORD"
ENV_TOKEN = "MEDSSL_DICOMWEB_TOKEN"


@dataclass(frozen=True)
class Credentials:
    """``kind`` is ``"none"``, ``"basic"`` or ``"bearer"``; ``source`` says where they came from (for logs)."""

    kind: str = "none"
    user: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)
    source: str = "none"

    def __str__(self) -> str:
        return f"{self.kind} credentials from {self.source}" if self.kind != "none" else "no credentials"


def _check_text(value: str, what: str, source: str) -> None:
    bad = next((c for c in value if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise PacsError(f"{source}: the {what} holds a control character (U+{ord(bad):04X}); "
                        "any other Unicode character is allowed (sent UTF-8 encoded, RFC 7617)")


def _checked(creds: Credentials, user_source: str, secret_source: str) -> Credentials:
    """Refuse what cannot go into an HTTP header, naming where it came from and what is allowed."""
    if creds.kind == "basic":
        _check_text(creds.user, "user name", user_source)
        if ":" in creds.user:
            raise PacsError(f"{user_source}: a user name cannot contain ':' (HTTP basic auth, RFC 7617)")
        _check_text(creds.secret, "password", secret_source)
    elif creds.kind == "bearer":
        bad = next((c for c in creds.secret if not (0x21 <= ord(c) <= 0x7E)), None)
        if bad is not None:
            raise PacsError(f"{secret_source}: a bearer token is printable ASCII without spaces (RFC 6750), "
                            f"found U+{ord(bad):04X}")
    return creds


def _read_auth_file(path: str | os.PathLike) -> Credentials:
    p = Path(path)
    try:
        st = p.stat()
    except OSError as err:
        raise PacsError(f"--auth-file {p}: cannot read it ({err.strerror})") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PacsError(f"--auth-file {p}: readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                        f"make it private with 'chmod 600 {p}'")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PacsError(f"--auth-file {p}: not UTF-8 text (save it as UTF-8)") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) != 1:
        raise PacsError(f"--auth-file {p}: expected one line ('user:password' or a bearer token), found {len(lines)}")
    line = lines[0]
    if ":" in line:
        user, _, password = line.partition(":")
        if not user or not password:
            raise PacsError(f"--auth-file {p}: 'user:password' with an empty user or password")
        return _checked(Credentials("basic", user, password, f"auth file {p}"), f"--auth-file {p}", f"--auth-file {p}")
    return _checked(Credentials("bearer", "", line, f"auth file {p}"), f"--auth-file {p}", f"--auth-file {p}")


def load_credentials(auth_file: str | os.PathLike | None = None,
                     environ: Mapping[str, str] | None = None) -> Credentials:
    """The auth file when given, else the environment; a half-set pair or two kinds at once is an error."""
    if auth_file:
        return _read_auth_file(auth_file)
    env = os.environ if environ is None else environ
    user, password, token = env.get(ENV_USER, ""), env.get(ENV_PASSWORD, ""), env.get(ENV_TOKEN, "")
    if token and (user or password):
        raise PacsError(f"both {ENV_TOKEN} and {ENV_USER}/{ENV_PASSWORD} are set: keep one kind of credentials")
    if token:
        return _checked(Credentials("bearer", "", token, f"${ENV_TOKEN}"), f"${ENV_TOKEN}", f"${ENV_TOKEN}")
    if bool(user) != bool(password):
        missing = ENV_PASSWORD if user else ENV_USER
        raise PacsError(f"HTTP basic auth needs both {ENV_USER} and {ENV_PASSWORD}; {missing} is not set")
    if user:
        return _checked(Credentials("basic", user, password, f"${ENV_USER}/${ENV_PASSWORD}"), f"${ENV_USER}",
                        f"${ENV_PASSWORD}")
    return Credentials()


def server_name(url: str) -> str:
    """``scheme://host:port/path`` of a URL, refusing credentials embedded in it (they would reach logs)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsError(f"{url!r} is not an http(s) URL of a DICOMweb service (e.g. https://pacs.example.org/dicom-web)")
    if parts.username or parts.password:
        raise PacsError(f"credentials in the URL are refused (they would reach logs): use {ENV_USER}/{ENV_PASSWORD}, "
                        f"{ENV_TOKEN} or --auth-file")
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}"


def _private_file(flag: str, path: str | os.PathLike, what: str, secret: bool) -> str:
    p = Path(path)
    if not p.is_file():
        raise PacsError(f"{flag} {p}: no such file ({what})")
    if secret and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PacsError(f"{flag} {p}: readable by others (mode {stat.S_IMODE(p.stat().st_mode):04o}); "
                        f"make it private with 'chmod 600 {p}'")
    return str(p)


def make_session(credentials: Credentials, ca_bundle: str | os.PathLike | None = None,
                 client_cert: str | os.PathLike | None = None, client_key: str | os.PathLike | None = None, *,
                 deadline: float | None = None):
    """A :class:`~medssl_monai.pacs.http.GuardedSession` carrying the credentials. TLS verification stays on:
    ``ca_bundle`` (a PEM file of the hospital's CA) replaces the default CAs and wins over
    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``; without it those variables apply, as in ``requests``.
    ``client_cert`` (PEM, may hold the key too) and ``client_key`` (private: 0600) for mutual TLS;
    ``deadline``: seconds each request may take in all."""
    require("requests")
    from .http import GuardedSession

    session = GuardedSession(deadline=deadline)
    if credentials.kind == "basic":
        session.auth = (credentials.user.encode("utf-8"), credentials.secret.encode("utf-8"))
    elif credentials.kind == "bearer":
        session.headers["Authorization"] = f"Bearer {credentials.secret}"
    if ca_bundle is not None:
        session.verify = _private_file("--ca-bundle", ca_bundle, "a PEM file of the hospital's CA certificates",
                                       secret=False)
    else:
        session.verify = True
    if client_key is not None and client_cert is None:
        raise PacsError("--client-key without --client-cert: give the client certificate too")
    if client_cert is not None:
        cert = _private_file("--client-cert", client_cert, "a PEM client certificate", secret=client_key is None)
        session.cert = (cert, _private_file("--client-key", client_key, "the PEM private key of --client-cert",
                                            secret=True)) if client_key is not None else cert
    return session
