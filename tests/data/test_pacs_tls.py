"""TLS the hospital way and non-Latin-1 passwords, against a real Orthanc behind a real TLS endpoint.

Orthanc (basic auth with a password outside Latin-1) runs on 127.0.0.1; ``tests/tls_proxy.py`` puts a TLS
proxy with a certificate from a generated CA in front of it, once without and once with a required client
certificate. Managed hospital machines set ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``: ``--ca-bundle`` must
still be what verifies the server.
"""

from __future__ import annotations

import pytest
import requests
from fake_pacs import make_instance
from orthanc_server import USER, start_orthanc
from pydicom.uid import generate_uid
from tls_proxy import make_pki, tls_proxy

from medssl_monai.cli import main as cli
from medssl_monai.pacs.credentials import Credentials, load_credentials
from medssl_monai.pacs.dicomweb import fetch_dicomweb
from medssl_monai.pacs.errors import PacsError
from medssl_monai.pacs.local_copy import LocalCopy

#: not Latin-1 (requests alone fails with "'latin-1' codec can't encode"), and with a Latin-1 letter too
PASSWORD = "Grüße-пароль-密码"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = start_orthanc(tmp_path_factory.mktemp("orthanc_tls"), password=PASSWORD)
    try:
        study, series = generate_uid(), generate_uid()
        server.sops = {generate_uid() for _ in range(3)}
        for sop in server.sops:
            server.rest("POST", "/instances", data=make_instance("TLS-PAT", study, series, sop),
                        headers={"Content-Type": "application/dicom"})
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def https(orthanc, pki):
    """Orthanc's DICOMweb root behind TLS (server certificate signed by the generated CA)."""
    with tls_proxy(orthanc.http_port, pki["server"], pki["server_key"]) as port:
        yield f"https://127.0.0.1:{port}/dicom-web"


@pytest.fixture(scope="module")
def mutual(orthanc, pki):
    """The same, requiring a client certificate signed by the generated CA."""
    with tls_proxy(orthanc.http_port, pki["server"], pki["server_key"], client_ca=pki["ca"]) as port:
        yield f"https://127.0.0.1:{port}/dicom-web"


@pytest.fixture
def creds() -> Credentials:
    return load_credentials(environ={"MEDSSL_DICOMWEB_USER": USER, "MEDSSL_DICOMWEB_PASSWORD": PASSWORD})


@pytest.fixture(params=["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "both"])
def hospital_env(request, monkeypatch, pki) -> str:
    """A managed machine's CA variable(s), pointing at a CA that did not sign our PACS's certificate; returns
    the variable requests reads first."""
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
        if request.param in (var, "both"):
            monkeypatch.setenv(var, str(pki["other_ca"]))
    return "CURL_CA_BUNDLE" if request.param == "CURL_CA_BUNDLE" else "REQUESTS_CA_BUNDLE"


def test_ca_bundle_wins_over_requests_ca_bundle_and_curl_ca_bundle(https, orthanc, pki, creds, hospital_env,
                                                                    tmp_path):
    # the reference: plain requests lets the environment replace the session's CA bundle
    plain = requests.Session()
    plain.verify = str(pki["ca"])
    with pytest.raises(requests.exceptions.SSLError):
        plain.get(https + "/studies", timeout=10)
    stats = fetch_dicomweb(https, tmp_path / "c", credentials=creds, ca_bundle=str(pki["ca"]), deadline=30)
    assert stats.fetched == stats.instances == 3 and stats.failed == 0
    assert LocalCopy(tmp_path / "c").known() == orthanc.sops


def test_without_ca_bundle_the_environment_applies_and_its_failure_names_it(https, pki, creds, hospital_env,
                                                                             tmp_path):
    with pytest.raises(PacsError) as err:
        fetch_dicomweb(https, tmp_path / "c", credentials=creds, retries=2, deadline=30)
    msg = str(err.value)
    assert msg == (f"{https}: TLS certificate verification failed: its certificate is not signed by a CA in "
                   f"${hospital_env} ({pki['other_ca']}); give the hospital CA with --ca-bundle")


def test_wrong_ca_bundle_is_one_clear_line(https, pki, creds, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDSSL_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSSL_DICOMWEB_PASSWORD", PASSWORD)
    code = cli(["-q", "index", "--dicomweb", https, "--ca-bundle", str(pki["other_ca"]), "--out",
                str(tmp_path / "m.csv")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1, lines
    assert lines[0] == (f"medssl index: error: {https}: TLS certificate verification failed: its certificate is not signed by a CA "
                        f"in --ca-bundle {pki['other_ca']}; check that the file holds the CA that signed the server's "
                        "certificate")
    assert PASSWORD not in "\n".join(lines)


def test_mutual_tls_missing_wrong_and_right_client_certificate(mutual, pki, creds, tmp_path, capsys, monkeypatch):
    ca = str(pki["ca"])
    # Python's ssl server (like many) closes the handshake without an alert: the line says what it means
    missing = (rf"^{mutual}: the server (requires a client certificate \(mutual TLS\) and none was given|ended the TLS "
               r"handshake without a reason, as servers requiring a client certificate \(mutual TLS\) do when none is "
               r"given): give --client-cert \(and --client-key\)$")
    with pytest.raises(PacsError, match=missing):
        fetch_dicomweb(mutual, tmp_path / "c", credentials=creds, ca_bundle=ca, deadline=30)
    rogue = str(pki["rogue_client"])
    with pytest.raises(PacsError, match=rf"^{mutual}: the server (refused|ended the TLS handshake without a reason: it "
                                        rf"may not trust) our client certificate --client-cert {rogue}"):
        fetch_dicomweb(mutual, tmp_path / "c", credentials=creds, ca_bundle=ca, client_cert=rogue,
                       client_key=str(pki["rogue_client_key"]), deadline=30)
    assert LocalCopy(tmp_path / "c").known() == set()
    monkeypatch.setenv("MEDSSL_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSSL_DICOMWEB_PASSWORD", PASSWORD)
    out = tmp_path / "m.csv"
    assert cli(["-q", "index", "--dicomweb", mutual, "--ca-bundle", ca, "--client-cert", str(pki["client"]),
                "--client-key", str(pki["client_key"]), "--out", str(out)]) == 0
    assert "fetched:               3 of 3" in capsys.readouterr().out
    assert out.is_file()


def test_client_key_must_be_private(mutual, pki, creds, tmp_path):
    key = tmp_path / "client.key"
    key.write_bytes(pki["client_key"].read_bytes())
    key.chmod(0o644)
    with pytest.raises(PacsError, match=rf"--client-key {key}: readable by others.*chmod 600"):
        fetch_dicomweb(mutual, tmp_path / "c", credentials=creds, ca_bundle=str(pki["ca"]),
                       client_cert=str(pki["client"]), client_key=str(key))


# ---------------------------------------------------------------- credentials outside Latin-1


def test_non_latin1_password_is_sent_utf8_and_accepted(orthanc, tmp_path):
    """Orthanc compares the UTF-8 bytes of its configured password: what RFC 7617's charset=UTF-8 means."""
    # the reference: requests alone cannot send it
    with pytest.raises(UnicodeEncodeError):
        requests.get(orthanc.dicomweb + "/studies", auth=(USER, PASSWORD), timeout=10)
    auth = tmp_path / "auth"
    auth.write_text(f"{USER}:{PASSWORD}\n", encoding="utf-8")
    auth.chmod(0o600)
    for i, creds in enumerate((load_credentials(auth), load_credentials(environ={"MEDSSL_DICOMWEB_USER": USER,
                                                                                 "MEDSSL_DICOMWEB_PASSWORD": PASSWORD}))):
        stats = fetch_dicomweb(orthanc.dicomweb, tmp_path / f"cache{i}", credentials=creds)
        assert stats.fetched == 3 and LocalCopy(tmp_path / f"cache{i}").known() == orthanc.sops
    wrong = load_credentials(environ={"MEDSSL_DICOMWEB_USER": USER, "MEDSSL_DICOMWEB_PASSWORD": PASSWORD[:-1]})
    with pytest.raises(PacsError, match="refused the credentials"):
        fetch_dicomweb(orthanc.dicomweb, tmp_path / "w", credentials=wrong)


@pytest.mark.parametrize("env, words", [
    ({"MEDSSL_DICOMWEB_TOKEN": "tök-123"}, r"^\$MEDSSL_DICOMWEB_TOKEN: a bearer token is printable ASCII without "
                                           r"spaces \(RFC 6750\), found U\+00F6"),
    ({"MEDSSL_DICOMWEB_USER": "u", "MEDSSL_DICOMWEB_PASSWORD": "a\tb"},
     r"^\$MEDSSL_DICOMWEB_PASSWORD: the password holds a control character \(U\+0009\); any other Unicode"),
    ({"MEDSSL_DICOMWEB_USER": "a:b", "MEDSSL_DICOMWEB_PASSWORD": "x"},
     r"^\$MEDSSL_DICOMWEB_USER: a user name cannot contain ':'"),
])
def test_credentials_that_cannot_be_sent_name_the_variable(env, words):
    with pytest.raises(PacsError, match=words) as err:
        load_credentials(environ=env)
    assert "\n" not in str(err.value) and env.get("MEDSSL_DICOMWEB_PASSWORD", "@@") not in str(err.value)


def test_auth_file_that_is_not_utf8_names_the_file(tmp_path):
    f = tmp_path / "auth"
    f.write_bytes("user:Gr\xfc\xdfe".encode("latin-1"))
    f.chmod(0o600)
    with pytest.raises(PacsError, match=rf"--auth-file {f}: not UTF-8 text"):
        load_credentials(f)
