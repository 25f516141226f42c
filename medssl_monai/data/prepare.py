"""Index a data source into a manifest and split it: what ``medssl index`` + ``medssl split`` do, as functions.

The pipeline prepares its data through these (not through the command line), so the index and the split
behave the same whichever way they are reached.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["PACS_OPTIONS", "SOURCE_KEYS", "index_source", "pacs_source", "split_manifest"]

logger = logging.getLogger(__name__)

#: the data sources: a folder tree, a DICOMweb server, a classic DICOM (DIMSE) server
SOURCE_KEYS = ("dicom_root", "dicomweb", "dimse")
#: options of a PACS source beside its URL (``dicomweb``) or ``HOST:PORT`` (``dimse``)
PACS_OPTIONS = {"dicomweb": frozenset({"url", "auth_file", "ca_bundle", "cache", "download_workers", "timeout"}),
                "dimse": frozenset({"address", "calling_ae", "called_ae", "cache", "timeout"})}
_SECRET_KEYS = {"password", "token", "user", "username", "secret", "auth"}


def pacs_source(kind: str, spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """A PACS source as a mapping (``"url"``/``"address"`` plus options), checked: no credentials in it (a
    config is copied into the run folder; the environment or an ``auth_file`` carries them), no unknown key."""
    main_key = "url" if kind == "dicomweb" else "address"
    spec = dict(spec) if isinstance(spec, Mapping) else {main_key: spec}
    secrets = sorted(k for k in spec if k.lower() in _SECRET_KEYS)
    if secrets:
        raise ValueError(f"data.{kind}: {secrets} must not be in a config (it is copied into the run folder): "
                         "use MEDSSL_DICOMWEB_USER/MEDSSL_DICOMWEB_PASSWORD, MEDSSL_DICOMWEB_TOKEN or auth_file")
    unknown = sorted(set(spec) - PACS_OPTIONS[kind])
    if unknown:
        raise ValueError(f"data.{kind}: unknown keys {unknown} (known: {sorted(PACS_OPTIONS[kind])})")
    if not spec.get(main_key):
        raise ValueError(f"data.{kind}: no {main_key!r}")
    return spec


def index_source(out: str | os.PathLike, *, dicom_root: str | os.PathLike | None = None,
                 dicomweb: str | Mapping[str, Any] | None = None, dimse: str | Mapping[str, Any] | None = None,
                 cohort: Mapping[str, Any] | None = None, labels: str | os.PathLike | None = None,
                 pseudonymize: str | os.PathLike | None = None, full: bool = True) -> dict[str, Any]:
    """Index exactly one source into the manifest ``out``; returns the index's statistics.

    ``dicomweb`` is a URL or ``{url, auth_file, ca_bundle, cache, download_workers, timeout}``; ``dimse`` is
    ``HOST:PORT`` or ``{address, calling_ae, called_ae, cache, timeout}`` (:func:`pacs_source`). ``cohort``
    is a :meth:`CohortFilter.from_config` section, ``labels`` a CSV joined on the original patient id,
    ``pseudonymize`` the salt file (created when absent). Raises when nothing could be indexed or a PACS
    instance could not be fetched (running again fetches only what is missing).
    """
    from .cohort import CohortFilter
    from .dicom_index import check_index_outputs, index_tree, read_labels
    from .manifest import errors_path
    from .pseudonymize import Pseudonymizer

    given = [k for k, v in (("dicom_root", dicom_root), ("dicomweb", dicomweb), ("dimse", dimse)) if v]
    if len(given) != 1:
        raise ValueError(f"data: give exactly one of dicom_root, dicomweb, dimse (got {given or 'none'})")
    kind = given[0]
    spec = pacs_source(kind, dicomweb if kind == "dicomweb" else dimse) if kind != "dicom_root" else {}
    cohort_filter = CohortFilter.from_config(cohort)
    if kind == "dicom_root":
        root = Path(dicom_root)
        if not root.exists():
            raise ValueError(f"{root}: no such file or folder")
        check_index_outputs(root, out)
    label_table = read_labels(labels) if labels else None
    pz = Pseudonymizer.from_file(pseudonymize) if pseudonymize else None
    options = {"pseudonymizer": pz, "incremental": not full, "labels": label_table}
    if kind == "dicom_root":
        result = index_tree(root, out, cohort=cohort_filter, **options)
        where = str(root)
    else:
        from .credentials import load_credentials
        from .pacs_index import index_pacs

        pacs = {k: v for k, v in spec.items() if k not in ("url", "address", "auth_file") and v is not None}
        creds = load_credentials(spec.get("auth_file")) if kind == "dicomweb" else None
        fetch, result = index_pacs(out, dicomweb=spec.get("url"), dimse=spec.get("address"), cohort=cohort_filter,
                                   credentials=creds, **pacs, **options)
        logger.info("fetched %d of %d selected instances (%d already cached, %d failed) from %s", fetch.fetched,
                    fetch.instances, fetch.already_cached, fetch.failed, fetch.server)
        if fetch.failed:
            raise RuntimeError(f"{fetch.failed} instance(s) could not be fetched from {fetch.server}; run again to "
                               "fetch them")
        where = fetch.server
    stats = result.stats
    if stats["instances"] == 0:
        raise RuntimeError(f"nothing indexed from {where}: {stats['files_seen']} file(s) seen, all skipped; "
                           f"reasons in {errors_path(out)}")
    return stats


def split_manifest(manifest: str | os.PathLike, fractions: Mapping[str, float],
                   label_fractions: Sequence[float] | None = None, *, seed: int = 0, level: str = "patient",
                   label_col: str | None = "label", out: str | os.PathLike | None = None) -> pd.DataFrame:
    """Split a manifest by ``level`` (patient, study, series) into ``fractions`` (stratified by
    ``label_col``), then mark the nested ``labeled_<p>pct`` subsets; written to ``out`` (default: in place)."""
    from .grouping import LEVELS
    from .manifest import read_manifest, write_manifest
    from .splits import nested_label_fractions, split_groups

    df = read_manifest(manifest, resolve_paths=False)
    key = LEVELS[level]
    label_col = label_col or None
    for col, what in ((key, f"group column for --level {level}"), (label_col, "label column (--label-col)")):
        if col and col not in df.columns:
            raise ValueError(f"{manifest}: no {col!r} column ({what}); its columns: {list(df.columns)[:12]}")
    if df[key].isna().any():
        raise ValueError(f"{manifest}: {int(df[key].isna().sum())} row(s) with an empty {key!r}: "
                         "every image needs a group to be split by")
    df = split_groups(df, dict(fractions), group_col=key, label_col=label_col, seed=seed)
    if label_fractions:
        df = nested_label_fractions(df, list(label_fractions), group_col=key, label_col=label_col, seed=seed)
    write_manifest(df, out or manifest)
    return df
