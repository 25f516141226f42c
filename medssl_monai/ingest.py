"""Index a data source into a manifest and split it: what ``medssl index`` + ``medssl split`` do, as functions.

The pipeline prepares its data through these (not through the command line), so the index and the split
behave the same whichever way they are reached.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas is imported where it is used: `medssl --help` reads this module's defaults
    import pandas as pd

__all__ = ["DEFAULT_LABEL_COLUMN", "DEFAULT_LABEL_KEY", "PACS_OPTIONS", "SOURCE_KEYS", "index_source",
           "pacs_source", "split_manifest"]

logger = logging.getLogger(__name__)

#: the data sources: a folder tree, a DICOMweb server, a classic DICOM (DIMSE) server
SOURCE_KEYS = ("dicom_root", "dicomweb", "dimse")
#: options of a PACS source beside its URL (``dicomweb``) or ``HOST:PORT`` (``dimse``)
#: (``cache`` is the former name of ``local_copy``, still accepted)
PACS_OPTIONS = {"dicomweb": frozenset({"url", "auth_file", "ca_bundle", "client_cert", "client_key", "local_copy",
                                       "cache", "download_workers", "timeout"}),
                "dimse": frozenset({"address", "calling_ae", "called_ae", "local_copy", "cache", "timeout",
                                    "retrieve", "move_ae", "move_port"})}
#: labels join on the original patient id, into the ``label`` column, unless told otherwise (the one set of
#: defaults of ``medssl index --label-key/--label-col`` and the pipeline's ``data.label_key``)
DEFAULT_LABEL_KEY = "patient_id"
DEFAULT_LABEL_COLUMN = "label"
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
    if spec.get("cache") is not None:
        if spec.get("local_copy") is not None:
            raise ValueError(f"data.{kind}: give local_copy (cache is its former name), not both")
        spec["local_copy"] = spec.pop("cache")
    spec.pop("cache", None)
    return spec


def index_source(out: str | os.PathLike, *, dicom_root: str | os.PathLike | None = None,
                 dicomweb: str | Mapping[str, Any] | None = None, dimse: str | Mapping[str, Any] | None = None,
                 cohort: Mapping[str, Any] | None = None, labels: str | os.PathLike | None = None,
                 label_key: str = DEFAULT_LABEL_KEY, label_column: str = DEFAULT_LABEL_COLUMN,
                 pseudonymize: str | os.PathLike | None = None, full: bool = True) -> dict[str, Any]:
    """Index exactly one source into the manifest ``out``; returns the index's statistics.

    ``dicomweb`` is a URL or ``{url, auth_file, ca_bundle, client_cert, client_key, local_copy,
    download_workers, timeout}``; ``dimse`` is ``HOST:PORT`` or ``{address, calling_ae, called_ae, local_copy,
    timeout, retrieve, move_ae, move_port}`` (:func:`pacs_source`). ``cohort`` is a
    :meth:`CohortFilter.from_config` section, ``labels`` a CSV joined on the original ``label_key`` (patient,
    study UID, accession number, series or instance) giving ``label_column``, ``pseudonymize`` the salt file
    (created when absent). Raises when nothing could be indexed or a PACS instance could not be fetched
    (running again fetches only what is missing).
    """
    from .data.cohort import CohortFilter
    from .data.dicom import check_index_outputs, index_tree
    from .data.labels import label_mapping, read_labels
    from .data.manifest import errors_path
    from .data.pseudonymize import Pseudonymizer

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
    label_table = read_labels(labels, label_key, label_column) if labels else None  # before a salt is made
    pz = Pseudonymizer.from_file(pseudonymize) if pseudonymize else None
    if label_table is not None:  # conflicting labels refused before anything is fetched
        label_mapping(label_table, label_key, label_column, pz, source=str(labels))
    options = {"pseudonymizer": pz, "incremental": not full, "labels": label_table, "label_key": label_key,
               "label_column": label_column}
    if kind == "dicom_root":
        result = index_tree(root, out, cohort=cohort_filter, **options)
        where = str(root)
    else:
        from .pacs.credentials import load_credentials
        from .pacs.index import index_pacs

        pacs = {k: v for k, v in spec.items() if k not in ("url", "address", "auth_file") and v is not None}
        creds = load_credentials(spec.get("auth_file")) if kind == "dicomweb" else None
        fetch, result = index_pacs(out, dicomweb=spec.get("url"), dimse=spec.get("address"), cohort=cohort_filter,
                                   credentials=creds, **pacs, **options)
        logger.info("fetched %d of %d selected instances (%d already local, %d failed, %d withdrawn) from %s",
                    fetch.fetched, fetch.instances, fetch.already_cached, fetch.failed, fetch.withdrawn, fetch.server)
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
    from .data.grouping import LEVELS
    from .data.manifest import read_manifest, write_manifest
    from .data.splits import nested_label_fractions, split_groups

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
