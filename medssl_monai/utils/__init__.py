"""Utilities every layer may use: nothing here imports the rest of the package."""

from .atomic import atomic_write_bytes, atomic_write_text, atomic_writer
from .checksum import file_sha256
from .rng import RNGState

__all__ = ["RNGState", "atomic_write_bytes", "atomic_write_text", "atomic_writer", "file_sha256"]
