"""Fake PACS for the tests of servers that misbehave: a small DICOM instance, a DICOMweb server whose every
GET is a function of the test, and a pynetdicom Query/Retrieve SCP; all on 127.0.0.1, stopping by themselves."""

from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

CR = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


def make_instance(patient: str, study: str, series: str, sop: str, size: int = 64) -> bytes:
    """A small, whole CR instance as Part 10 bytes (what a PACS stores)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CR, sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = CR, sop, study, series
    ds.PatientID, ds.PatientName, ds.Modality, ds.StudyDate = patient, f"{patient}^Name", "CR", "20240101"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(size * size, dtype=np.uint16).tobytes()
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.requests += 1
        self.server.behaviour(self)

    def log_message(self, *args):  # keep the test output quiet
        pass

    def send_json(self, payload, status: int = 200) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_multipart(self, part: bytes, close: bool = True) -> None:
        boundary = "b0undary-7f3a"
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
                + (f"\r\n--{boundary}--\r\n".encode() if close else b""))
        self.send_response(200)
        self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
        self.send_header("Content-Length", str(len(body)))  # honest, also for an answer cut short
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def fake_dicomweb(behaviour):
    """A DICOMweb server on 127.0.0.1 whose every GET is ``behaviour(handler)``; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.behaviour, server.requests = behaviour, 0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def fake_scp(on_find, on_get=None, ae_title: str = "FAKEPACS"):
    """A pynetdicom Query/Retrieve SCP on 127.0.0.1; yields its port."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
    )

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(CR, ExplicitVRLittleEndian, scu_role=True, scp_role=True)
    ae.require_called_aet = True
    handlers = [(evt.EVT_C_FIND, on_find)] + ([(evt.EVT_C_GET, on_get)] if on_get else [])
    scp = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    try:
        yield scp.server_address[1]
    finally:
        scp.shutdown()


