"""Servers that misbehave: fake DICOMweb servers (``http.server`` on 127.0.0.1) and DIMSE peers (pynetdicom)
that cut answers short, send another patient's instance, drip bytes, declare huge answers, page forever,
answer C-FIND "pending" forever, or send JSON of the wrong shape. Each must end in one line naming the
server (or a counted, refused instance), never a hang, a traceback, or a stored instance that is not whole.

Every server here stops by itself (bounded loops, daemon threads) and the deadlines are 1-2 s.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import contextmanager
from io import BytesIO

import pydicom
import pytest
from fake_pacs import CR, Handler, fake_dicomweb, fake_scp, make_instance
from pydicom.uid import generate_uid

from medssl_monai.cli import main as cli
from medssl_monai.data import index_tree
from medssl_monai.pacs.dicomweb import fetch_dicomweb
from medssl_monai.pacs.dimse import fetch_dimse
from medssl_monai.pacs.errors import PacsError
from medssl_monai.pacs.http import GuardedSession
from medssl_monai.pacs.local_copy import LocalCopy


class Archive:
    """One study, one series, one instance of patient A; patient B's instance exists too (not in the cohort)."""

    def __init__(self) -> None:
        self.study, self.series, self.sop = generate_uid(), generate_uid(), generate_uid()
        self.a = make_instance("PAT-A-4711", self.study, self.series, self.sop)
        self.b_study, self.b_series, self.b_sop = generate_uid(), generate_uid(), generate_uid()
        self.b = make_instance("PAT-B-0815", self.b_study, self.b_series, self.b_sop)

    def qido(self, path: str) -> list[dict]:
        if path.endswith("/studies"):
            return [{"0020000D": {"vr": "UI", "Value": [self.study]}, "00080020": {"vr": "DA", "Value": ["20240101"]}}]
        if path.endswith("/series"):
            return [{"0020000D": {"vr": "UI", "Value": [self.study]}, "0020000E": {"vr": "UI", "Value": [self.series]},
                     "00080060": {"vr": "CS", "Value": ["CR"]}}]
        return [{"0020000D": {"vr": "UI", "Value": [self.study]}, "0020000E": {"vr": "UI", "Value": [self.series]},
                 "00080018": {"vr": "UI", "Value": [self.sop]}, "00080016": {"vr": "UI", "Value": [CR]}}]


@pytest.fixture
def archive() -> Archive:
    return Archive()


def _serving(archive: Archive, wado):
    """QIDO from the archive, WADO-RS by ``wado(handler)``."""
    def behaviour(h: Handler) -> None:
        path = h.path.split("?")[0]
        if "/instances/" in path:
            wado(h)
        else:
            h.send_json(archive.qido(path))
    return behaviour


# ---------------------------------------------------------------- 7: cut-short and wrong instances


def _cut_answers(archive: Archive) -> dict:
    whole = archive.a
    return {
        # the case: honest Content-Length, the part cut short, no closing boundary
        "no_closing_boundary": lambda h: h.send_multipart(whole[: len(whole) * 2 // 3], close=False),
        # a whole multipart message around a file cut inside its pixel data
        "pixel_data_cut": lambda h: h.send_multipart(whole[: len(whole) - 100]),
        # another patient's instance for the one asked for
        "other_instance": lambda h: h.send_multipart(archive.b),
        "not_dicom": lambda h: h.send_multipart(b"<html>proxy error</html>"),
    }


@pytest.mark.parametrize("fault", ["no_closing_boundary", "pixel_data_cut", "other_instance", "not_dicom"])
def test_damaged_answer_is_never_stored_and_the_next_run_fetches_it(fault, archive, tmp_path, caplog):
    answers = {"fault": _cut_answers(archive)[fault]}
    with fake_dicomweb(_serving(archive, lambda h: answers["fault"](h))) as (url, server):
        stats = fetch_dicomweb(url, tmp_path / "c", retries=1, backoff=0.01, deadline=5)
        assert (stats.instances, stats.fetched, stats.failed, stats.rejected) == (1, 0, 1, 1)
        assert LocalCopy(tmp_path / "c").known() == set() and not list((tmp_path / "c").iterdir())
        # series and instance level (each short first page is asked once more: a server may cap pages below
        # the asked limit), the retrieve and its one retry
        assert server.requests == 2 + 2 + 2
        assert "PAT-B" not in caplog.text and archive.sop not in caplog.text and archive.b_sop not in caplog.text
        answers["fault"] = lambda h: h.send_multipart(archive.a)  # the server is well again
        stats = fetch_dicomweb(url, tmp_path / "c", retries=0, deadline=5)
    assert (stats.fetched, stats.failed, stats.already_cached) == (1, 0, 0)
    assert (tmp_path / "c" / f"{archive.sop}.dcm").read_bytes() == archive.a  # the bytes the PACS stores


def test_damaged_file_already_in_the_cache_is_fetched_again(archive, tmp_path):
    cache = LocalCopy(tmp_path / "c")
    cache.write(archive.sop, archive.a[:-300], verify=False)  # what an older version stored from a cut answer
    with fake_dicomweb(_serving(archive, lambda h: h.send_multipart(archive.a))) as (url, _server):
        stats = fetch_dicomweb(url, tmp_path / "c", retries=0, deadline=5)
        assert (stats.damaged_refetched, stats.fetched, stats.already_cached) == (1, 1, 0)
        assert cache.path_for(archive.sop).read_bytes() == archive.a
        stats = fetch_dicomweb(url, tmp_path / "c", retries=0, deadline=5)  # whole now: nothing to fetch
        assert (stats.damaged_refetched, stats.fetched, stats.already_cached) == (0, 0, 1)


# ---------------------------------------------------------------- 9: deadlines and caps (DICOMweb)


def _drip(h: Handler, where: str) -> None:
    """One byte every 0.4 s (requests' per-read timeout never fires), at most 40 bytes, then stop."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\nContent-Length: 40\r\n\r\n"
    payload = head + b" " * 40
    if where == "body":
        h.wfile.write(head)
        payload = payload[len(head):]
    try:
        for i in range(min(40, len(payload))):
            h.wfile.write(payload[i: i + 1])
            h.wfile.flush()
            time.sleep(0.4)
    except OSError:
        pass  # the client gave up: what we want
    h.close_connection = True


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_dripping_server_ends_at_the_deadline(where, tmp_path):
    with fake_dicomweb(lambda h: _drip(h, where)) as (url, _server):
        t0 = time.monotonic()
        with pytest.raises(PacsError, match=rf"^{url} did not finish answering within 1.5 s \(the overall deadline"):
            fetch_dicomweb(url, tmp_path / "c", retries=2, timeout=10, deadline=1.5)
        assert time.monotonic() - t0 < 4.0  # one request (a deadline is not retried), ended at 1.5 s


def test_a_declared_huge_answer_is_refused_unread(tmp_path):
    def huge(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/dicom+json")
        h.send_header("Content-Length", str(10**12))
        h.end_headers()
        h.wfile.write(b"[" + b" " * 1000)
        h.close_connection = True

    with fake_dicomweb(huge) as (url, _server):
        t0 = time.monotonic()
        with pytest.raises(PacsError, match=rf"^{url} declared an answer of 1,000,000,000,000 bytes, more than the cap"):
            fetch_dicomweb(url, tmp_path / "c", retries=2, deadline=5)
        assert time.monotonic() - t0 < 4.5  # refused on the header, before the 5 s deadline (slack for a loaded CI)


def test_an_undeclared_answer_stops_at_the_cap():
    sent = []

    def endless(h: Handler) -> None:  # no Content-Length: the body ends when the connection closes
        h.send_response(200)
        h.send_header("Content-Type", "application/dicom+json")
        h.send_header("Connection", "close")
        h.end_headers()
        try:
            for _ in range(64):  # 4 MiB at most, far above the 1 MiB cap below
                h.wfile.write(b" " * 2**16)
                sent.append(1)
        except OSError:
            pass
        h.close_connection = True

    with fake_dicomweb(endless) as (url, _server):
        session = GuardedSession(deadline=5, max_json_bytes=2**20)
        with pytest.raises(Exception, match=r"sent more than the cap of 1,048,576 bytes"):
            session.get(url + "/studies", headers={"Accept": "application/dicom+json"}, timeout=5)


def test_endless_paging_stops_at_the_result_cap(tmp_path):
    def pages(h: Handler) -> None:  # every page full and new, whatever the offset
        offset = int(h.path.split("offset=")[1].split("&")[0]) if "offset=" in h.path else 0
        h.send_json([{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{offset + i}"]}} for i in range(500)])

    with fake_dicomweb(pages) as (url, server):
        with pytest.raises(PacsError, match=rf"^{url} answered more than 1,200 results to one query \(series, 3 pages\)"):
            fetch_dicomweb(url, tmp_path / "c", max_results=1200, deadline=5)
        assert server.requests == 3


# ---------------------------------------------------------------- 10: malformed QIDO answers


MALFORMED = {
    "object": ({"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}, "an object instead of a JSON array"),
    "null_item": ([None], "null as item 0 of 1 instead of a DICOM dataset"),
    "numbers": ([1, 2], "a number as item 0 of 2"),
    "bad_attribute": ([{"0020000D": 7}], "a malformed attribute '0020000D' in item 0"),
    "bad_value": ([{"0020000D": {"vr": "UI", "Value": "1.2.3"}}], "a malformed attribute '0020000D'"),
    "not_json": (b"<html>login</html>", "a body that is not JSON"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_qido_answer_is_one_line_naming_the_server_and_nonzero_exit(case, tmp_path, capsys, caplog):
    payload, words = MALFORMED[case]
    caplog.set_level(logging.DEBUG)
    with fake_dicomweb(lambda h: h.send_json(payload)) as (url, _server):
        code = cli(["-q", "index", "--dicomweb", url, "--out", str(tmp_path / "manifest.csv")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"medssl index: error: {url} answered a query with ") and words in lines[0]
    assert not (tmp_path / "manifest.csv").exists()
    # dicomweb-client's retry decorator logs each failure's traceback (URLs with UIDs): kept out of the logs
    assert not [r for r in caplog.records if r.name.startswith(("retrying", "dicomweb_client", "urllib3"))]


# ---------------------------------------------------------------- DIMSE peers (pynetdicom)


def _identifier(archive: Archive, level: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID, ds.StudyDate = archive.study, "20240101"
    if level in ("SERIES", "IMAGE"):
        ds.SeriesInstanceUID, ds.Modality = archive.series, "CR"
    if level == "IMAGE":
        ds.SOPInstanceUID, ds.SOPClassUID = archive.sop, CR
    return ds


def _finder(archive: Archive):
    def on_find(event):
        yield 0xFF00, _identifier(archive, str(event.identifier.QueryRetrieveLevel))
    return on_find


@pytest.mark.parametrize("push", ["unrequested", "disguised"])
def test_c_get_peer_pushing_another_patient_gets_nothing_stored(push, archive, tmp_path, caplog):
    """``unrequested``: another patient's instance under its own UID; ``disguised``: the same, announced with the
    UID asked for (the C-STORE request lies, the dataset does not)."""
    a = pydicom.dcmread(BytesIO(archive.a))
    b = pydicom.dcmread(BytesIO(archive.b))

    def on_get(event):
        if push == "unrequested":
            yield 2
            yield 0xFF00, a
            yield 0xFF00, b
        else:  # C-STORE's Affected SOP Instance UID comes from the dataset: B's data under A's UID
            b.SOPInstanceUID = b.file_meta.MediaStorageSOPInstanceUID = a.SOPInstanceUID
            yield 1
            yield 0xFF00, b
        yield 0x0000, None

    caplog.set_level(logging.INFO, logger="medssl_monai")
    with fake_scp(_finder(archive), on_get) as port:
        stats = fetch_dimse(f"127.0.0.1:{port}", tmp_path / "c", calling_ae="MEDSSL", called_ae="FAKEPACS",
                            timeout=5, deadline=10)
    if push == "disguised":  # its Study/Series Instance UIDs still say patient B's: verification refuses it
        assert (stats.fetched, stats.failed, stats.rejected, stats.unrequested) == (0, 1, 1, 0)
        assert LocalCopy(tmp_path / "c").known() == set() and not list((tmp_path / "c").iterdir())
        return
    assert (stats.instances, stats.fetched, stats.failed, stats.unrequested) == (1, 1, 0, 1)
    assert stats.summary().endswith("1 fetched, 0 already cached, 0 failed, 1 pushed unasked and refused")
    assert LocalCopy(tmp_path / "c").known() == {archive.sop}
    manifest = index_tree(tmp_path / "c", None).manifest
    assert list(manifest["patient_id"]) == ["PAT-A-4711"]  # patient B is neither stored nor indexed
    line = [r.getMessage() for r in caplog.records if "not requested" in r.getMessage()]
    assert len(line) == 1 and "pushed 1 instance(s) that were not requested: refused, not stored" in line[0]
    for secret in ("PAT-B", archive.b_sop, archive.b_study, archive.sop, "PAT-A"):
        assert secret not in caplog.text


@pytest.mark.parametrize("fault", ["pending_forever", "too_many_results"])
def test_c_find_pending_forever_ends_at_the_deadline_or_cap(fault, archive, tmp_path):
    def on_find(event):
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10 and event.assoc.is_established:  # stops by itself
            ds = _identifier(archive, "STUDY")
            ds.StudyInstanceUID = generate_uid()
            yield 0xFF00, ds
            # The flood sleeps 1 ms per answer: a generator that never lets go of the GIL starves this fake server's
            # own sender thread (pynetdicom's DUL), whose answers then arrive in bursts seconds apart (measured on
            # 2 idle cores: 50 answers in 4-10 s, the client waiting on the fake, not on its cap). A real PACS sends
            # from its own process at a steady rate; 1 ms still floods 50 answers in well under a second.
            time.sleep(0.05 if fault == "pending_forever" else 0.001)

    with fake_scp(on_find) as port:
        t0 = time.monotonic()
        kwargs = {"deadline": 1.5} if fault == "pending_forever" else {"deadline": 30, "max_results": 50}
        words = (r"kept answering one C-FIND 'pending' for more than 1.5 s" if fault == "pending_forever"
                 else r"answered more than 50 results to one C-FIND")
        with pytest.raises(PacsError, match=rf"^127.0.0.1:{port} \(called AE FAKEPACS, calling AE MEDSSL\) {words}"):
            fetch_dimse(f"127.0.0.1:{port}", tmp_path / "c", calling_ae="MEDSSL", called_ae="FAKEPACS", timeout=5,
                        **kwargs)
        assert time.monotonic() - t0 < 5.0


# ---------------------------------------------------------------- 14: rejected or aborted association


@contextmanager
def _aborting_peer():
    """Reads an A-ASSOCIATE-RQ and answers A-ABORT (what Orthanc sometimes does for a wrong AE title)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    head = conn.recv(6)
                    if len(head) == 6 and head[0] == 0x01:  # an association request: abort it
                        conn.recv(int.from_bytes(head[2:6], "big"))
                        conn.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0]))
                        time.sleep(0.2)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        srv.close()


@pytest.mark.parametrize("peer", ["rejects", "aborts"])
def test_wrong_ae_rejected_or_aborted_is_the_same_clear_line(peer, archive, tmp_path):
    if peer == "aborts":
        ctx = _aborting_peer()
    else:
        ctx = fake_scp(_finder(archive), ae_title="FAKEPACS")  # requires its own called AE title
    with ctx as port:
        how = "rejected" if peer == "rejects" else "aborted"
        with pytest.raises(PacsError, match=rf"^127.0.0.1:{port} \(called AE WRONGAE, calling AE MEDSSL\) {how} the "
                                            r"association: check both AE titles and that the PACS knows our calling AE"):
            fetch_dimse(f"127.0.0.1:{port}", tmp_path / "c", calling_ae="MEDSSL", called_ae="WRONGAE", timeout=5)
