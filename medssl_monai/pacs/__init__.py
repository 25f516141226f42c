"""Remote archives: DICOMweb (QIDO-RS/WADO-RS/STOW-RS) and DIMSE (C-FIND/C-GET/C-MOVE) clients, the credentials
they use, their errors, and the local copy of what they fetched (kept apart from the data layer, as MONAI
keeps ``monai.apps.tcia``: a folder index needs none of it)."""

from .credentials import Credentials, load_credentials, make_session, server_name
from .errors import PacsError, describe_http_error
from .fetch import FetchStats, RemoteInstance
from .local_copy import LocalCopy

__all__ = [
    "Credentials",
    "FetchStats",
    "LocalCopy",
    "PacsError",
    "RemoteInstance",
    "describe_http_error",
    "load_credentials",
    "make_session",
    "server_name",
]
