"""Cohort discovery against a PACS: requests and seconds, cohort-first queries vs the former per-study walk.

    python bench/bench_cohort_query.py [--studies 5000] [--small 1000] [--cohort 50] [--json bench/results/cohort_query.json]

A private Orthanc (tests/orthanc_server.py) is loaded with generated studies (one series of one 8x8 instance
each, tests/pacs_archive.py, POSTed in parallel); the cohort is ``--cohort`` DX knee studies (1% of 5,000).
Discovery runs first on a ``--small`` archive holding the whole cohort, then after the archive has grown to
``--studies`` with no new cohort member: the cohort-first requests must stay the same (O(matching series)),
the per-study walk's grow with the archive (the decoys, a DX chest or CR knee series in 4% of the first
archive's studies, which a server cannot filter out by study-level keys, do not grow with it). HTTP requests are counted by a response hook on every session
the DICOMweb client makes, C-FINDs at pynetdicom's ``Association.send_c_find``; each contender's selection
is checked against the generated specs. Target (issue 18): requests O(matching series), not O(archive).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from orthanc_server import SCU_AET, SERVER_AET, start_orthanc  # noqa: E402
from pacs_archive import StudySpec, orthanc_poster, upload  # noqa: E402

import medssl_monai.pacs.dicomweb as dicomweb  # noqa: E402
from medssl_monai.data.cohort import CohortFilter  # noqa: E402
from medssl_monai.pacs.credentials import Credentials  # noqa: E402
from medssl_monai.pacs.dimse import _Dimse, select_dimse  # noqa: E402

COHORT = CohortFilter.create(modality="DX", body_part="KNEE")


def make_specs(n: int, cohort: int, first: int, cohort_every: int, decoys_below: int) -> list[StudySpec]:
    """Studies ``first..first+n-1``; every ``cohort_every``-th of the first ``cohort * cohort_every`` is DX knee,
    a few below ``decoys_below`` are decoys (DX chest, CR knee: filtered here, not by the server), the rest CR
    chest over two years of dates."""
    specs = []
    for i in range(first, first + n):
        if i % cohort_every == 0 and i // cohort_every < cohort:
            specs.append(StudySpec(i, modality="DX", body_part="KNEE", study_date="20210310",
                                   series_description="knee AP"))
        elif i >= decoys_below:
            specs.append(StudySpec(i, modality="CR", study_date=f"202{1 + i % 2}{1 + i % 12:02d}{1 + i % 28:02d}"))
        elif i % 50 == 7:
            specs.append(StudySpec(i, modality="DX", body_part="CHEST", study_date="20210311"))
        elif i % 50 == 9:
            specs.append(StudySpec(i, modality="CR", body_part="KNEE", study_date="20210312"))
        else:
            specs.append(StudySpec(i, modality="CR", study_date=f"202{1 + i % 2}{1 + i % 12:02d}{1 + i % 28:02d}"))
    return specs


class Counter:
    """Counts HTTP responses of every session the DICOMweb client creates, and C-FIND requests."""

    def __init__(self) -> None:
        self.http = 0
        self.c_find = 0
        real_session = dicomweb.make_session

        def make_session(*a, **kw):
            s = real_session(*a, **kw)
            s.hooks["response"].append(self._count_http)
            return s

        dicomweb.make_session = make_session
        from pynetdicom.association import Association

        real_find = Association.send_c_find

        def send_c_find(assoc, *a, **kw):
            self.c_find += 1
            return real_find(assoc, *a, **kw)

        Association.send_c_find = send_c_find

    def _count_http(self, response, *a, **kw):
        self.http += 1
        return response


def measure(counter: Counter, server, expected: set[str], repeats: int) -> dict[str, dict]:
    web = lambda: dicomweb._Server(server.dicomweb, Credentials("basic", *server.auth), None, 60, 0, 0)  # noqa: E731
    pacs = lambda: _Dimse("127.0.0.1", server.dicom_port, SCU_AET, SERVER_AET, 120)  # noqa: E731
    contenders = {
        ("dicomweb", "cohort-first"): lambda: dicomweb.select_dicomweb(web(), COHORT),
        ("dicomweb", "per-study walk"): lambda: dicomweb.select_dicomweb(web(), COHORT, strategy="per-study"),
        ("dimse", "cohort-first"): lambda: select_dimse(pacs(), COHORT),
        ("dimse", "per-study walk"): lambda: select_dimse(pacs(), COHORT, strategy="per-study"),
    }
    out = {}
    for (proto, name), fn in contenders.items():
        times, requests = [], []
        for _ in range(repeats if name == "cohort-first" else 1):  # the walk is slow and deterministic in requests
            before = counter.http if proto == "dicomweb" else counter.c_find
            t = time.perf_counter()
            instances, _n_studies, n_series = fn()
            times.append(time.perf_counter() - t)
            requests.append((counter.http if proto == "dicomweb" else counter.c_find) - before)
            found = {i.sop_uid for i in instances}
            assert found == expected, (f"{proto} {name}: {len(found)} selected, {len(expected)} expected; missing "
                                       f"{sorted(expected - found)[:5]}, extra {sorted(found - expected)[:5]}")
        out[f"{proto} {name}"] = {"protocol": proto, "strategy": name, "requests": requests[0],
                                  "seconds": round(statistics.median(times), 3), "series_found": n_series,
                                  "repeats": len(times)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=5000)
    ap.add_argument("--small", type=int, default=1000, help="archive size of the first measurement")
    ap.add_argument("--cohort", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the cohort-first queries (median)")
    ap.add_argument("--workers", type=int, default=8, help="parallel uploads")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "cohort_query.json"))
    args = ap.parse_args()
    every = args.small // args.cohort
    counter = Counter()
    with tempfile.TemporaryDirectory(prefix="bench_cohort_") as tmp:
        server = start_orthanc(Path(tmp) / "orthanc")
        try:
            result = {"machine": platform.platform(), "python": platform.python_version(), "cohort_studies":
                      args.cohort, "cohort_filter": COHORT.as_dict(), "archives": []}
            loaded = 0
            specs_all: list[StudySpec] = []
            for size in (args.small, args.studies):
                specs = make_specs(size - loaded, args.cohort, loaded, every, decoys_below=args.small)
                t = time.perf_counter()
                upload(orthanc_poster(server), specs, workers=args.workers)
                load_s = time.perf_counter() - t
                loaded = size
                specs_all += specs
                expected = {s.sop_uid(0) for s in specs_all if s.modality == "DX" and s.body_part == "KNEE"}
                assert len(expected) == args.cohort and len(server.rest("GET", "/studies")) == size
                print(f"archive {size} studies ({len(specs)} uploaded in {load_s:.1f} s, "
                      f"{len(specs) / load_s:.0f}/s); cohort {len(expected)} studies", flush=True)
                runs = measure(counter, server, expected, args.repeats)
                result["archives"].append({"studies": size, "upload_seconds": round(load_s, 1),
                                           "uploaded": len(specs), "runs": runs})
        finally:
            server.stop()
    small, big = result["archives"]
    head = "".join(f"{str(a['studies']) + ' req':>11}{str(a['studies']) + ' s':>10}" for a in (small, big))
    print(f"\n{'contender':<28}{head}")
    for key in small["runs"]:
        print(f"{key:<28}" + "".join(f"{a['runs'][key]['requests']:>11}{a['runs'][key]['seconds']:>10.3f}"
                                     for a in (small, big)))
    summary = {}
    for proto in ("dicomweb", "dimse"):
        new, old = big["runs"][f"{proto} cohort-first"], big["runs"][f"{proto} per-study walk"]
        summary[proto] = {
            "requests_ratio_walk_over_new": round(old["requests"] / new["requests"], 1),
            "seconds_ratio_walk_over_new": round(old["seconds"] / new["seconds"], 1),
            "new_requests_growth_with_archive": round(new["requests"] / small["runs"][f"{proto} cohort-first"][
                "requests"], 2),
            "walk_requests_growth_with_archive": round(old["requests"] / small["runs"][f"{proto} per-study walk"][
                "requests"], 2),
        }
        print(f"{proto}: the walk makes {summary[proto]['requests_ratio_walk_over_new']}x the requests and takes "
              f"{summary[proto]['seconds_ratio_walk_over_new']}x the time at {big['studies']} studies; archive x"
              f"{big['studies'] / small['studies']:g}: cohort-first requests x"
              f"{summary[proto]['new_requests_growth_with_archive']}, walk x"
              f"{summary[proto]['walk_requests_growth_with_archive']}")
    result["summary"] = summary
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
