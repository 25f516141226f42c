"""The local copy a PACS cohort is fetched into: one file per instance, named by its SOP Instance UID.

The local copy holds original (identifiable) DICOM, so its folder is private (0700) and its files 0600. A
file appears only complete (written to a hidden temporary file, then renamed), so an interrupted fetch
leaves either a whole instance or none; a later fetch removes left-over temporary files and downloads only
the instances whose file is missing. The folder index then reads the local copy like any export.

What enters the local copy is verified first, on the complete temporary file: it parses as DICOM, its SOP
Instance UID is the one asked for, and its pixel data is whole (the index's own header checks, which see
pixel data cut short without decoding it). A server's answer cut short, another instance than asked for, or
a damaged file left by an older version is never taken as held: it is refused, or deleted and fetched
again by the next run.

Each PACS index records the instances it selected (``<folder>.selected`` beside it, 0600, as keyed hashes
under the audit log's key), so instances that left the selection (deleted or corrected in the PACS, or
outside a changed cohort) are known: the index leaves them out of the manifest and :meth:`LocalCopy.prune`
deletes their files. (``cache`` in this package means the decoded-image cache, not this folder.)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from ..utils.atomic import atomic_write_text, atomic_writer

logger = logging.getLogger(__name__)

__all__ = ["DamagedInstance", "LocalCopy", "verify_instance"]

#: header-check codes meaning the file itself is damaged (the others, e.g. a non-image SOP class or a
#: missing PatientID, describe a whole file the index reports, as it does for an export)
_DAMAGED = {"empty", "not_dicom", "truncated", "corrupt", "pixel_length_mismatch", "frames_exceed_fragments"}


class DamagedInstance(ValueError):
    """An instance that must not enter the cache; the message says why, without identifiers."""


def verify_instance(path: str | os.PathLike, sop_uid: str, study_uid: str = "", series_uid: str = "") -> None:
    """Raise :class:`DamagedInstance` unless ``path`` is a whole DICOM file of the instance ``sop_uid`` (and, when
    given, of the study and series it was selected in: a peer can announce the UID asked for on another
    patient's dataset)."""
    from ..data.dicom.header import SkipFile, read_dicom_header

    expected = {"sop_uid": sop_uid, "study_uid": study_uid, "series_uid": series_uid}
    try:  # the index's own header read: it sees pixel data cut short, and gives the UIDs of an image
        fields = read_dicom_header(str(path), max_pixels=None)
    except SkipFile as skip:
        if skip.code in _DAMAGED:
            raise DamagedInstance(skip.reason) from None
        fields = _uids(path)  # a whole file the index will report (not an image, no PatientID, ...)
        if skip.code in ("unsupported_sop", "dicomdir"):  # no pixel data to check: the whole file must parse
            _check_whole_file(path)
    for key, want in expected.items():
        name = {"sop_uid": "SOPInstanceUID", "study_uid": "StudyInstanceUID", "series_uid": "SeriesInstanceUID"}[key]
        if want and fields.get(key, "") != want:
            raise DamagedInstance(f"another instance than the one requested (its {name} differs)" if fields.get(key)
                                  else f"a file without {name}")


def _uids(path: str | os.PathLike) -> dict[str, str]:
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warnings quote element values
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                 specific_tags=["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
        return {key: str(ds.get(kw, "") or "").strip() for key, kw in (
            ("sop_uid", "SOPInstanceUID"), ("study_uid", "StudyInstanceUID"), ("series_uid", "SeriesInstanceUID"))}
    except Exception as err:
        raise DamagedInstance(f"not a readable DICOM file ({type(err).__name__})") from None


def _check_whole_file(path: str | os.PathLike) -> None:
    import pydicom

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pydicom.dcmread(path, force=True)
        except Exception as err:
            raise DamagedInstance(f"truncated or corrupt DICOM ({type(err).__name__})") from None
    if any("End of file reached" in str(w.message) or "truncat" in str(w.message).lower() for w in caught):
        raise DamagedInstance("truncated DICOM: the file ends inside a data element")

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TMP_GLOB = ".*.tmp"  # what utils.atomic leaves behind when killed mid-write
_SELECTED_SUFFIX = ".selected"


class LocalCopy:
    """A flat folder of ``<SOPInstanceUID>.dcm`` files (``create=False``: open one without creating it)."""

    def __init__(self, root: str | os.PathLike, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)

    def path_for(self, sop_uid: str) -> Path:
        """The file of one instance; a value that is not a DICOM UID (a server's bad answer) is refused, so it
        can never name a path outside the local copy."""
        uid = str(sop_uid).strip()
        if len(uid) > 64 or not _UID.match(uid):
            raise ValueError(f"not a DICOM UID: {uid[:80]!r}")
        return self.root / f"{uid}.dcm"

    def has(self, sop_uid: str) -> bool:
        return self.path_for(sop_uid).is_file()

    def known(self) -> set[str]:
        """SOP Instance UIDs with a complete file in the local copy."""
        return {p.name[:-4] for p in self.root.glob("*.dcm") if not p.name.startswith(".")}

    def write(self, sop_uid: str, data: bytes, *, verify: bool = True, study_uid: str = "",
              series_uid: str = "") -> Path:
        """Store one instance atomically (temporary file in the same folder, fsync, rename), mode 0600; with
        ``verify`` the temporary file must pass :func:`verify_instance` first (else :class:`DamagedInstance`,
        and nothing is stored)."""
        path = self.path_for(sop_uid)
        uid = path.name[:-4]

        def check(tmp: str) -> None:
            verify_instance(tmp, uid, study_uid, series_uid)

        with atomic_writer(path, mode=0o600, check=check if verify else None) as fh:
            fh.write(data)
        return path

    def to_fetch(self, instances: list, stats) -> list:
        """The selected instances a fetch must download (both PACS clients): damaged local files are deleted
        first (``stats.damaged_refetched``), whole ones count as ``stats.already_cached``."""
        stats.damaged_refetched = self.drop_damaged([i.sop_uid for i in instances])
        if stats.damaged_refetched:
            logger.warning("%s: %d cached instance(s) were not whole (cut short or another instance): fetching "
                           "them again", stats.server, stats.damaged_refetched)
        todo = [i for i in instances if not self.has(i.sop_uid)]
        stats.already_cached = len(instances) - len(todo)
        logger.info("%s: %d instances selected, %d to fetch", stats.server, len(instances), len(todo))
        return todo

    def drop_damaged(self, sop_uids) -> int:
        """Delete the cached files of ``sop_uids`` that fail :func:`verify_instance` (cut short, another
        instance): the caller fetches them again. Returns how many were deleted."""
        damaged = 0
        for uid in sop_uids:
            path = self.path_for(uid)
            if not path.is_file():
                continue
            try:
                verify_instance(path, path.name[:-4])
            except DamagedInstance:
                path.unlink(missing_ok=True)
                damaged += 1
        return damaged

    def partial_files(self) -> list[Path]:
        return sorted(self.root.glob(_TMP_GLOB))

    def clean_partial(self) -> int:
        """Remove temporary files a killed fetch left behind; returns how many."""
        stale = self.partial_files()
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    # ------------------------------------------------------------ the selection, withdrawn instances

    @property
    def selection_file(self) -> Path:
        """Beside the folder (so the folder holds DICOM only): ``manifest.cache`` -> ``manifest.cache.selected``."""
        return self.root.with_name(self.root.name + _SELECTED_SUFFIX)

    def record_selection(self, sop_uids: Iterable[str], keyed: Callable[[str], str]) -> None:
        """Remember what the last PACS query selected, as keyed hashes (``keyed``: the audit key's HMAC), so
        the record beside the private folder holds no identifier; rewritten only when it changed."""
        text = "".join(k + "\n" for k in sorted({keyed(str(u)) for u in sop_uids}))
        try:
            if self.selection_file.read_text() == text:
                return
        except FileNotFoundError:
            pass
        atomic_write_text(self.selection_file, text, mode=0o600)

    def selection_keys(self) -> set[str] | None:
        """The keyed hashes the last PACS query selected, or ``None`` when no query was recorded."""
        try:
            return {ln.strip() for ln in self.selection_file.read_text().splitlines() if ln.strip()}
        except FileNotFoundError:
            return None

    def withdrawn(self, selected: Iterable[str] | None = None, keyed: Callable[[str], str] | None = None) -> set[str]:
        """Instances with a file here that are not (or no longer) selected: against ``selected`` (original
        UIDs) when given, else against the recorded selection."""
        if selected is not None:
            return self.known() - set(selected)
        keys = self.selection_keys()
        if keyed is None:
            raise ValueError("give the selected UIDs or the key of the recorded selection")
        return set() if keys is None else {u for u in self.known() if keyed(u) not in keys}

    def selected_files(self, selected: Iterable[str]) -> set[str]:
        """Real paths (as the folder index lists them) of the selected instances present here."""
        root = os.path.abspath(self.root)
        return {os.path.join(root, f"{u}.dcm") for u in self.known().intersection(selected)}

    def prune(self, keyed: Callable[[str], str]) -> list[str]:
        """Delete the files of instances that left the recorded selection; returns their UIDs."""
        if self.selection_keys() is None:
            raise ValueError(f"{self.root}: no selection recorded ({self.selection_file.name} is written by a PACS "
                             "index): run `medssl index` against the PACS first")
        gone = sorted(self.withdrawn(keyed=keyed))
        for uid in gone:
            self.path_for(uid).unlink(missing_ok=True)
        return gone

    def foreign_entries(self) -> list[Path]:
        """What in the folder a fetch did not write (so :meth:`purge` will not delete a user's folder)."""
        return sorted(p for p in self.root.iterdir() if not (
            p.is_file() and not p.is_symlink() and (p.match(_TMP_GLOB) or (
                p.suffix == ".dcm" and _UID.match(p.name[:-4]) is not None))))

    def purge(self) -> list[str]:
        """Delete the whole local copy (files, the folder, the selection record); returns the UIDs that were here.

        Refused, naming the first one, when the folder holds anything a fetch did not write: ``--local-copy``
        pointed at the wrong folder must not delete it."""
        if not self.root.exists():
            self.selection_file.unlink(missing_ok=True)
            return []
        if not self.root.is_dir() or self.root.is_symlink():
            raise ValueError(f"{self.root}: not a local copy folder")
        foreign = self.foreign_entries()
        if foreign:
            raise ValueError(f"{self.root}: not purged: it holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
                             f"a PACS fetch did not write (e.g. {foreign[0].name!r}): is this the local copy?")
        uids = sorted(self.known())
        shutil.rmtree(self.root)
        self.selection_file.unlink(missing_ok=True)
        return uids
