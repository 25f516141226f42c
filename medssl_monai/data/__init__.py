"""Data layer: index image exports into manifests, group them, split them, and load their pixels."""

from .batch_pairs import CachedPairDataset, PairBatchSampler, PairIndex, cached_pair_loader
from .cache import (
    CACHE_MODES,
    CacheBudgetError,
    CacheStoreError,
    ImageCache,
    ImageCacheSpec,
    build_image_cache,
    row_report_key,
    source_shape,
)
from .dicom import IndexResult, SkipFile, index_tree, read_dicom_header, summarize
from .grouping import LEVELS, MultiInstanceIndex
from .labels import EncodeLabeld, LabelEncoder
from .manifest import MANIFEST_COLUMNS, errors_path, read_manifest, write_manifest
from .pairs import ContrastivePairDataset
from .pseudonymize import Pseudonymizer, load_or_create_salt
from .reader import (
    LoadManifestImage,
    LoadManifestImaged,
    MissingCodecError,
    read_dicom_frame,
    read_series,
    series_folder_image,
)
from .splits import (
    LeakageError,
    check_no_leakage,
    fraction_column,
    nested_label_fractions,
    select_labelled,
    split_groups,
)
from .table import table_to_manifest

__all__ = [
    "CACHE_MODES",
    "LEVELS",
    "MANIFEST_COLUMNS",
    "CacheBudgetError",
    "CacheStoreError",
    "CachedPairDataset",
    "ContrastivePairDataset",
    "EncodeLabeld",
    "ImageCache",
    "ImageCacheSpec",
    "IndexResult",
    "LabelEncoder",
    "LeakageError",
    "LoadManifestImage",
    "LoadManifestImaged",
    "MissingCodecError",
    "MultiInstanceIndex",
    "PairBatchSampler",
    "PairIndex",
    "Pseudonymizer",
    "SkipFile",
    "build_image_cache",
    "cached_pair_loader",
    "check_no_leakage",
    "errors_path",
    "fraction_column",
    "index_tree",
    "load_or_create_salt",
    "nested_label_fractions",
    "read_dicom_frame",
    "read_dicom_header",
    "read_manifest",
    "read_series",
    "row_report_key",
    "select_labelled",
    "series_folder_image",
    "source_shape",
    "split_groups",
    "summarize",
    "table_to_manifest",
    "write_manifest",
]
