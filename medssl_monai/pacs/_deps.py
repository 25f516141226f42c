"""The PACS extra (``pip install 'medssl-monai[pacs]'``): its packages are imported only where a remote archive
is used, after :func:`require`, so a folder-only install imports, trains and predicts without them and a PACS
command without them fails with one line saying what to install (MONAI's ``optional_import`` pattern)."""

from __future__ import annotations

from monai.utils import OptionalImportError, optional_import

__all__ = ["DICOMWEB_PACKAGES", "DIMSE_PACKAGES", "PACS_EXTRA", "MissingExtraError", "require"]

PACS_EXTRA = "pip install 'medssl-monai[pacs]'"
DICOMWEB_PACKAGES = ("requests", "dicomweb_client")
DIMSE_PACKAGES = ("pynetdicom",)

# What each package of the extra is for, so the message names the feature the user asked for.
_FEATURE = {
    "dicomweb_client": "DICOMweb (QIDO-RS/WADO-RS/STOW-RS)",
    "requests": "DICOMweb (QIDO-RS/WADO-RS/STOW-RS)",
    "urllib3": "DICOMweb (QIDO-RS/WADO-RS/STOW-RS)",
    "pynetdicom": "DIMSE (C-FIND/C-GET)",
    "highdicom": "DICOM SR export",
}


class MissingExtraError(OptionalImportError):
    """A package of an optional extra is not installed; the message is one line with the pip command."""


def require(*modules: str) -> None:
    """Check that each of ``modules`` (packages of the PACS extra) imports, else raise
    :class:`MissingExtraError` naming the feature, the missing package and the install command."""
    for module in modules:
        if not optional_import(module)[1]:
            feature = _FEATURE.get(module.split(".")[0], "this command")
            raise MissingExtraError(f"{feature} needs the PACS extra: {PACS_EXTRA} ({module} is not installed)")
