"""What a cohort holds before anything is downloaded (``medssl index --count-only``).

Counts only, from the selection's query answers: patients, studies, series, instances, and instances by
modality, body part, study year and (when labels are given) label, so a research-IT engineer can check a
cohort's size and make-up with the PACS team before fetching gigabytes of identifiable data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from .fetch import RemoteInstance

__all__ = ["format_cohort_counts", "summarize_selection"]

_UNKNOWN = "(none)"


def summarize_selection(instances: Sequence[RemoteInstance], labels: Mapping[str, str] | None = None,
                        label_key: str = "patient_id") -> dict[str, Any]:
    """Counts of a selection; ``labels`` maps original ``label_key`` values to labels (unmatched: ``(none)``)."""
    def by(values) -> dict[str, int]:
        return dict(sorted(Counter(v or _UNKNOWN for v in values).items()))

    out: dict[str, Any] = {
        "patients": len({i.patient_id for i in instances if i.patient_id}),
        "studies": len({i.study_uid for i in instances}),
        "series": len({i.series_uid for i in instances}),
        "instances": len(instances),
        "by_modality": by(i.modality for i in instances),
        "by_body_part": by(i.body_part for i in instances),
        "by_year": by(i.study_date[:4] if len(i.study_date) >= 4 else "" for i in instances),
    }
    if labels is not None:
        out["by_label"] = by(labels.get(str(getattr(i, label_key)).strip()) for i in instances)
    return out


def format_cohort_counts(counts: Mapping[str, Any], server: str) -> str:
    """The counts as the lines ``--count-only`` prints."""
    lines = [f"cohort on {server} (nothing downloaded):"]
    lines += [f"{k + ':':<23}{counts[k]}" for k in ("patients", "studies", "series", "instances")]
    for k in ("by_modality", "by_body_part", "by_year", "by_label"):
        if k in counts:
            lines.append(f"instances {k.replace('_', ' ')}:")
            lines += [f"  {name:<21}{n}" for name, n in counts[k].items()]
    return "\n".join(lines)
