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


#: Shortest salt accepted: fewer random bytes would let a guessed PatientID be tested against a pseudonym.
MIN_SALT_BYTES = 16


def load_or_create_salt(salt_file: str | os.PathLike) -> bytes:
    """Read the salt; create a random one (mode 0600) when the file does not exist yet.

    The salt is the re-identification key, so a salt file that group or others may read is refused rather
    than used: whoever can read it can link every pseudonym back to a guessed PatientID.
    """
    p = Path(salt_file)
    if p.is_dir():
        raise ValueError(f"{p}: the salt path is a folder: give a file (it is created, mode 0600, when absent)")
    if not p.exists():
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as err:
            raise PermissionError(f"{p}: cannot create the salt file ({err.strerror or err})") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        logger.info("created a new pseudonymisation salt at %s: keep it to get the same pseudonyms again", p)
    if os.name == "posix":
        mode = p.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(
                f"{p}: the salt file is open to group/others (mode {mode:04o}); it is the re-identification "
                f"key: make it private with 'chmod 600 {p}'")
    try:
        salt = p.read_bytes().strip()
    except OSError as err:
        raise PermissionError(f"{p}: cannot read the salt file ({err.strerror or err})") from None
    if len(salt) < MIN_SALT_BYTES:
        raise ValueError(f"{p}: salt too short ({len(salt)} bytes): use at least {MIN_SALT_BYTES} random bytes")
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
        # surrogatepass: a file name that is not valid UTF-8 (surrogate-escaped by Python) hashes, never raises
        return hmac.new(self._salt, f"{kind}\x00{value}".encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def patient(self, value: str) -> str:
        """A patient (or lesion) id -> ``P`` + 16 hex digits."""
        return "P" + self._digest("patient", value).hex()[:16]

    def uid(self, value: str) -> str:
        """A DICOM UID -> a valid UID under the ``2.25`` (UUID-derived) root, as DICOM PS3.15 de-identification does."""
        return "2.25." + str(int.from_bytes(self._digest("uid", value)[:16], "big"))

    def accession(self, value: str) -> str:
        """An AccessionNumber -> ``A`` + 16 hex digits (it names a study at the RIS: as identifying as a UID)."""
        return "A" + self._digest("accession", value).hex()[:16]

    def path_key(self, value: str) -> str:
        """A file path -> an opaque key (folder names in exports often carry patient ids or names)."""
        return self._digest("path", value).hex()[:24]

    @property
    def fingerprint(self) -> str:
        """Identifies the salt without revealing it, so an incremental index can refuse to mix salts."""
        return self._digest("fingerprint", "medssl").hex()[:16]
