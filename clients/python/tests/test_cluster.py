"""The Python client against a NATS scale-out (docs/DESIGN.md section 11): a `nats-server -js`,
one gateway (`fusion-engine serve --nats`) and two `fusion-engine worker`s, all on loopback. A
round trip through them equals `fusion-engine fuse` on the same inputs (within 1e-5), and the
gateway's `/healthz` and `/metrics` show the workers and the batches. Skipped, with the reason,
where `nats-server` is missing, unless FUSION_REQUIRE_NATS=1 (then it fails).

The server binary is FUSION_ENGINE_BIN or target/release/fusion-engine, as in
test_fusion_client.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
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


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening")


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


class Cluster:
    def __init__(self, tmp: Path):
        self.procs: list[subprocess.Popen[bytes]] = []
        nats_port, self.port, self.metrics = free_port(), free_port(), free_port()
        nats = f"nats://127.0.0.1:{nats_port}"
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self._start(["nats-server", "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", str(tmp / "js")],
                    nats_port, "nats-server", **quiet)
        for name in ("py-w1", "py-w2"):
            self.procs.append(subprocess.Popen([BIN, "worker", "--nats", nats, "--devices", "cpu:threads=1",
                                                "--name", name], **quiet))  # type: ignore[call-overload]
        self.log = tmp / "gateway.log"
        with open(self.log, "wb") as log:
            self._start([BIN, "serve", "--nats", nats, "--listen", f"127.0.0.1:{self.port}", "--devices",
                         "cpu:threads=1", "--metrics", f"127.0.0.1:{self.metrics}"], self.port, "gateway",
                        stdout=subprocess.DEVNULL, stderr=log)
        self.url = f"ws://127.0.0.1:{self.port}"

    def _start(self, args: list[str], port: int, what: str, **kw: object) -> None:
        p = subprocess.Popen(args, **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        wait_port(port, p, what)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if shutil.which("nats-server") is None:
        why = "nats-server not found (apt-get install nats-server; scripts/setup does)"
        if os.environ.get("FUSION_REQUIRE_NATS") == "1":
            pytest.fail(why)
        print(f"skipped: {why}")
        pytest.skip(why)
    with tempfile.TemporaryDirectory() as tmp:
        c = Cluster(Path(tmp))
        try:
            yield c
        finally:
            c.stop()


def offline_fuse(features: dict[str, np.ndarray], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        t = dict(features)
        t["mask"] = mask.astype(np.uint8)
        save_file(t, str(inp))
        subprocess.run([BIN, "fuse", "--backend", "cpu", "--input", str(inp), "--output", str(out)],
                       check=True, capture_output=True)
        r = load_file(str(out))
        return r["fused"], r["weights"]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def test_round_trip_through_a_gateway_and_two_workers(cluster: Cluster) -> None:
    # Both workers announce the gateway's head before any work is sent.
    deadline = time.time() + 30
    code, body = http_get(cluster.metrics, "/healthz")
    while not body.startswith("ok 2 compatible workers"):
        assert time.time() < deadline, f"/healthz: {code} {body}"
        time.sleep(0.1)
        code, body = http_get(cluster.metrics, "/healthz")
    assert code == 200
    rng = np.random.default_rng(20)
    b = 300
    feats = {"vision": rng.standard_normal((b, 1024), dtype=np.float32),
             "text": rng.standard_normal((b, 768), dtype=np.float32),
             "audio": rng.standard_normal((b, 128), dtype=np.float32)}
    mask = (rng.random((b, 3)) < 0.7).astype(np.uint8)
    mask[mask.sum(1) == 0, 0] = 1
    fused, weights = fc.fuse(cluster.url, "py-cluster", feats, mask=mask, timeout=60)
    ref_f, ref_w = offline_fuse(feats, mask)
    assert fused.shape == (b, 512) and weights.shape == (b, 3)
    for i in range(b):
        assert rel(fused[i], ref_f[i]) <= 1e-5 and rel(weights[i], ref_w[i]) <= 1e-5, i
    # The gateway's /metrics: the batches went through JetStream, each answered.
    # The gateway announced its head's fingerprint, the one /healthz names.
    fp = body.split("head fingerprint ")[1].split(")")[0]
    assert f"head fingerprint {fp}" in cluster.log.read_text(), cluster.log.read_text()
    _, text = http_get(cluster.metrics, "/metrics")
    published = metric(text, "fusion_nats_batches_published_total")
    assert published >= 1, text
    assert metric(text, "fusion_nats_round_trip_seconds_count") == published, text
