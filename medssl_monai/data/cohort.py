"""Cohort filters: which series of a PACS or a folder make up a research cohort.

Research IT selects a cohort by modality, body part, study dates and series description. The same filter is
sent to a PACS (QIDO-RS query parameters, C-FIND keys) and applied again to every header at index time, so a
network index and a folder index of the same instances agree even where a server ignores or loosens a
query key (servers differ in case sensitivity and in which keys they honour at which level).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

__all__ = ["CohortFilter", "parse_date_range"]

_DATE = re.compile(r"^\d{8}$")
_URL_SAFE = re.compile(r"^[A-Za-z0-9*?._~-]+$")  # what a URL query carries without percent-encoding


def _date_ok(text: str) -> bool:
    if not _DATE.match(text):
        return False
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def parse_date_range(text: str) -> tuple[str, str]:
    """``YYYYMMDD-YYYYMMDD``, ``YYYYMMDD-`` (from), ``-YYYYMMDD`` (until) or ``YYYYMMDD`` (one day) -> (from, to);
    an open end is ``""``. This is DICOM's own range syntax, so it goes to a PACS as it is."""
    raw = text.strip()
    lo, sep, hi = raw.partition("-")
    if not sep:
        hi = lo
    lo, hi = lo.strip(), hi.strip()
    for part in (lo, hi):
        if part and not _date_ok(part):
            raise ValueError(f"--study-date {text!r}: dates are YYYYMMDD, as FROM-TO, FROM-, -TO or one day")
    if not lo and not hi:
        raise ValueError(f"--study-date {text!r}: give at least one date (YYYYMMDD)")
    if lo and hi and lo > hi:
        raise ValueError(f"--study-date {text!r}: the range starts after it ends")
    return lo, hi


def _values(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"cr,DX"`` or ``["CR", "DX"]`` -> ``("CR", "DX")``: DICOM code strings are upper case."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(v.strip().upper() for v in items if v and v.strip()))


def _wildcard(pattern: str) -> re.Pattern:
    """DICOM wildcard matching (``*`` any run, ``?`` one character), case-sensitive as in a PACS."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(f"^{body}$", re.DOTALL)


@dataclass(frozen=True)
class CohortFilter:
    """A cohort as DICOM matching keys; an empty filter selects everything.

    Args:
        modality: accepted Modality (0008,0060) values, e.g. ``("CR", "DX")``.
        body_part: accepted BodyPartExamined (0018,0015) values.
        study_date: StudyDate (0008,0020) range ``(from, to)``, ``""`` for an open end.
        series_description: SeriesDescription (0008,103E) wildcard pattern (``*``, ``?``).

    Matching follows DICOM's (and so a PACS's) rules: exact and case-sensitive, code strings given in upper
    case (``cr`` is taken as ``CR``, which is how DICOM writes code strings); the study date compares as
    ``YYYYMMDD``. A header without the attribute does not match a filter on it.
    """

    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    study_date: tuple[str, str] | None = None
    series_description: str | None = None

    @classmethod
    def create(cls, modality: str | Iterable[str] | None = None, body_part: str | Iterable[str] | None = None,
               study_date: str | None = None, series_description: str | None = None) -> CohortFilter:
        """From command-line style values (comma lists, ``FROM-TO`` dates)."""
        return cls(modality=_values(modality), body_part=_values(body_part),
                   study_date=parse_date_range(study_date) if study_date else None,
                   series_description=series_description or None)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> CohortFilter:
        """From a config section ``{"modality": ..., "body_part": ..., "study_date": ..., "series_description": ...}``."""
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - {"modality", "body_part", "study_date", "series_description"})
        if unknown:
            raise ValueError(f"cohort filter: unknown keys {unknown} (modality, body_part, study_date, series_description)")
        return cls.create(**cfg)

    @property
    def empty(self) -> bool:
        return not (self.modality or self.body_part or self.study_date or self.series_description)

    @property
    def dicom_date_range(self) -> str:
        """The study date filter in DICOM range syntax (``""`` when none)."""
        if self.study_date is None:
            return ""
        lo, hi = self.study_date
        return lo if lo == hi else f"{lo}-{hi}"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able form (stored in the manifest's meta so an incremental index notices a changed cohort)."""
        return {"modality": list(self.modality), "body_part": list(self.body_part),
                "study_date": self.dicom_date_range or None, "series_description": self.series_description}

    def command_line(self) -> list[str]:
        """The ``medssl index`` options that express this filter."""
        args: list[str] = []
        if self.modality:
            args += ["--modality", ",".join(self.modality)]
        if self.body_part:
            args += ["--body-part", ",".join(self.body_part)]
        if self.study_date:
            args += ["--study-date", self.dicom_date_range]
        if self.series_description:
            args += ["--series-description", self.series_description]
        return args

    def match_study(self, study_date: str | None) -> bool:
        if self.study_date is None:
            return True
        value = (study_date or "").strip()[:8]
        if not _DATE.match(value):
            return False
        lo, hi = self.study_date
        return (not lo or value >= lo) and (not hi or value <= hi)

    def match_series(self, modality: str | None, body_part: str | None, series_description: str | None) -> bool:
        if self.modality and (modality or "").strip() not in self.modality:
            return False
        if self.body_part and (body_part or "").strip() not in self.body_part:
            return False
        if self.series_description is not None:
            return bool(_wildcard(self.series_description).match((series_description or "").strip()))
        return True

    def matches(self, header: Mapping[str, Any]) -> bool:
        """Whether an image's header fields (``modality``, ``body_part``, ``study_date``,
        ``series_description``, as the folder index reads them) belong to the cohort."""
        return self.match_study(header.get("study_date")) and self.match_series(
            header.get("modality"), header.get("body_part"), header.get("series_description"))

    def server_keys(self) -> tuple[dict[str, str], dict[str, str]]:
        """Matching keys a PACS can apply itself: (study level, series level).

        Lists of values are not sent (DICOM has no list matching for code strings), nor the series
        description pattern; the server returns more and :meth:`match_series` keeps the cohort, re-checking
        what a server did filter too. The former per-study walk and the DIMSE series level use these;
        :meth:`series_queries` and :meth:`study_queries` send more.
        """
        study = {"StudyDate": self.dicom_date_range} if self.study_date else {}
        series: dict[str, str] = {}
        if len(self.modality) == 1:
            series["Modality"] = self.modality[0]
        if len(self.body_part) == 1:
            series["BodyPartExamined"] = self.body_part[0]
        return study, series

    def series_queries(self, max_queries: int = 16) -> list[dict[str, str]]:
        """Matching keys for series-level queries (QIDO-RS ``/series``) that together cover the cohort.

        One query per (modality, body part) pair, since QIDO-RS has no list matching for code strings
        (Orthanc answers ``Modality=CR\\DX`` with nothing); past ``max_queries`` pairs the body part, then the
        modality, is left to the local check. The study date goes along (QIDO-RS takes study attributes in a
        series query), and the series description as a wildcard pattern with each space sent as ``?``
        (Orthanc matches no value with a space; ``?`` matches it and more, and the local check narrows it),
        when it needs no percent-encoding in a URL: Orthanc 1.10 does not decode query values (``%2A`` is not
        ``*`` there), so a pattern with other characters is left to the local check.
        Every query's answer is a superset of its share of the cohort, so :meth:`match_study` and
        :meth:`match_series` still decide.
        """
        base: dict[str, str] = {}
        if self.study_date:
            base["StudyDate"] = self.dicom_date_range
        pattern = (self.series_description or "").replace(" ", "?")
        if pattern and _URL_SAFE.match(pattern):
            base["SeriesDescription"] = pattern
        modalities: tuple[str | None, ...] = self.modality or (None,)
        parts: tuple[str | None, ...] = self.body_part or (None,)
        if len(modalities) * len(parts) > max_queries:
            parts = (None,)
        if len(modalities) > max_queries:
            modalities = (None,)
        queries = []
        for modality in modalities:
            for part in parts:
                q = dict(base)
                if modality:
                    q["Modality"] = modality
                if part:
                    q["BodyPartExamined"] = part
                queries.append(q)
        return queries

    def study_queries(self) -> list[dict[str, str]]:
        """Matching keys for study-level C-FIND (StudyDate, ModalitiesInStudy), one query per modality.

        ModalitiesInStudy is an optional key: a PACS that does not support it answers every study (a
        superset), and :meth:`match_modalities_in_study` then keeps a study whose answer lacks it."""
        date = self.dicom_date_range
        return [{"StudyDate": date, "ModalitiesInStudy": m} for m in (self.modality or ("",))]

    def match_modalities_in_study(self, modalities: Iterable[str] | str | None) -> bool:
        """Whether a study (by its ModalitiesInStudy answer) may hold a cohort series; unknown -> True."""
        if not self.modality:
            return True
        if isinstance(modalities, str):
            modalities = modalities.replace("\\", ",")
        values = _values(modalities) if modalities else ()
        return not values or bool(set(values) & set(self.modality))
