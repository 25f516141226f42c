"""A hospital's TLS, on 127.0.0.1: a generated CA (``openssl`` CLI), a server and a client certificate it signs,
a second CA that signs nothing we serve, and a TLS-terminating proxy (``ssl`` + threads) in front of a plain
HTTP server such as the tests' Orthanc, optionally requiring a client certificate (mutual TLS).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode:
        pytest.fail(f"openssl {' '.join(args[:2])} failed: {r.stderr[-1000:]}")


def _ca(name: str, cwd: Path) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=medssl test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=cwd)


def _leaf(name: str, ca: str, ext: str, serial: int, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-set_serial",
             str(serial), "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)
    os.chmod(cwd / f"{name}.key", 0o600)


def make_pki(root: Path) -> dict[str, Path]:
    """ca, other_ca (PEM), server cert/key for 127.0.0.1, client cert/key signed by ca, rogue client signed by
    other_ca. Skips (fails under ``CI=true``) without the ``openssl`` CLI."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the openssl CLI is required for the TLS tests under CI=true")
        pytest.skip("no openssl CLI for the TLS tests")
    root.mkdir(parents=True, exist_ok=True)
    _ca("ca", root)
    _ca("other_ca", root)
    usage = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    _leaf("server", "ca", usage + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n", 1, root)
    _leaf("client", "ca", usage + "extendedKeyUsage=clientAuth\n", 2, root)
    _leaf("rogue_client", "other_ca", usage + "extendedKeyUsage=clientAuth\n", 3, root)
    return {p.stem if p.suffix == ".pem" else p.stem + "_key": p for p in root.iterdir() if p.suffix in (".pem", ".key")}


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@contextmanager
def tls_proxy(target_port: int, cert: Path, key: Path, client_ca: Path | None = None):
    """``https://127.0.0.1:PORT`` forwarding to ``http://127.0.0.1:target_port``; yields PORT. With
    ``client_ca`` a client certificate signed by it is required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve_one(raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            tls = ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):  # a refused handshake: what the wrong-CA tests provoke
            raw.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", target_port), timeout=10)
        except OSError:
            tls.close()
            return
        tls.settimeout(None)
        upstream.settimeout(None)
        back = threading.Thread(target=_pump, args=(upstream, tls), daemon=True)
        back.start()
        _pump(tls, upstream)
        back.join(10)
        tls.close()
        upstream.close()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=serve_one, args=(raw,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()
