"""A generated PACS archive for discovery tests and the cohort benchmark: many tiny studies, uploaded fast.

Each study is one series of 8x8 CR, DX or CT instances (valid Part 10 files made with pydicom), so thousands
of studies are generated in seconds and an Orthanc holds them in a few MB.
The cohort is chosen by the caller through each study's attributes, so the expected selection is known
independently of any client code.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

ROOT = "1.2.826.0.1.3680043.10.1138"  # a private test root: never collides with real UIDs


@dataclass(frozen=True)
class StudySpec:
    """One generated study: its single series' attributes (the cohort filters select on these)."""

    index: int
    modality: str = "CR"
    body_part: str = "CHEST"
    study_date: str = "20220101"
    series_description: str = "PA"
    instances: int = 1

    @property
    def study_uid(self) -> str:
        return f"{ROOT}.{self.index}"

    @property
    def series_uid(self) -> str:
        return f"{ROOT}.{self.index}.1"

    def sop_uid(self, k: int) -> str:
        return f"{ROOT}.{self.index}.1.{k + 1}"


def instance_bytes(spec: StudySpec, k: int = 0) -> bytes:
    """A tiny (8x8, 8-bit) Part 10 image of ``spec``'s series, explicit VR little endian."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_class = {"CT": "1.2.840.10008.5.1.4.1.1.2", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}.get(
        spec.modality, "1.2.840.10008.5.1.4.1.1.1")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = spec.sop_uid(k)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, spec.sop_uid(k)
    ds.PatientID, ds.PatientName = f"GEN{spec.index // 2:06d}", f"Gen^{spec.index // 2}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = spec.study_uid, spec.series_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = spec.study_date, "120000", "1", f"A{spec.index}"
    ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = spec.modality, spec.body_part, spec.series_description
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (np.arange(64, dtype=np.uint8) + spec.index % 7).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def upload(post: Callable[[bytes], None], specs: Iterable[StudySpec], workers: int = 8) -> int:
    """POST every instance of ``specs`` (Orthanc's REST ``POST /instances``) from ``workers`` threads."""
    payloads = ((s, k) for s in specs for k in range(s.instances))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(1 for _ in pool.map(lambda sk: post(instance_bytes(*sk)), payloads))


def orthanc_poster(server) -> Callable[[bytes], None]:
    """A thread-safe ``POST /instances`` to a :class:`orthanc_server.OrthancServer` (one session per thread)."""
    import threading

    import requests

    local = threading.local()

    def post(data: bytes) -> None:
        if not hasattr(local, "s"):
            local.s = requests.Session()
            local.s.auth = server.auth
        r = local.s.post(server.url + "/instances", data=data, headers={"Content-Type": "application/dicom"},
                         timeout=60)
        r.raise_for_status()

    return post
