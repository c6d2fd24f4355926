"""`wss://` with the Python client (docs/PROTOCOL.md section 1): a `fusion-engine serve
--tls-cert/--tls-key` with a self-signed certificate made here by `openssl` (the test is skipped,
with the reason, where there is no `openssl`), a round trip with `ca_file` against `fusion-engine
fuse` (within 1e-5), and the clear failures: no CA file (the certificate is not trusted) and a
plain `ws://` client on the TLS port (HTTP 400 naming wss://), after which the server still
serves.

The server binary is FUSION_ENGINE_BIN or target/release/fusion-engine, as in
test_fusion_client.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import fusion_client as fc

ROOT = Path(__file__).resolve().parents[3]
BIN = os.environ.get("FUSION_ENGINE_BIN", str(ROOT / "target" / "release" / "fusion-engine"))
HEAD = ["vision", "text", "audio"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_cert(d: Path) -> tuple[Path, Path]:
    """A self-signed EC certificate for 127.0.0.1 and localhost (not a CA: rustls clients refuse
    a CA certificate as a server's own)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no `openssl` on PATH: cannot make the test certificate")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-addext", "basicConstraints=critical,CA:FALSE"], check=True, capture_output=True)
    return cert, key


class TlsServer:
    def __init__(self, cert: Path, key: Path):
        self.port = free_port()
        self.url = f"wss://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{self.port}", "--devices", "cpu",
                                      "--tls-cert", str(cert), "--tls-key", str(key)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"server exited: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start listening")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def tls() -> Iterator[tuple[TlsServer, Path]]:
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_cert(Path(tmp))
        s = TlsServer(cert, key)
        try:
            yield s, cert
        finally:
            s.stop()


def offline_fuse(features: dict[str, np.ndarray], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        t = dict(features)
        t["mask"] = np.stack([mask[:, list(features).index(n)] for n in HEAD], 1).astype(np.uint8)
        save_file(t, str(inp))
        subprocess.run([BIN, "fuse", "--backend", "cpu", "--input", str(inp), "--output", str(out)],
                       check=True, capture_output=True)
        r = load_file(str(out))
        return r["fused"], r["weights"]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def test_wss_round_trip_with_a_ca_file(tls: tuple[TlsServer, Path]) -> None:
    server, cert = tls
    rng = np.random.default_rng(5)
    b = 17
    feats = {"vision": rng.standard_normal((b, 1024), dtype=np.float32),
             "text": rng.standard_normal((b, 768), dtype=np.float32),
             "audio": rng.standard_normal((b, 128), dtype=np.float32)}
    mask = (rng.random((b, 3)) < 0.7).astype(np.uint8)
    mask[mask.sum(1) == 0, 0] = 1
    fused, weights = fc.fuse(server.url, "py-tls", feats, mask=mask, ca_file=str(cert))
    ref_f, ref_w = offline_fuse(feats, mask)
    assert rel(fused, ref_f) <= 1e-5 and rel(weights, ref_w) <= 1e-5

    async def stream_and_reconnect() -> None:
        c = await fc.FusionClient.connect(server.url, ca_file=cert)
        try:
            assert c.dim == 512
            await c.reconnect()  # the CA file is kept
            sub = await c.subscribe("py-tls-2")
            await c.produce("py-tls-2", "k", "text", feats["text"][0], last=True, ack=True)
            r = await sub.get(timeout=10)
            ref1, _ = offline_fuse({n: v[:1] for n, v in feats.items()}, np.array([[0, 1, 0]], np.uint8))
            assert rel(r.fused, ref1[0]) <= 1e-5
        finally:
            await c.close()

    asyncio.run(stream_and_reconnect())


def test_untrusted_and_plain_clients_fail_clearly_and_the_server_keeps_serving(
        tls: tuple[TlsServer, Path]) -> None:
    server, cert = tls
    one = {"text": np.ones(768, np.float32)}
    # No CA file: the system's store does not know the self-signed certificate.
    with pytest.raises(ssl.SSLCertVerificationError):
        fc.fuse(server.url, "py-tls", one, timeout=10)
    # ws:// on the TLS port: the server answers HTTP 400 saying it speaks TLS.
    plain = server.url.replace("wss://", "ws://")
    with pytest.raises(Exception) as e:
        fc.fuse(plain, "py-tls", one, timeout=10)
    assert "400" in str(e.value), repr(e.value)
    assert server.proc.poll() is None
    fused, _ = fc.fuse(server.url, "py-tls", one, ca_file=cert)
    assert fused.shape == (512,)
