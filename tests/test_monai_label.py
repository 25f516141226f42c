"""A real MONAI Label 0.8.5 server serves our trained classifier, unchanged, reading DICOM from a real Orthanc.

A tiny fine-tune bundle (``in_channels`` 1, so the self-describing ``models/architecture.json`` matters) is
trained on generated DICOM radiographs; its test images go to Orthanc by STOW-RS; MONAI Label's ``monaibundle``
app, with the trained bundle folder copied as it is into its model folder, reads them through its DICOMweb
datastore. ``POST /infer`` must return the probabilities of the bundle's own ``inference.json`` run.

The MONAI Label environment comes from ``scripts/monai_label_env.sh`` (``make monai-label-env``):
``.monailabel-venv`` in the repository root, or ``MEDSSL_MONAILABEL_VENV``. Without it the test skips with the
reason; under ``CI=true`` that is a failure (``.ci/run`` builds it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from orthanc_server import free_port, start_orthanc

from medssl_monai.data import write_manifest
from medssl_monai.sample_data import CLASSES, synthetic_image, write_dicom
from medssl_monai.selection import next_to_label

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # two servers and a training, on a loaded machine

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "finetune_classification"
MODEL = "finetune_classification"
#: per split and class; the test split goes to Orthanc, one series per image as radiographs are stored
PER_CLASS = {"train": 4, "val": 2, "test": 2}
#: a few test images stored the way some modalities do (the loader must treat them the same on both paths)
STORAGE = {0: {"photometric": "MONOCHROME1"}, 1: {"rescale": (2.0, -100.0)}}


def monai_label_venv() -> Path:
    """The MONAI Label environment; skip (or fail under ``CI=true``) with the reason when it is missing."""
    venv = Path(os.environ.get("MEDSSL_MONAILABEL_VENV", REPO / ".monailabel-venv"))
    reason = None
    if not (venv / "bin" / "python").exists():
        reason = f"no MONAI Label environment at {venv}"
    elif not (venv / ".stamp-monailabel-0.8.5").is_file():
        reason = f"{venv} is incomplete (no .stamp-monailabel-0.8.5)"
    elif not (venv / "bin" / "monailabel-medssl").is_file():
        reason = f"{venv} predates monailabel-medssl (re-run make monai-label-env: it takes seconds)"
    elif not (venv / "monailabel" / "sample-apps" / "monaibundle" / "main.py").is_file():
        reason = f"{venv} has no monaibundle sample app"
    if reason is not None:
        msg = f"MONAI Label 0.8.5 not available: {reason} (make monai-label-env, or set MEDSSL_MONAILABEL_VENV)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " — required under CI=true")
        pytest.skip(msg)
    return venv


def bundle_cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, f"monai.bundle {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_dicom_manifest(folder: Path) -> Path:
    """CR radiographs of the sample classes, one patient/study/series per image, and their manifest."""
    rows = []
    for split, n in PER_CLASS.items():
        for c, name in enumerate(CLASSES):
            for i in range(n):
                k = len(rows)
                uid = f"1.2.826.0.1.3680043.10.1431.77.{k}"
                pixels = synthetic_image(c, patient_seed=k, image_seed=100 + k, size=40)
                storage = STORAGE.get(i, {}) if split == "test" else {}
                if storage.get("photometric") == "MONOCHROME1":
                    pixels = (4095 - pixels).astype(np.uint16)
                path = write_dicom(folder / f"{k:03d}.dcm", pixels, patient_id=f"ML{k:03d}", study_uid=uid + ".1",
                                   series_uid=uid + ".2", sop_uid=uid + ".3", body_part="CHEST", **storage)
                rows.append({"path": str(path), "patient_id": f"ML{k:03d}", "study_uid": uid + ".1",
                             "series_uid": uid + ".2", "sop_uid": uid + ".3", "label": name, "split": split,
                             "source": "dicom"})
    write_manifest(pd.DataFrame(rows), folder / "manifest.csv")
    return folder / "manifest.csv"


def own_probabilities(bundle: Path, files: list[str]) -> np.ndarray:
    """Unrounded reference: the bundle's own ``inference.json`` components on the original DICOM files."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    network.eval()
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    post = parser.get_parsed_content("postprocessing", instantiate=True)
    out = []
    with torch.no_grad():
        for f in files:
            data = pre({"image": f})
            data["pred"] = network(torch.as_tensor(data["image"])[None])[0]
            out.append(torch.as_tensor(post(data)["pred"]).numpy().astype(np.float64))
    return np.stack(out)


def own_features(bundle: Path, files: list[str]) -> np.ndarray:
    """Independent embedding reference: the backbone of the bundle's own ``inference.json`` network (its
    weights loaded as the bundle loads them) on that config's preprocessing of the original DICOM files."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    network.eval()
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    with torch.no_grad():
        return np.stack([network.backbone(torch.as_tensor(pre({"image": f})["image"])[None])[0].numpy()
                         for f in files])


def typicality(url: str, params: dict | None = None) -> tuple[dict, float]:
    """``POST /activelearning/typicality`` (``params``: the JSON body): the answer and its seconds."""
    import requests

    t = time.monotonic()
    r = requests.post(f"{url}/activelearning/typicality", json=params, timeout=300)
    assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[-2000:]}"
    return r.json(), time.monotonic() - t


#: the sample monaibundle app's settings for a local classifier bundle (no NGC lookup, no trainer, no SAM2)
MONAIBUNDLE_CONF = ("models", MODEL, "zoo_source", "github", "skip_trainers", "true", "sam2", "false")


def start_monai_label(venv: Path, app: Path, studies: str, auth: tuple[str, str], work: Path,
                      timeout: float = 240.0, conf: tuple[str, ...] = MONAIBUNDLE_CONF,
                      ) -> tuple[subprocess.Popen, str, Path]:
    """``monailabel start_server`` on 127.0.0.1 and a free port; returns once ``GET /info/`` answers."""
    import requests

    port = free_port()
    (work / "home").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),  # this checkout's medssl_monai, whatever the environment was built from
        "HOME": str(work / "home"),  # MONAI Label's caches and sessions stay in the test's folder
        "OMP_NUM_THREADS": "1",
        "MONAI_LABEL_DICOMWEB_USERNAME": auth[0],
        "MONAI_LABEL_DICOMWEB_PASSWORD": auth[1],
        "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "CR"}),  # MONAI Label's default is CT
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "dicomweb-cache"),
    }
    env.pop("MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI", None)  # the start command's default (DICOM folders)
    log_path = work / "monailabel.log"
    log = open(log_path, "w")
    confs = [a for k, v in zip(conf[::2], conf[1::2], strict=True) for a in ("--conf", k, v)]
    cmd = [str(venv / "bin" / "monailabel-medssl"), "start_server", "--app", str(app), "--studies", studies,
           *confs, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"MONAI Label exited with {proc.returncode} at start-up:\n{log_path.read_text()[-5000:]}")
        try:
            if requests.get(url + "/info/", timeout=5).status_code == 200:
                return proc, url, log_path
        except requests.RequestException:
            pass
        time.sleep(1.0)
    stop(proc)
    pytest.fail(f"MONAI Label did not answer within {timeout:.0f} s:\n{log_path.read_text()[-5000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and anything it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_monai_label_serves_the_unchanged_bundle_from_orthanc(tmp_path: Path) -> None:
    import requests
    from dicomweb_client import DICOMwebClient

    from medssl_monai.pacs.credentials import Credentials, make_session

    venv = monai_label_venv()
    manifest = make_dicom_manifest(tmp_path / "data")

    # a trained, self-describing bundle (1 channel, 32 px, tiny backbone), and its own inference on the test split
    trained = tmp_path / "trained" / MODEL
    shutil.copytree(BUNDLE, trained, ignore=shutil.ignore_patterns("*.pt", "output"))
    bundle_cli("run", "--bundle_root", str(trained), "--config_file", str(trained / "configs/train.json"),
               "--manifest", str(manifest), "--in_channels", "1", "--image_size", "32", "--backbone", "cbr_tiny",
               "--max_epochs", "1", "--batch_size", "8")
    bundle_cli("run", "--bundle_root", str(trained), "--config_file", str(trained / "configs/inference.json"),
               "--manifest", str(manifest), "--split", "test")
    reference = pd.read_csv(trained / "output" / "predictions.csv").set_index("sop_uid")
    classes = json.loads((trained / "models" / "classes.json").read_text())
    assert classes == sorted(CLASSES) and json.loads((trained / "models" / "architecture.json").read_text())[
        "in_channels"] == 1

    # the MONAI Label app, with the trained bundle folder copied as it is (its run outputs left behind)
    app = tmp_path / "apps" / "monaibundle"
    shutil.copytree(venv / "monailabel" / "sample-apps" / "monaibundle", app,
                    ignore=shutil.ignore_patterns("__pycache__"))
    served = app / "model" / MODEL
    shutil.copytree(trained, served, ignore=shutil.ignore_patterns("output"))
    before = tree_digest(served)
    assert before == {k: v for k, v in tree_digest(trained).items() if not k.startswith("output")}

    df = pd.read_csv(manifest)
    test = df[df["split"] == "test"]
    exact = dict(zip(test["sop_uid"], own_probabilities(trained, list(test["path"])), strict=True))
    assert max(np.abs(exact[u] - reference.loc[u, [f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)).max()
               for u in exact) <= 5e-7  # the CSV holds 6 decimals
    orthanc = start_orthanc(tmp_path / "orthanc")
    proc = None
    try:
        client = DICOMwebClient(orthanc.dicomweb, session=make_session(Credentials("basic", *orthanc.auth)))
        client.store_instances([pydicom.dcmread(p) for p in test["path"]])
        assert len(orthanc.rest("GET", "/series")) == len(test)

        t0 = time.monotonic()
        proc, url, _ = start_monai_label(venv, app, orthanc.dicomweb, orthanc.auth, tmp_path / "ml")
        started_s = time.monotonic() - t0

        info = requests.get(url + "/info/", timeout=30).json()
        model = info["models"][MODEL]
        assert model["type"] == "classification"
        labels = model["labels"]
        assert (sorted(labels, key=labels.get) if isinstance(labels, dict) else list(labels)) == classes

        # MONAI Label's DICOMweb datastore lists Orthanc's CR series (QIDO-RS) and names each image by its
        # Series Instance UID
        assert requests.get(url + "/datastore/", timeout=60).json()["total"] == len(test)
        first = requests.post(url + "/activelearning/first", timeout=60)
        assert first.status_code == 200, first.text[-2000:]
        assert first.json()["id"] == min(test["series_uid"])

        diffs, exact_diffs, times = [], [], []
        for row in test.itertuples():
            t = time.monotonic()
            r = requests.post(f"{url}/infer/{MODEL}", params={"image": row.series_uid, "output": "json"},
                              timeout=120)
            times.append(time.monotonic() - t)
            assert r.status_code == 200, f"{row.series_uid}: HTTP {r.status_code}: {r.text[-2000:]}"
            prediction = r.json()["prediction"]  # [{"idx": i, "label": <class name>, "score": p}, ...]
            assert [(p["idx"], p["label"]) for p in prediction] == list(enumerate(classes))
            probs = np.array([p["score"] for p in prediction])
            expected = reference.loc[row.sop_uid, [f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)
            diffs.append(float(np.abs(probs - expected).max()))
            exact_diffs.append(float(np.abs(probs - exact[row.sop_uid]).max()))
        print(f"\nMONAI Label start {started_s:.1f} s; {len(times)} infers, mean {np.mean(times):.2f} s; "
              f"max abs diff to the bundle's predictions.csv (6 decimals) {max(diffs):.2e}, "
              f"to its unrounded probabilities {max(exact_diffs):.2e}")
        assert max(diffs) <= 1e-5, diffs
        assert max(exact_diffs) <= 1e-6, exact_diffs
    finally:
        if proc is not None:
            stop(proc)
        orthanc.stop()
    assert tree_digest(served) == before  # MONAI Label ran the bundle without changing a file of it
    secret = orthanc.auth[1].encode()  # given to MONAI Label through its environment only
    leaked = [p for root in (tmp_path / "ml", app) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked, leaked


def put_label(url: str, image: str, params: dict | None, file_body: bytes = b"{}") -> Any:
    """MONAI Label's own label request, with the ``classification`` tag of our app's convention."""
    import requests

    return requests.put(f"{url}/datastore/label", params={"image": image, "tag": "classification"},
                        files={"label": ("label.json", file_body, "application/json")},
                        data={"params": json.dumps(params)} if params is not None else None, timeout=120)


def infer_probabilities(url: str, series: list[str]) -> np.ndarray:
    import requests

    out = []
    for uid in series:
        r = requests.post(f"{url}/infer/{MODEL}", params={"image": uid, "output": "json"}, timeout=120)
        assert r.status_code == 200, f"{uid}: HTTP {r.status_code}: {r.text[-2000:]}"
        out.append([p["score"] for p in r.json()["prediction"]])
    return np.asarray(out, dtype=np.float64)


def test_monai_label_trains_the_bundle_from_orthanc_labels(tmp_path: Path) -> None:
    """``medssl monai-label-app``: labels written with ``PUT /datastore/label?tag=classification``, ``POST
    /train/<model>`` runs the bundle's own train.json on the DICOMweb datastore's series, the next ``/infer``
    answers with the new weights; MONAI Label's DICOM cache, the labels and the new weights are owner-only."""
    import requests
    from dicomweb_client import DICOMwebClient

    from medssl_monai.pacs.credentials import Credentials, make_session

    venv = monai_label_venv()
    manifest = make_dicom_manifest(tmp_path / "data")
    df = pd.read_csv(manifest)
    trained = tmp_path / "trained" / MODEL
    shutil.copytree(BUNDLE, trained, ignore=shutil.ignore_patterns("*.pt", "output"))
    bundle_cli("run", "--bundle_root", str(trained), "--config_file", str(trained / "configs/train.json"),
               "--manifest", str(manifest), "--in_channels", "1", "--image_size", "32", "--backbone", "cbr_tiny",
               "--max_epochs", "1", "--batch_size", "8")
    classes = json.loads((trained / "models" / "classes.json").read_text())

    app = tmp_path / "apps" / "medssl"
    r = subprocess.run([sys.executable, "-m", "medssl_monai.cli", "monai-label-app", str(app), "--bundle",
                        str(trained)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    served = app / "model" / MODEL
    assert (app / "main.py").is_file() and (served / "models" / "model.pt").is_file()
    configs_before = tree_digest(served / "configs")
    weights_before = (served / "models" / "model.pt").read_bytes()

    orthanc = start_orthanc(tmp_path / "orthanc")
    proc = None
    try:
        client = DICOMwebClient(orthanc.dicomweb, session=make_session(Credentials("basic", *orthanc.auth)))
        client.store_instances([pydicom.dcmread(p) for p in df["path"]])
        t0 = time.monotonic()
        proc, url, log_path = start_monai_label(venv, app, orthanc.dicomweb, orthanc.auth, tmp_path / "ml",
                                                conf=("models", MODEL))
        started_s = time.monotonic() - t0
        info = requests.get(url + "/info/", timeout=30).json()
        assert info["models"][MODEL]["type"] == "classification" and MODEL in info["trainers"]
        assert {"first", "random", "typicality"} <= set(info["strategies"])
        test = df[df["split"] == "test"]
        before = infer_probabilities(url, list(test["series_uid"]))

        # typicality, nothing labelled: next_to_label on embeddings computed here from the original files
        series = list(df["series_uid"])
        feats0 = own_features(served, list(df["path"]))
        pick0, typ_first_s = typicality(url)
        assert pick0["id"] == next_to_label(feats0, series, [], seed=0), pick0
        again, typ_cached_s = typicality(url)
        assert again["id"] == pick0["id"]
        cache_file = tmp_path / "ml" / "dicomweb-cache"
        cache_file = next(cache_file.rglob("typicality_embeddings.npz"))
        with np.load(cache_file) as npz:  # what the server embedded (from its DICOMweb copies) is the reference
            got = dict(zip(npz["ids"], npz["features"], strict=True))
        assert sorted(got) == sorted(series)
        assert max(np.abs(got[u] - f).max() for u, f in zip(series, feats0, strict=True)) <= 1e-5
        assert f"typicality: {pick0['id']} of {len(series)} images (0 labelled, 0 embedded now" in log_path.read_text()

        # the labels: train/val images, by MONAI Label's label request (params, or the JSON file alone)
        labelled = df[df["split"] != "test"]
        t1 = time.monotonic()
        for k, row in enumerate(labelled.itertuples()):
            if k == 0:
                resp = put_label(url, row.series_uid, None, json.dumps({"label": row.label}).encode())
            else:
                resp = put_label(url, row.series_uid, {"label": row.label, "split": row.split})
            assert resp.status_code == 200, f"{row.series_uid}: HTTP {resp.status_code}: {resp.text[-1500:]}"
        label_s = time.monotonic() - t1
        info0 = requests.get(f"{url}/datastore/label/info", timeout=30,
                             params={"label": labelled["series_uid"].iloc[1], "tag": "classification"})
        assert info0.status_code == 200 and info0.json()["label"] == labelled["label"].iloc[1], info0.text
        bad = [put_label(url, "1.2.3.4.5.unknown", {"label": classes[0]}),
               put_label(url, labelled["series_uid"].iloc[0], {"split": "val"}, b"{}"),
               put_label(url, labelled["series_uid"].iloc[0], {"label": classes[0], "split": "test"})]
        assert [b.status_code for b in bad] == [400] * 3, [b.text for b in bad]
        assert ["not in the datastore" in bad[0].text, "needs params" in bad[1].text, "split" in bad[2].text] == [
            True] * 3, [b.text for b in bad]
        # why the convention: MONAI Label's own non-SEG labels need an image it converted to NIfTI
        other = requests.put(f"{url}/datastore/label", params={"image": labelled["series_uid"].iloc[0],
                                                                 "tag": "original"},
                             files={"label": ("label.json", b"{}", "application/json")}, timeout=120)
        why = f"Image {labelled['series_uid'].iloc[0]} not found"  # in the server log (the client sees HTTP 500)
        for _ in range(20):
            if why in log_path.read_text():
                break
            time.sleep(0.5)
        assert other.status_code == 500 and why in log_path.read_text(), other.text[-1000:]

        # train through MONAI Label (its async train task), then wait for it
        t2 = time.monotonic()
        resp = requests.post(f"{url}/train/{MODEL}", json={"max_epochs": 2, "batch_size": 8}, timeout=60)
        assert resp.status_code == 200, resp.text[-2000:]
        deadline = time.monotonic() + 300
        status = {}
        while time.monotonic() < deadline:
            status = requests.get(f"{url}/train/", timeout=30).json()
            if status.get("status") in ("DONE", "ERROR"):
                break
            time.sleep(1.0)
        train_s = time.monotonic() - t2
        assert status.get("status") == "DONE", (f"train task: {status.get('status')}\n"
                                                + "\n".join(status.get("details", []))
                                                + log_path.read_text()[-4000:])
        weights_after = (served / "models" / "model.pt").read_bytes()
        assert weights_after != weights_before
        runs = sorted((served / "output" / "monailabel").iterdir())
        assert len(runs) == 1
        used = pd.read_csv(runs[0] / "manifest.csv")
        assert sorted(used["series_uid"]) == sorted(labelled["series_uid"])
        assert dict(zip(used["series_uid"], used["label"], strict=True)) == dict(
            zip(labelled["series_uid"], labelled["label"], strict=True))
        # MONAI Label's DICOMweb series folders, downloaded for training, are what the bundle read
        assert all(Path(p).is_dir() and str(tmp_path / "ml" / "dicomweb-cache") in p for p in used["path"])
        metrics = pd.read_csv(runs[0] / "metrics.csv")
        assert len(metrics) == 2  # the request's max_epochs

        # the next /infer answers with the new weights: the bundle's own inference on the original files
        after = infer_probabilities(url, list(test["series_uid"]))
        exact = own_probabilities(served, list(test["path"]))
        print(f"\nMONAI Label (medssl app) start {started_s:.1f} s; {len(labelled)} labels {label_s:.1f} s; "
              f"train ({len(labelled)} series, 2 epochs) {train_s:.1f} s; max |after - bundle| "
              f"{np.abs(after - exact).max():.2e}; max |after - before| {np.abs(after - before).max():.3f}")
        assert np.abs(after - exact).max() <= 1e-6
        assert np.abs(after - before).max() > 1e-3

        # typicality after training (new weights: embedded again), the train/val images labelled: an unlabelled
        # (test) image, the one next_to_label picks; once labelled, the next answer is another unlabelled one
        feats1 = own_features(served, list(df["path"]))
        done = set(labelled["series_uid"])
        seeded, typ_new_weights_s = typicality(url, {"seed": 1})  # new weights: every image embedded again
        assert seeded["id"] == next_to_label(feats1, series, done, seed=1)
        assert f"({len(labelled)} labelled, {len(series)} embedded now, seed 1)" in log_path.read_text()
        bad_seed = requests.post(f"{url}/activelearning/typicality", json={"seed": "x"}, timeout=60)
        assert bad_seed.status_code == 400 and "seed must be a whole number" in bad_seed.text, bad_seed.text
        picks = []
        for _ in range(2):
            pick, _ = typicality(url)
            assert pick["id"] not in done and pick["id"] in set(test["series_uid"]), pick
            assert pick["id"] == next_to_label(feats1, series, done, seed=0)
            label = test.set_index("series_uid").loc[pick["id"], "label"]
            assert put_label(url, pick["id"], {"label": label}).status_code == 200
            done.add(pick["id"])
            picks.append(pick["id"])
        assert picks[0] != picks[1]
        for uid in set(test["series_uid"]) - done:  # every image labelled: MONAI Label's empty answer
            assert put_label(url, uid, {"label": classes[0]}).status_code == 200
        assert typicality(url)[0] == {}
        print(f"typicality ({len(series)} images): first request {typ_first_s:.2f} s, cached {typ_cached_s:.2f} s, "
              f"after /train (new weights) {typ_new_weights_s:.2f} s")
    finally:
        if proc is not None:
            stop(proc)
        orthanc.stop()
    assert tree_digest(served / "configs") == configs_before  # the bundle's configs: zero edits
    assert json.loads((served / "models" / "classes.json").read_text()) == classes
    assert json.loads((served / "models" / "architecture.json").read_text())["in_channels"] == 1
    # MONAI Label's DICOM cache and our labels: folders 0700, files 0600
    cache = tmp_path / "ml" / "dicomweb-cache"
    entries = [cache, *cache.rglob("*")]
    assert any(p.name == "classification_labels.json" for p in entries)
    assert sum(p.suffix == ".dcm" or p.is_file() for p in entries) >= len(df)
    loose = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in entries if not p.is_symlink()
             and (p.stat().st_mode & 0o777) != (0o700 if p.is_dir() else 0o600)]
    assert not loose, loose
    assert (served / "models" / "model.pt").stat().st_mode & 0o077 == 0
    secret = orthanc.auth[1].encode()
    leaked = [p for root in (tmp_path / "ml", app) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked, leaked
