"""Keep DICOM element values out of logs.

pydicom reports invalid element values through ``warn_and_log``, which quotes the value (a PatientName
among them) to the ``pydicom`` logger; that logger propagates to the root logger and so to any log file or
console handler an application sets up. The data layer never needs those messages.
"""

from __future__ import annotations

import logging

__all__ = ["silence_pydicom_logger"]


def silence_pydicom_logger() -> None:
    """Stop pydicom's log records (which may quote identifiers) from reaching application handlers."""
    lg = logging.getLogger("pydicom")
    lg.propagate = False
    lg.setLevel(logging.ERROR)
