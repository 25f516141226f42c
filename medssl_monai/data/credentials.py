"""DICOMweb credentials from the environment or a private file, never from the command line.

A value on the command line lands in shell history, ``ps`` output and every config copy and log that
records the command; so credentials come from ``MEDSSL_DICOMWEB_USER`` + ``MEDSSL_DICOMWEB_PASSWORD``
(HTTP basic), ``MEDSSL_DICOMWEB_TOKEN`` (bearer) or an auth file of one line (``user:password`` or a token)
that only its owner can read. :class:`Credentials` never shows its secret in ``repr`` or ``str``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .pacs_errors import PacsError

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


def _read_auth_file(path: str | os.PathLike) -> Credentials:
    p = Path(path)
    try:
        st = p.stat()
    except OSError as err:
        raise PacsError(f"--auth-file {p}: cannot read it ({err.strerror})") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PacsError(f"--auth-file {p}: readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                        f"make it private with 'chmod 600 {p}'")
    lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if len(lines) != 1:
        raise PacsError(f"--auth-file {p}: expected one line ('user:password' or a bearer token), found {len(lines)}")
    line = lines[0]
    if ":" in line:
        user, _, password = line.partition(":")
        if not user or not password:
            raise PacsError(f"--auth-file {p}: 'user:password' with an empty user or password")
        return Credentials("basic", user, password, f"auth file {p}")
    return Credentials("bearer", "", line, f"auth file {p}")


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
        return Credentials("bearer", "", token, f"${ENV_TOKEN}")
    if bool(user) != bool(password):
        missing = ENV_PASSWORD if user else ENV_USER
        raise PacsError(f"HTTP basic auth needs both {ENV_USER} and {ENV_PASSWORD}; {missing} is not set")
    if user:
        return Credentials("basic", user, password, f"${ENV_USER}/${ENV_PASSWORD}")
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


def make_session(credentials: Credentials, ca_bundle: str | os.PathLike | None = None):
    """A ``requests.Session`` carrying the credentials; TLS verification stays on (``ca_bundle`` adds a CA)."""
    import requests

    session = requests.Session()
    if credentials.kind == "basic":
        session.auth = (credentials.user, credentials.secret)
    elif credentials.kind == "bearer":
        session.headers["Authorization"] = f"Bearer {credentials.secret}"
    if ca_bundle is not None:
        if not Path(ca_bundle).is_file():
            raise PacsError(f"--ca-bundle {ca_bundle}: no such file (a PEM file of the hospital's CA certificates)")
        session.verify = str(ca_bundle)
    else:
        session.verify = True
    return session
