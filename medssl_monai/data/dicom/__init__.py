"""DICOM folder trees: headers checked without decoding (``header``), the walk (``walk``), the incremental
index that turns a tree into a manifest (``index``)."""

from .header import NIFTI_SUFFIXES, SkipFile, read_dicom_header, read_nifti_header
from .index import FORMAT_VERSION, IndexResult, check_index_outputs, index_tree, summarize, write_index
from .walk import iter_files, printable_path

__all__ = [
    "FORMAT_VERSION",
    "NIFTI_SUFFIXES",
    "IndexResult",
    "SkipFile",
    "check_index_outputs",
    "index_tree",
    "iter_files",
    "printable_path",
    "read_dicom_header",
    "read_nifti_header",
    "summarize",
    "write_index",
]
