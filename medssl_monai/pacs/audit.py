"""Who fetched what, when, from where: an append-only JSON-lines log beside the local copy.

Every query, retrieve, prune, purge and STOW adds one line: the time (UTC, ISO 8601), the OS user, the
server (as :func:`~medssl_monai.pacs.credentials.server_name` prints it: no credentials, no userinfo),
the cohort filter, counts, and the instances concerned as keyed hashes, never a clear identifier. In a
pseudonymised run the hash is the run's own pseudonym (HMAC with its salt: the ``sop_uid`` of the
manifest row); otherwise an HMAC under a random key kept beside the log (``.audit.key``, 0600), so a
research-IT or data-protection officer holding the key can check whether a given instance was fetched,
and nobody else can. The log (0600) is only ever appended to, and it survives a purge of the local copy.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..data.pseudonymize import Pseudonymizer, load_or_create_salt

__all__ = ["AUDIT_SUFFIX", "AuditLog", "audit_path"]

AUDIT_SUFFIX = ".audit.jsonl"
_KEY_SUFFIX = ".audit.key"
EVENTS = ("query", "retrieve", "prune", "purge", "stow")


def audit_path(local_copy: str | os.PathLike) -> Path:
    """``runs/x/manifest.cache`` -> ``runs/x/manifest.cache.audit.jsonl`` (beside, not inside: a purge keeps it)."""
    p = Path(local_copy)
    return p.with_name(p.name + AUDIT_SUFFIX)


def _clean_server(server: str) -> str:
    """A URL without userinfo, query or fragment (where a token could hide); other names unchanged."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(str(server))
    if not parts.scheme or not parts.netloc:
        return str(server)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without /etc/passwd entry): the uid is still a name
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


class AuditLog:
    """One local copy's audit log. ``pseudonymizer``: the run's (hashes are the manifest's pseudonyms);
    without it, the log's own key (created 0600 on first use) keys the hashes."""

    def __init__(self, path: str | os.PathLike, pseudonymizer: Pseudonymizer | None = None) -> None:
        self.path = Path(path)
        self._pz = pseudonymizer

    @classmethod
    def for_local_copy(cls, local_copy: str | os.PathLike, pseudonymizer: Pseudonymizer | None = None) -> AuditLog:
        return cls(audit_path(local_copy), pseudonymizer)

    @property
    def key_path(self) -> Path:
        return self.path.with_name(self.path.name.removesuffix(AUDIT_SUFFIX) + _KEY_SUFFIX)

    def _hasher(self) -> tuple[Pseudonymizer, str]:
        if self._pz is not None:
            return self._pz, f"salt:{self._pz.fingerprint}"
        pz = self.local_key()
        return pz, f"audit-key:{pz.fingerprint}"

    def local_key(self) -> Pseudonymizer:
        """The log's own key (created 0600 on first use): it also keys the local copy's selection record."""
        if not self.key_path.exists():
            self.key_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first: use theirs
                fd = None
            if fd is not None:
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_hex(32) + "\n")
        return Pseudonymizer(load_or_create_salt(self.key_path))  # refuses a key open to group/others

    def hash_uids(self, uids: Iterable[str]) -> tuple[list[str], str]:
        """Keyed hashes of SOP Instance UIDs (sorted) and the name of the key that made them."""
        pz, key = self._hasher()
        return sorted({pz.uid(str(u)) for u in uids}), key

    def record(self, event: str, *, server: str = "", counts: Mapping[str, int] | None = None,
               cohort: Mapping[str, Any] | None = None, instances: Iterable[str] = (), **extra: Any) -> dict:
        """Append one event; ``instances`` are original SOP Instance UIDs (hashed here, never written clear).
        ``extra`` values must hold no identifier (e.g. ``error``, ``local_copy``)."""
        if event not in EVENTS:
            raise ValueError(f"audit event must be one of {EVENTS}, got {event!r}")
        uids = list(instances)
        hashed, key = self.hash_uids(uids) if uids else ([], None)
        entry = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "event": event,
                 "user": _os_user(), "server": _clean_server(server), "cohort": dict(cohort or {}),
                 "counts": {k: int(v) for k, v in (counts or {}).items()}, **extra,
                 "instances_key": key, "instances": hashed}
        line = json.dumps(entry, sort_keys=False, ensure_ascii=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # a log made wider by hand goes back to private
            data = line.encode("ascii")
            while data:  # one line, whole
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    def entries(self) -> list[dict]:
        """Every event recorded so far, oldest first."""
        if not self.path.is_file():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
