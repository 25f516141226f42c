"""What the PACS defences cost: a request through :class:`~medssl_monai.pacs.http.GuardedSession` (deadline
watchdog, chunked read against a cap, the DICOM JSON shape check) vs a plain ``requests.Session`` against
the same local server, and the verification of an instance before it enters the local copy
(:func:`~medssl_monai.pacs.local_copy.verify_instance`) vs the folder index's own header read.

    python bench/bench_pacs_guard.py [--requests 300] [--instances 200] [--json bench/results/pacs_guard.json]

Everything runs on 127.0.0.1 in this process; each pair is measured in the same run, so the ratio is what
the defence adds whatever the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_pacs import make_instance

from medssl_monai.data.dicom.header import read_dicom_header
from medssl_monai.pacs.dicomweb import _check_dicom_json
from medssl_monai.pacs.http import GuardedSession
from medssl_monai.pacs.local_copy import verify_instance

#: one QIDO-RS page of 50 series, about what a series-level answer carries
PAGE = json.dumps([{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{i}"]}, "0020000E": {"vr": "UI", "Value": [f"1.2.4.{i}"]},
                    "00080060": {"vr": "CS", "Value": ["CR"]}} for i in range(50)]).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):
        pass


def _per_request(session: requests.Session, url: str, n: int) -> float:
    session.get(url, headers={"Accept": "application/dicom+json"}, timeout=10).json()  # warm: connection open
    t0 = time.perf_counter()
    for _ in range(n):
        session.get(url, headers={"Accept": "application/dicom+json"}, timeout=10).json()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--json", default="bench/results/pacs_guard.json")
    args = ap.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web/series"
    guarded = GuardedSession(deadline=60)
    guarded.answer_check = _check_dicom_json
    plain_s = _per_request(requests.Session(), url, args.requests)
    guarded_s = _per_request(guarded, url, args.requests)
    server.shutdown()

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(args.instances):
            sop = generate_uid()
            p = Path(tmp) / f"{sop}.dcm"
            p.write_bytes(make_instance(f"P{i}", generate_uid(), generate_uid(), sop, size=256))
            files.append((p, sop))
        t0 = time.perf_counter()
        for p, _sop in files:
            read_dicom_header(str(p))
        header_s = (time.perf_counter() - t0) / len(files)
        t0 = time.perf_counter()
        for p, sop in files:
            verify_instance(p, sop)
        verify_s = (time.perf_counter() - t0) / len(files)

    rows = [("QIDO-RS request (50 series), plain requests", plain_s), ("same, GuardedSession", guarded_s),
            ("index header read of one instance", header_s), ("verify_instance of one instance", verify_s)]
    print(f"{'what':48s} {'ms':>8s}")
    for name, sec in rows:
        print(f"{name:48s} {sec * 1e3:8.3f}")
    print(f"guarded / plain request: {guarded_s / plain_s:.2f}x; verify / header read: {verify_s / header_s:.2f}x")
    result = {"machine": platform.platform(), "python": platform.python_version(), "requests": args.requests,
              "instances": args.instances, "plain_request_ms": plain_s * 1e3, "guarded_request_ms": guarded_s * 1e3,
              "guarded_over_plain": guarded_s / plain_s, "header_read_ms": header_s * 1e3,
              "verify_ms": verify_s * 1e3, "verify_over_header_read": verify_s / header_s}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
