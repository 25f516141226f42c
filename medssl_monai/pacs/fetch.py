"""What both PACS clients share: the selected instance and the counts a fetch reports."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FetchStats", "RemoteInstance"]


@dataclass(frozen=True)
class RemoteInstance:
    """One selected instance on the server (original identifiers: never logged, never written to a manifest).

    Beside the UIDs a retrieve needs, the selection keeps what a cohort summary counts (``--count-only``)
    and what labels may be joined on before anything is downloaded; a server that does not return an
    attribute leaves it empty.
    """

    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    sop_uid: str = field(repr=False)
    sop_class_uid: str = field(default="", repr=False)
    patient_id: str = field(default="", repr=False)
    accession_number: str = field(default="", repr=False)
    study_date: str = field(default="", repr=False)
    modality: str = field(default="", repr=False)
    body_part: str = field(default="", repr=False)


@dataclass
class FetchStats:
    """What a fetch did; counts only (the cohort's identifiers stay out of logs). ``selection`` holds the
    selected instances (original UIDs, never printed) for the withdrawn count, the summary and the audit."""

    server: str
    studies: int = 0
    series: int = 0
    instances: int = 0
    fetched: int = 0
    already_cached: int = 0
    failed: int = 0
    partial_removed: int = 0
    withdrawn: int = 0
    #: cached files found damaged (cut short, another instance) and so fetched again
    damaged_refetched: int = 0
    #: instances the server sent that failed verification (cut short, another instance): counted in failed too
    rejected: int = 0
    #: instances a C-GET peer pushed without being asked for them: refused, never stored
    unrequested: int = 0
    seconds: float = 0.0
    selection: list[RemoteInstance] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        extra = "".join(f", {n} {what}" for n, what in (
            (self.rejected, "refused as not whole or not the instance asked for"),
            (self.unrequested, "pushed unasked and refused"), (self.damaged_refetched, "damaged in the cache, fetched again"))
            if n)
        return (f"{self.server}: {self.studies} studies, {self.series} series, {self.instances} instances selected; "
                f"{self.fetched} fetched, {self.already_cached} already cached, {self.failed} failed{extra}")
