"""Index a PACS cohort: fetch it into the local cache (DICOMweb or DIMSE), then index the cache as a folder.

Going through the folder index (same header reader, same grouping, same pseudonymisation, same cohort
filter applied to the headers) is what makes a network index produce exactly the manifest a folder index
of the same instances produces.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .cohort import CohortFilter
from .credentials import Credentials
from .dicom_index import IndexResult, index_tree
from .dicomweb_source import FetchStats, fetch_dicomweb
from .dimse_source import fetch_dimse

__all__ = ["default_cache", "index_pacs"]


def default_cache(out: str | os.PathLike) -> Path:
    """``runs/x/manifest.csv`` -> ``runs/x/manifest.cache`` (private, 0700: it holds the original DICOM)."""
    p = Path(out)
    return p.with_name(p.stem + ".cache")


def index_pacs(
    out: str | os.PathLike,
    *,
    dicomweb: str | None = None,
    dimse: str | None = None,
    cohort: CohortFilter | None = None,
    cache: str | os.PathLike | None = None,
    credentials: Credentials | None = None,
    ca_bundle: str | None = None,
    calling_ae: str = "MEDSSL",
    called_ae: str = "ANY-SCP",
    download_workers: int = 4,
    timeout: float = 30.0,
    fetch_progress=None,
    **index_kwargs: Any,
) -> tuple[FetchStats, IndexResult]:
    """Fetch the cohort from ``dicomweb`` (a URL) or ``dimse`` (``HOST:PORT``) into ``cache`` (default
    :func:`default_cache`), then :func:`~medssl_monai.data.dicom_index.index_tree` the cache into ``out``
    with the same cohort filter; ``index_kwargs`` go to ``index_tree`` (pseudonymizer, labels, ...)."""
    if (dicomweb is None) == (dimse is None):
        raise ValueError("give exactly one of dicomweb (a URL) and dimse (HOST:PORT)")
    cohort = cohort or CohortFilter()
    cache_dir = Path(cache) if cache is not None else default_cache(out)
    if dicomweb is not None:
        stats = fetch_dicomweb(dicomweb, cache_dir, cohort, credentials, ca_bundle=ca_bundle,
                               workers=download_workers, timeout=timeout, progress=fetch_progress)
    else:
        stats = fetch_dimse(dimse, cache_dir, cohort, calling_ae=calling_ae, called_ae=called_ae, timeout=timeout,
                            progress=fetch_progress)
    result = index_tree(cache_dir, out, cohort=cohort, **index_kwargs)
    return stats, result
