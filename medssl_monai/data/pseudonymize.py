"""Salted, keyed hashing of patient identifiers and DICOM UIDs.

HMAC-SHA256 with a secret salt: the same salt gives the same pseudonyms on every run (so incremental
indexes and later exports line up), and without the salt a pseudonym cannot be linked back by hashing a
guessed PatientID. The salt file is the re-identification key: keep it away from the manifest.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

__all__ = ["Pseudonymizer", "load_or_create_salt"]

logger = logging.getLogger(__name__)


def load_or_create_salt(salt_file: str | os.PathLike) -> bytes:
    """Read the salt; create a random one (mode 0600) when the file does not exist yet."""
    p = Path(salt_file)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        logger.info("created a new pseudonymisation salt at %s: keep it to get the same pseudonyms again", p)
    salt = p.read_bytes().strip()
    if len(salt) < 16:
        raise ValueError(f"{p}: salt too short ({len(salt)} bytes): use at least 16 random bytes")
    return salt


class Pseudonymizer:
    """Maps identifiers to stable pseudonyms under one secret salt."""

    def __init__(self, salt: bytes) -> None:
        if not salt:
            raise ValueError("empty salt")
        self._salt = salt

    @classmethod
    def from_file(cls, salt_file: str | os.PathLike) -> Pseudonymizer:
        return cls(load_or_create_salt(salt_file))

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._salt, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def patient(self, value: str) -> str:
        """A patient (or lesion) id -> ``P`` + 16 hex digits."""
        return "P" + self._digest("patient", value).hex()[:16]

    def uid(self, value: str) -> str:
        """A DICOM UID -> a valid UID under the ``2.25`` (UUID-derived) root, as DICOM PS3.15 de-identification does."""
        return "2.25." + str(int.from_bytes(self._digest("uid", value)[:16], "big"))

    def path_key(self, value: str) -> str:
        """A file path -> an opaque key (folder names in exports often carry patient ids or names)."""
        return self._digest("path", value).hex()[:24]

    @property
    def fingerprint(self) -> str:
        """Identifies the salt without revealing it, so an incremental index can refuse to mix salts."""
        return self._digest("fingerprint", "medssl").hex()[:16]
