"""The local cache a PACS cohort is fetched into: one file per instance, named by its SOP Instance UID.

The cache holds original (identifiable) DICOM, so its folder is private (0700) and its files 0600. A file
appears only complete (written to a hidden temporary file, then renamed), so an interrupted fetch leaves
either a whole instance or none; a later fetch removes left-over temporary files and downloads only the
instances whose file is missing. The folder index then reads the cache like any export.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

__all__ = ["DicomCache"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TMP_PREFIX = ".part-"


class DicomCache:
    """A flat folder of ``<SOPInstanceUID>.dcm`` files."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def path_for(self, sop_uid: str) -> Path:
        """The file of one instance; a value that is not a DICOM UID (a server's bad answer) is refused, so it
        can never name a path outside the cache."""
        uid = str(sop_uid).strip()
        if len(uid) > 64 or not _UID.match(uid):
            raise ValueError(f"not a DICOM UID: {uid[:80]!r}")
        return self.root / f"{uid}.dcm"

    def has(self, sop_uid: str) -> bool:
        return self.path_for(sop_uid).is_file()

    def known(self) -> set[str]:
        """SOP Instance UIDs with a complete file in the cache."""
        return {p.name[:-4] for p in self.root.glob("*.dcm") if not p.name.startswith(".")}

    def write(self, sop_uid: str, data: bytes) -> Path:
        """Store one instance atomically (temporary file in the same folder, fsync, rename), mode 0600."""
        path = self.path_for(sop_uid)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def partial_files(self) -> list[Path]:
        return sorted(self.root.glob(f"{_TMP_PREFIX}*.tmp"))

    def clean_partial(self) -> int:
        """Remove temporary files a killed fetch left behind; returns how many."""
        stale = self.partial_files()
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)
