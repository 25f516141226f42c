"""A private Orthanc for the PACS tests: own configuration, free ports, temporary storage, basic auth.

Debian's ``orthanc`` package may run a system service; the tests never use it. They start their own
``Orthanc`` process on 127.0.0.1 with the DICOMweb plugin loaded and a modality entry for the test's own
DICOM application entity (C-FIND/C-GET/C-MOVE allowed), wait until its REST API answers, and stop it after.
Where Orthanc is not installed the tests skip with the reason; under ``CI=true`` its absence is a failure
(``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Where Debian's ``orthanc-dicomweb`` puts its plugin (and where other builds commonly do).
PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)
USER = "medssl"
SCU_AET = "MEDSSLSCU"
SERVER_AET = "ORTHANCTEST"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(reason: str):
    msg = f"Orthanc not available: {reason} (apt-get install -y orthanc orthanc-dicomweb)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + " — required under CI=true")
    pytest.skip(msg)


def find_dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared library: from the Debian package's file list, else the usual places."""
    try:
        listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=20)
        for line in listing.stdout.splitlines():
            if line.endswith(".so") and "DicomWeb" in line and Path(line).is_file():
                return line
    except (OSError, subprocess.SubprocessError):
        pass
    return next((p for p in PLUGIN_CANDIDATES if Path(p).is_file()), None)


@dataclass
class OrthancServer:
    """A running private Orthanc: its URLs, ports, credentials and the port our SCP listens on."""

    process: subprocess.Popen
    root: Path
    http_port: int
    dicom_port: int
    scu_port: int
    password: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return USER, self.password

    @property
    def http_auth(self) -> tuple[bytes, bytes]:
        """``auth`` UTF-8 encoded, as Orthanc compares it (``requests`` would encode a str Latin-1)."""
        return USER.encode("utf-8"), self.password.encode("utf-8")

    def rest(self, method: str, path: str, **kw):
        import requests

        r = requests.request(method, self.url + path, auth=self.http_auth, timeout=30, **kw)
        r.raise_for_status()
        return r.json() if r.content else None

    def clear(self) -> None:
        """Delete every patient (and so everything) stored."""
        for pid in self.rest("GET", "/patients"):
            self.rest("DELETE", f"/patients/{pid}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_orthanc(root: Path, password: str = "orthanc-test-secret", timeout: float = 60.0,
                  options: dict | None = None, extra: dict | None = None) -> OrthancServer:
    """Write a configuration under ``root`` and start Orthanc with it; skip/fail when Orthanc is missing.
    ``options`` / ``extra`` add or replace top-level configuration options (e.g. ``{"OverwriteInstances":
    True}``, ``{"LimitFindResults": 10}``)."""
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
    if exe is None:
        _missing("no 'Orthanc' executable")
    plugin = find_dicomweb_plugin()
    if plugin is None:
        _missing("the DICOMweb plugin (libOrthancDicomWeb.so) is not installed")
    try:
        import requests
    except ImportError:
        _missing("python package 'requests' missing")
    root.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port, scu_port = free_port(), free_port(), free_port()
    modality = {"AET": SCU_AET, "Host": "127.0.0.1", "Port": scu_port, "AllowEcho": True, "AllowFind": True,
                "AllowGet": True, "AllowMove": True, "AllowStore": True}
    config = {
        "Name": "medssl-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "Plugins": [plugin],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: password},
        "DicomServerEnabled": True,
        "DicomAet": SERVER_AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomModalities": {"medssl": modality},
        "StorageCompression": False,
        "SaveJobs": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Ssl": False, "StudiesMetadata": "Full",
                     "SeriesMetadata": "Full"},
    }
    config.update(options or {})
    config.update(extra or {})
    cfg = root / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=1))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    server = OrthancServer(proc, root, http_port, dicom_port, scu_port, password)
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"Orthanc exited with {proc.returncode} at start-up:\n"
                        + (root / "orthanc.log").read_text()[-3000:])
        try:
            r = requests.get(server.url + "/plugins", auth=server.http_auth, timeout=2)
            if r.status_code == 200 and "dicom-web" in r.json():
                return server
        except requests.RequestException:
            pass
        time.sleep(0.2)
    server.stop()
    pytest.fail(f"Orthanc did not answer within {timeout:.0f} s:\n" + (root / "orthanc.log").read_text()[-3000:])
