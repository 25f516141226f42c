"""Cohort discovery that grows with the cohort, not the archive, and C-MOVE, against a real Orthanc.

A generated archive of 60 small studies (3 of them the cohort) sits in Orthanc. DICOMweb requests are counted
by a small HTTP proxy in front of it that also caps every QIDO-RS answer at a few results (as Google's
Healthcare API or dcm4chee's result limit do), so paging is exercised; C-FINDs are counted at pynetdicom's
``Association.send_c_find``. The expected cohort comes from the generated specs, not from the client.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest
from orthanc_server import SCU_AET, SERVER_AET, start_orthanc
from pacs_archive import StudySpec, orthanc_poster, upload

from medssl_monai.cli import main as cli
from medssl_monai.data import index_tree, read_manifest
from medssl_monai.data.cohort import CohortFilter
from medssl_monai.pacs.credentials import Credentials
from medssl_monai.pacs.dicomweb import _Server, fetch_dicomweb, select_dicomweb
from medssl_monai.pacs.dimse import _Dimse, fetch_dimse, select_dimse
from medssl_monai.pacs.errors import PacsError
from medssl_monai.pacs.local_copy import LocalCopy

N_STUDIES = 60
COHORT = {"modality": "DX", "body_part": "KNEE"}
CAP = 7  # the proxy's answer limit per QIDO-RS response


def _spec(i: int) -> StudySpec:
    if i in (5, 30, 47):  # the cohort: DX knee (one series of 3 instances)
        return StudySpec(i, modality="DX", body_part="KNEE", study_date="20210310", series_description="knee AP",
                         instances=3 if i == 30 else 1)
    if i % 10 == 0:  # decoys: DX chest, CR knee
        return StudySpec(i, modality="DX", body_part="CHEST", study_date="20210310")
    if i % 10 == 1:
        return StudySpec(i, modality="CR", body_part="KNEE", study_date="20210310")
    return StudySpec(i, modality="CR", study_date=f"2022{1 + i % 12:02d}{1 + i % 28:02d}",
                     series_description="PA chest" if i % 3 else "AP")


SPECS = [_spec(i) for i in range(N_STUDIES)]


def _expected(pred) -> set[str]:
    return {s.sop_uid(k) for s in SPECS if pred(s) for k in range(s.instances)}


COHORT_UIDS = _expected(lambda s: s.modality == "DX" and s.body_part == "KNEE")


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True


def start_proxy(upstream: str, auth: tuple[str, str], cap: int):
    """A counting HTTP proxy that caps each QIDO-RS answer at ``cap`` results (honouring ``offset``)."""
    import requests

    log: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            path, _, query = self.path.partition("?")
            parts = [q for q in query.split("&") if q]  # forwarded as sent (Orthanc decodes no %-escapes)
            if path.rstrip("/").rsplit("/", 1)[-1] in ("studies", "series", "instances"):
                limit = min([int(q[6:]) for q in parts if q.startswith("limit=")] or [cap])
                parts = [q for q in parts if not q.startswith("limit=")] + [f"limit={min(limit, cap)}"]
            log.append(path + ("?" + "&".join(parts) if parts else ""))
            r = requests.get(upstream + log[-1], auth=auth, timeout=30,
                             headers={k: v for k, v in self.headers.items() if k.lower() == "accept"})
            self.send_response(r.status_code)
            self.send_header("Content-Type", r.headers.get("Content-Type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

    server = _Proxy(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.log = log
    server.url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    return server


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = start_orthanc(tmp_path_factory.mktemp("orthanc_archive"))
    try:
        assert upload(orthanc_poster(server), SPECS, workers=4) == sum(s.instances for s in SPECS)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def proxy(orthanc):
    p = start_proxy(orthanc.url, orthanc.auth, CAP)
    yield p
    p.shutdown()


def _web(url: str) -> _Server:
    return _Server(url, Credentials(), None, timeout=30, retries=0, backoff=0)


@pytest.fixture
def c_finds(monkeypatch):
    """The identifiers of every C-FIND sent (counted at pynetdicom, below our code)."""
    from pynetdicom.association import Association

    sent: list = []
    real = Association.send_c_find

    def counted(self, identifier, *a, **kw):
        sent.append(identifier)
        return real(self, identifier, *a, **kw)

    monkeypatch.setattr(Association, "send_c_find", counted)
    return sent


def _dimse(orthanc) -> _Dimse:
    return _Dimse("127.0.0.1", orthanc.dicom_port, SCU_AET, SERVER_AET, timeout=30)


# ---------------------------------------------------------------- DICOMweb


def test_capped_server_archive_found_whole(proxy, orthanc):
    """Every answer capped at 7: the whole archive (more series than any one answer holds) is still found."""
    proxy.log.clear()
    instances, n_studies, n_series = select_dicomweb(_web(proxy.url), CohortFilter())
    assert {i.sop_uid for i in instances} == _expected(lambda s: True)
    assert (n_studies, n_series) == (N_STUDIES, N_STUDIES)
    assert len(orthanc.rest("GET", "/instances")) == len(instances)
    series_pages = [p for p in proxy.log if p.startswith("/dicom-web/series?")]
    assert len(series_pages) >= N_STUDIES // CAP  # it did page (no single answer held them)
    cr = CohortFilter.create(modality="CR")
    assert {i.sop_uid for i in select_dicomweb(_web(proxy.url), cr)[0]} == _expected(lambda s: s.modality == "CR")


def test_dicomweb_discovery_requests_bounded_by_the_cohort(proxy):
    cohort = CohortFilter.create(**COHORT)
    proxy.log.clear()
    instances, n_studies, n_series = select_dicomweb(_web(proxy.url), cohort)
    new = list(proxy.log)
    assert {i.sop_uid for i in instances} == COHORT_UIDS and (n_studies, n_series) == (3, 3)
    # one series-level query (paged: the answer, then the empty page that ends it) + one per matching series
    assert len([p for p in new if p.startswith("/dicom-web/series?")]) <= 2
    per_series = [p for p in new if p.endswith("/instances") or "/instances?" in p]
    assert len(per_series) == n_series
    matching = {s.series_uid for s in SPECS if s.modality == "DX" and s.body_part == "KNEE"}
    assert {p.split("/series/")[1].split("/")[0] for p in per_series} == matching  # no other series asked for
    assert len(new) <= 2 + 2 * n_series
    # the former walk asks per study of the archive; same cohort
    proxy.log.clear()
    old = select_dicomweb(_web(proxy.url), cohort, strategy="per-study")
    assert {i.sop_uid for i in old[0]} == COHORT_UIDS
    assert len(proxy.log) >= N_STUDIES > 5 * len(new)


@pytest.mark.parametrize("spec", [{"study_date": "20210301-20210331", "modality": "DX,CR", "body_part": "KNEE"},
                                  {"series_description": "PA chest"}, {"series_description": "*P?"},
                                  {"study_date": "20220301-", "series_description": "A*"}])
def test_server_side_keys_lose_nothing(spec, proxy, orthanc):
    """Keys the server applies (lists split into queries, wildcards, a space sent as ?, study date in a series
    query) give exactly the locally matched cohort, over DICOMweb and C-FIND."""
    cohort = CohortFilter.create(**spec)
    expected = _expected(lambda s: cohort.matches({"modality": s.modality, "body_part": s.body_part,
                                                   "study_date": s.study_date,
                                                   "series_description": s.series_description}))
    assert expected
    assert {i.sop_uid for i in select_dicomweb(_web(proxy.url), cohort)[0]} == expected
    assert {i.sop_uid for i in select_dimse(_dimse(orthanc), cohort)[0]} == expected


def test_fetch_through_capped_server_equals_cohort(proxy, tmp_path):
    stats = fetch_dicomweb(proxy.url, tmp_path / "c", CohortFilter.create(**COHORT), retries=0)
    assert stats.fetched == stats.instances == len(COHORT_UIDS)
    assert LocalCopy(tmp_path / "c").known() == COHORT_UIDS


# ---------------------------------------------------------------- DIMSE


def test_dimse_discovery_c_finds_bounded_by_the_cohort(orthanc, c_finds):
    cohort = CohortFilter.create(**COHORT)
    instances, _n_studies, n_series = select_dimse(_dimse(orthanc), cohort)
    assert {i.sop_uid for i in instances} == COHORT_UIDS
    levels = [str(q.QueryRetrieveLevel) for q in c_finds]
    # study level once (one modality), then series level only in the studies holding a DX series
    dx_studies = sum(1 for s in SPECS if s.modality == "DX")
    assert levels.count("STUDY") == 1 and levels.count("SERIES") == dx_studies and levels.count("IMAGE") == n_series
    assert all(q.ModalitiesInStudy == "DX" for q in c_finds if q.QueryRetrieveLevel == "STUDY")
    new = len(c_finds)
    c_finds.clear()
    old = select_dimse(_dimse(orthanc), cohort, strategy="per-study")
    assert {i.sop_uid for i in old[0]} == COHORT_UIDS
    assert len(c_finds) >= N_STUDIES > 4 * new


def test_dimse_answer_limit_is_one_clear_line(tmp_path):
    """Orthanc's LimitFindResults cuts a C-FIND short (status 0xFE00): said so, not a silently partial cohort."""
    server = start_orthanc(tmp_path / "o", extra={"LimitFindResults": 4})
    try:
        upload(orthanc_poster(server), SPECS[:8], workers=2)
        pacs = _Dimse("127.0.0.1", server.dicom_port, SCU_AET, SERVER_AET, timeout=30)
        with pytest.raises(PacsError, match=r"stopped answering a C-FIND after \d+ matches.*--study-date") as err:
            select_dimse(pacs, CohortFilter())
        assert "\n" not in str(err.value)
        cohort = CohortFilter.create(**COHORT)  # a filtered study-level query stays under the limit
        assert {i.sop_uid for i in select_dimse(pacs, cohort)[0]} == {SPECS[5].sop_uid(0)}
    finally:
        server.stop()


# ---------------------------------------------------------------- C-MOVE


def _read_all(folder) -> dict[str, pydicom.Dataset]:
    return {p.stem: pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))}


def test_c_move_cohort_equals_c_get_cohort_and_resumes(orthanc, tmp_path, capsys):
    cohort = CohortFilter.create(modality="DX")
    address = f"127.0.0.1:{orthanc.dicom_port}"
    got = fetch_dimse(address, tmp_path / "get", cohort, calling_ae=SCU_AET, called_ae=SERVER_AET)
    moved = fetch_dimse(address, tmp_path / "move", cohort, calling_ae=SCU_AET, called_ae=SERVER_AET,
                        retrieve="move", move_port=orthanc.scu_port)
    expected = _expected(lambda s: s.modality == "DX")
    assert got.fetched == moved.fetched == len(expected) and moved.failed == 0
    a, b = _read_all(tmp_path / "get"), _read_all(tmp_path / "move")
    assert set(a) == set(b) == expected and all(a[k] == b[k] for k in a)
    assert oct((tmp_path / "move").stat().st_mode & 0o777) == "0o700"
    # resume: one instance of the 3-instance series and one single instance missing -> only those moved
    lost = [SPECS[30].sop_uid(1), SPECS[5].sop_uid(0)]
    for uid in lost:
        (tmp_path / "move" / f"{uid}.dcm").unlink()
    again = fetch_dimse(address, tmp_path / "move", cohort, calling_ae=SCU_AET, called_ae=SERVER_AET,
                        retrieve="move", move_port=orthanc.scu_port)
    assert (again.fetched, again.already_cached, again.failed) == (2, len(expected) - 2, 0)
    assert LocalCopy(tmp_path / "move").known() == expected and not LocalCopy(tmp_path / "move").partial_files()
    # the CLI: the C-MOVE manifest equals the folder index of the C-GET copy
    assert cli(["-q", "index", "--dimse", address, "--calling-ae", SCU_AET, "--called-ae", SERVER_AET, "--modality",
                "DX", "--retrieve", "move", "--move-ae", SCU_AET, "--move-port", str(orthanc.scu_port),
                "--out", str(tmp_path / "m.csv")]) == 0
    cols = ["sop_uid", "series_uid", "study_uid", "patient_id", "modality", "body_part"]
    g = index_tree(tmp_path / "get", tmp_path / "g.csv").manifest
    m = read_manifest(tmp_path / "m.csv", resolve_paths=False)
    g, m = (df[cols].sort_values("sop_uid").reset_index(drop=True) for df in (g, m))
    assert len(g) == len(expected) and g.equals(m)


def test_c_move_to_an_unknown_ae_is_one_clear_line(orthanc, tmp_path, capsys):
    args = ["-q", "index", "--dimse", f"127.0.0.1:{orthanc.dicom_port}", "--calling-ae", SCU_AET, "--called-ae",
            SERVER_AET, "--modality", "DX", "--retrieve", "move", "--move-ae", "NOTKNOWN", "--move-port",
            str(orthanc.scu_port), "--out", str(tmp_path / "m.csv")]
    assert cli(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "NOTKNOWN" in err and "does not know the C-MOVE destination" in err and str(orthanc.scu_port) in err
    assert not LocalCopy(tmp_path / "m.cache").known()
    assert cli([*args[:-8], "--retrieve", "move", "--out", str(tmp_path / "x.csv")]) == 1
    assert "--move-port" in capsys.readouterr().err
