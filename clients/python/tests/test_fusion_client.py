"""Tests of the Python client (clients/python/fusion_client.py, the package `fusion_client`)
against a real `fusion-engine serve` on loopback.

They import `fusion_client` as installed: scripts/setup installs the package into .venv (`pip
install ./clients/python`) and scripts/test runs pytest with FUSION_CLIENT_INSTALLED=1, which makes
`test_the_installed_package_is_tested` check that the import came from site-packages. Without an
installed package, run them with PYTHONPATH=clients/python/src.

The server binary is FUSION_ENGINE_BIN or target/release/fusion-engine. Round trips are compared
with `fusion-engine fuse` on the same head and inputs (within 1e-5), including a head the server
has never seen before.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
from safetensors.numpy import load_file, save_file

import fusion_client as fc

ROOT = Path(__file__).resolve().parents[3]
SINGLE_FILE = ROOT / "clients" / "python" / "fusion_client.py"
BIN = os.environ.get("FUSION_ENGINE_BIN", str(ROOT / "target" / "release" / "fusion-engine"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{self.port}", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()}")
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
def server():
    s = Server()
    yield s
    s.stop()


def random_head(path: Path, dims: dict[str, int], d: int, seed: int, eps: float = 1e-5) -> None:
    rng = np.random.default_rng(seed)
    t = {}
    for name, w in dims.items():
        t[f"proj.{name}.weight"] = (rng.uniform(-1, 1, (d, w)) / np.sqrt(w)).astype(np.float32)
        t[f"proj.{name}.bias"] = rng.uniform(-0.1, 0.1, d).astype(np.float32)
    t["gate.weight"] = (rng.uniform(-4, 4, (1, d)) / np.sqrt(d)).astype(np.float32)
    t["norm.weight"] = rng.uniform(0.5, 1.5, d).astype(np.float32)
    t["norm.bias"] = rng.uniform(-0.1, 0.1, d).astype(np.float32)
    save_file(t, str(path), metadata={"modalities": ",".join(dims), "eps": str(eps)})


def offline_fuse(features: dict, mask: np.ndarray, head_order: list[str], model: Path | None) -> tuple:
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.safetensors", Path(tmp) / "out.safetensors"
        t = dict(features)
        t["mask"] = np.stack([mask[:, list(features).index(n)] for n in head_order], 1).astype(np.uint8)
        save_file(t, str(inp))
        args = [BIN, "fuse", "--backend", "cpu", "--input", str(inp), "--output", str(out)]
        if model:
            args += ["--model", str(model)]
        subprocess.run(args, check=True, capture_output=True)
        r = load_file(str(out))
        return r["fused"], r["weights"]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def test_round_trip_matches_offline_fuse(server):
    rng = np.random.default_rng(1)
    b = 23
    # Keys deliberately in another order than the head's (vision, text, audio).
    feats = {"audio": rng.standard_normal((b, 128), dtype=np.float32),
             "vision": rng.standard_normal((b, 1024), dtype=np.float32),
             "text": rng.standard_normal((b, 768), dtype=np.float32)}
    mask = (rng.random((b, 3)) < 0.7).astype(np.uint8)
    mask[mask.sum(1) == 0, 0] = 1
    fused, weights = fc.fuse(server.url, "py-rt", feats, mask=mask)
    ref_f, ref_w = offline_fuse(feats, mask, ["vision", "text", "audio"], None)
    assert fused.shape == (b, 512) and weights.shape == (b, 3)
    assert rel(fused, ref_f) <= 1e-5
    # weights come back in the order of `features`
    assert rel(weights, ref_w[:, [2, 0, 1]]) <= 1e-5
    assert np.all(weights[mask == 0] == 0)


def test_fuse_of_a_batch_larger_than_the_send_queues(server):
    # 6000 samples at once: more than a subscriber's IMPORTANT queue (300) holds. fuse() keeps
    # at most half a queue unanswered; before it did, the server dropped the results a Python
    # reader could not take fast enough and fuse() timed out (8192 samples: 5312 missing).
    rng = np.random.default_rng(3)
    b = 6000
    feats = {"vision": rng.standard_normal((b, 1024), dtype=np.float32),
             "text": rng.standard_normal((b, 768), dtype=np.float32),
             "audio": rng.standard_normal((b, 128), dtype=np.float32)}
    mask = np.ones((b, 3), np.uint8)
    mask[::7, 2] = 0  # two mask patterns: two streams of samples frames
    fused, weights = fc.fuse(server.url, "py-big", feats, mask=mask, timeout=120)
    ref_f, ref_w = offline_fuse(feats, mask, ["vision", "text", "audio"], None)
    assert rel(fused, ref_f) <= 1e-5 and rel(weights, ref_w) <= 1e-5


def test_single_sample_and_f16():
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "head.safetensors"
        dims = {"img": 37, "txt": 5, "aud": 130}
        random_head(model, dims, 67, seed=int(time.time()), eps=0.01)
        s = Server("--model", str(model))
        try:
            rng = np.random.default_rng(2)
            feats = {n: rng.standard_normal((9, w), dtype=np.float32) for n, w in dims.items()}
            mask = np.ones((9, 3), np.uint8)
            mask[4, 1:] = 0
            fused, weights = fc.fuse(s.url, "unseen", feats, mask=mask, priority="critical")
            ref_f, ref_w = offline_fuse(feats, mask, list(dims), model)
            assert rel(fused, ref_f) <= 1e-5 and rel(weights, ref_w) <= 1e-5
            # f16 payloads and a single sample (1-D arrays)
            one = {n: v[0].astype(np.float16) for n, v in feats.items()}
            f1, w1 = fc.fuse(s.url, "unseen", one)
            r16 = {n: v[:1].astype(np.float16).astype(np.float32) for n, v in feats.items()}
            ref_f1, ref_w1 = offline_fuse(r16, np.ones((1, 3), np.uint8), list(dims), model)
            assert f1.shape == (67,) and rel(f1, ref_f1[0]) <= 1e-5 and rel(w1, ref_w1[0]) <= 1e-5
        finally:
            s.stop()


def test_unknown_modality_and_bad_mask(server):
    with pytest.raises(fc.FusionError) as e:
        fc.fuse(server.url, "s", {"smell": np.zeros((1, 4), np.float32)})
    assert e.value.code == "unknown_modality"
    with pytest.raises(ValueError):
        fc.fuse(server.url, "s", {"text": np.zeros((2, 768), np.float32)}, mask=np.array([[1], [0]]))


async def _raw_errors(url: str) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None) as ws:
        async def next_json() -> dict:
            while True:
                m = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(m, str):
                    j = json.loads(m)
                    if j["type"] in ("error", "ack", "pong"):
                        return j

        await ws.send("this is not json")
        assert (await next_json())["code"] == "malformed"
        await ws.send(json.dumps({"type": "teleport"}))
        assert (await next_json())["code"] == "unknown_type"
        await ws.send(b"\x00\x01garbage")
        assert (await next_json())["code"] == "malformed"
        bad = np.zeros(768, np.float32)
        bad[5] = np.nan
        await ws.send(fc.encode_produce("s", "k", "text", bad, request_id=3))
        j = await next_json()
        assert j["code"] == "non_finite" and j.get("id") == 3
        await ws.send(fc.encode_produce("s", "k", "text", np.zeros(700, np.float32), request_id=4))
        assert (await next_json())["code"] == "wrong_width"
        await ws.send(fc.encode_produce("s", "k", "smell", np.zeros(4, np.float32), request_id=5))
        assert (await next_json())["code"] == "unknown_modality"
        hdr = bytearray(fc.encode_produce("s", "k", "text", np.zeros(768, np.float32)))
        hdr[4] = 9  # dtype code
        await ws.send(bytes(hdr))
        assert (await next_json())["code"] in ("bad_dtype", "malformed")
        # still alive after all that
        await ws.send(json.dumps({"type": "ping", "id": 99}))
        j = await next_json()
        assert j["type"] == "pong" and j.get("id") == 99
        # oversized frame: closed with 1009
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            # the server may close while the frame is still being written
            await ws.send(b"\x00" * (17 * 1024 * 1024))
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        raise _Done


class _Done(Exception):
    """Raised out of the raw connection once it was closed as expected."""


def test_garbage_and_oversized_frames_get_typed_errors_and_server_survives(server):
    with pytest.raises(_Done):
        asyncio.run(_raw_errors(server.url))
    rng = np.random.default_rng(3)
    feats = {"vision": rng.standard_normal((2, 1024), dtype=np.float32)}
    fused, _ = fc.fuse(server.url, "after-garbage", feats)
    assert np.isfinite(fused).all()


def test_token_auth():
    s = Server("--token", "s3cret")
    try:
        feats = {"text": np.ones((1, 768), np.float32)}
        with pytest.raises(Exception) as e:
            fc.fuse(s.url, "a", feats)
        assert "401" in str(e.value)
        fused, _ = fc.fuse(s.url, "a", feats, token="s3cret")
        assert fused.shape == (1, 512)
    finally:
        s.stop()


def test_streaming_client_subscribe_and_produce(server):
    async def go() -> None:
        async with await fc.FusionClient.connect(server.url) as c:
            assert c.modalities == ["vision", "text", "audio"] and c.dim == 512
            sub = await c.subscribe("live")
            rng = np.random.default_rng(4)
            await c.produce("live", "k1", "vision", rng.standard_normal(1024).astype(np.float32), ack=True)
            await c.produce("live", "k1", "audio", rng.standard_normal(128).astype(np.float32), last=True)
            r = await sub.get(timeout=10)
            assert r.key == "k1" and r.stream == "live" and r.seq >= 1
            assert list(r.mask) == [1, 0, 1] and r.weights[1] == 0 and abs(r.weights.sum() - 1) < 1e-5
            with pytest.raises(fc.FusionError) as e:
                await c.produce("live", "k2", "text", np.zeros(3, np.float32), ack=True)
            assert e.value.code == "wrong_width"

    asyncio.run(go())


def test_samples_frames_stream_whole_samples(server):
    rng = np.random.default_rng(5)
    n = 40
    feats = {"text": rng.standard_normal((n, 768), dtype=np.float32),
             "vision": rng.standard_normal((n, 1024), dtype=np.float32)}
    keys = [f"s{i}" for i in range(n)]

    async def go() -> dict:
        async with await fc.FusionClient.connect(server.url) as c:
            sub = await c.subscribe("batched")
            await c.produce_samples("batched", keys, feats, priority="critical", ack=True)
            got = {}
            while len(got) < n:
                r = await sub.get(timeout=10)
                got[r.key] = r
            # A bad frame is refused as a whole, with its typed error.
            bad = dict(feats, text=feats["text"][:, :700])
            with pytest.raises(fc.FusionError) as e:
                await c.produce_samples("batched", keys, bad, ack=True)
            assert e.value.code == "wrong_width"
            nan = dict(feats)
            nan["vision"] = feats["vision"].copy()
            nan["vision"][7, 3] = np.nan
            with pytest.raises(fc.FusionError) as e:
                await c.produce_samples("batched", keys, nan, ack=True)
            assert e.value.code == "non_finite" and '"s7"' in str(e.value)
            return got

    got = asyncio.run(go())
    mask = np.tile(np.array([[0, 1, 1]], np.uint8), (n, 1))  # order of `full`: audio, text, vision
    full = {"audio": np.zeros((n, 128), np.float32), **feats}
    ref_f, ref_w = offline_fuse(full, mask, ["vision", "text", "audio"], None)
    fused = np.stack([got[k].fused for k in keys])
    weights = np.stack([got[k].weights for k in keys])  # head order
    assert all(list(got[k].mask) == [1, 1, 0] and got[k].priority == "critical" for k in keys)
    assert rel(fused, ref_f) <= 1e-5
    assert rel(weights, ref_w) <= 1e-5
    with pytest.raises(ValueError):
        fc.encode_samples("s", ["a", "b"], {"text": np.zeros((3, 768), np.float32)})
    with pytest.raises(ValueError):
        fc.encode_samples("s", [], {"text": np.zeros((0, 768), np.float32)})


def test_result_frame_codec_round_trip():
    d, m = 5, 3
    s, k = b"st", b"key"
    fused = np.arange(d, dtype="<f4")
    w = np.array([0.5, 0.5, 0], "<f4")
    buf = struct.pack("<2sBBBBHHHIQ", b"FE", 1, 2, 0, 0, len(s), len(k), m, d, 42) + s + k + \
        bytes([1, 1, 0]) + fused.tobytes() + w.tobytes()
    r = fc.decode_result(buf)
    assert (r.stream, r.key, r.seq, r.priority) == ("st", "key", 42, "critical")
    assert np.array_equal(r.fused, fused) and np.array_equal(r.weights, w)
    with pytest.raises(fc.FusionError):
        fc.decode_result(buf[:-1])


def test_batched_results_frames_carry_every_result_once(server):
    """hello "batch_results": results come several to a frame (PROTOCOL.md 4.5); the
    subscription yields every one, with consecutive seqs and the reference's numbers."""
    rng = np.random.default_rng(9)
    n = 300  # two batches of the server
    feats = {"vision": rng.standard_normal((n, 1024), dtype=np.float32),
             "text": rng.standard_normal((n, 768), dtype=np.float32),
             "audio": rng.standard_normal((n, 128), dtype=np.float32)}
    keys = [f"r{i}" for i in range(n)]
    frames: list = []

    async def go() -> list:
        async with await fc.FusionClient.connect(server.url, batch_results=True) as c:
            assert c.welcome.get("batch_results") is True
            sub = await c.subscribe("frames")
            real = fc.decode_results

            def spy(buf: bytes) -> list:
                frames.append(buf[3])
                return real(buf)

            fc.decode_results = spy
            try:
                await c.produce_samples("frames", keys, feats)
                return [await sub.get(timeout=10) for _ in range(n)]
            finally:
                fc.decode_results = real

    got = asyncio.run(go())
    assert [r.seq for r in got] == list(range(1, n + 1))
    assert [r.key for r in got] == keys
    assert set(frames) == {fc.KIND_RESULTS} and len(frames) < n, frames
    ref_f, ref_w = offline_fuse(feats, np.ones((n, 3), np.uint8), ["vision", "text", "audio"], None)
    assert rel(np.stack([r.fused for r in got]), ref_f) <= 1e-5
    assert rel(np.stack([r.weights for r in got]), ref_w) <= 1e-5


def test_results_frame_codec():
    d, m = 4, 2

    def record(seq: int, key: bytes) -> bytes:
        return struct.pack("<2sBBBBHHHIQQ", b"FE", 2, 2, 1, 0, 1, len(key), m, d, seq, seq + 100) + \
            b"s" + key + bytes([1, 1]) + np.full(d, seq, "<f4").tobytes() + np.full(m, 0.5, "<f4").tobytes()

    recs = [record(7, b"a"), record(8, b"bcd")]
    frame = struct.pack("<2sBBI", b"FE", 2, 4, 2) + b"".join(struct.pack("<I", len(r)) + r for r in recs)
    rs = fc.decode_results(frame)
    assert [(r.seq, r.key, r.stream_seq, r.priority) for r in rs] == [(7, "a", 107, "important"),
                                                                      (8, "bcd", 108, "important")]
    assert np.array_equal(rs[1].fused, np.full(d, 8, np.float32))
    assert [r.seq for r in fc.decode_results(recs[0])] == [7]  # a single result frame
    for bad in (frame[:-1], frame + b"x", frame[:6], struct.pack("<2sBBI", b"FE", 2, 4, 3) + frame[8:]):
        with pytest.raises(fc.FusionError):
            fc.decode_results(bad)


def test_subscription_get_nowait_drains_without_waiting():
    async def go():
        q: asyncio.Queue = asyncio.Queue(4)
        sub = fc._Subscription(None, "s", q)  # type: ignore[arg-type]
        assert sub.get_nowait() is None
        r = fc.decode_result(struct.pack("<2sBBBBHHHIQ", b"FE", 1, 2, 0, 0, 1, 1, 2, 3, 7) + b"sk" +
                             bytes([1, 1]) + np.arange(3, dtype="<f4").tobytes() +
                             np.array([0.5, 0.5], "<f4").tobytes())
        q.put_nowait(r)
        q.put_nowait(r)
        assert sub.get_nowait() is r and sub.get_nowait() is r and sub.get_nowait() is None
        # A normal close ends the drain and stays queued for the next get (StopAsyncIteration).
        q.put_nowait(fc.ConnectionClosed(1000, "bye"))
        assert sub.get_nowait() is None and sub.get_nowait() is None
        with pytest.raises(StopAsyncIteration):
            await sub.__anext__()
        # Any other close is raised.
        q2: asyncio.Queue = asyncio.Queue(4)
        q2.put_nowait(fc.ConnectionClosed(1013, "slow_consumer last_seq=3"))
        with pytest.raises(fc.ConnectionClosed):
            fc._Subscription(None, "s", q2).get_nowait()  # type: ignore[arg-type]

    asyncio.run(go())


def test_result_frame_codec_v2_carries_the_stream_seq():
    d, m = 2, 1
    s, k = b"st", b"k"
    body = s + k + bytes([1]) + np.array([1.5, -2], "<f4").tobytes() + np.array([1], "<f4").tobytes()
    buf = struct.pack("<2sBBBBHHHIQQ", b"FE", 2, 2, 1, fc.RESULT_FLAG_REPLAYED, len(s), len(k), m, d, 7, 1234) + body
    r = fc.decode_result(buf)
    assert (r.seq, r.stream_seq, r.replayed, r.priority, r.key) == (7, 1234, True, "important", "k")
    assert r.fused.tolist() == [1.5, -2.0]
    with pytest.raises(fc.FusionError):
        fc.decode_result(buf[:30])


def _x(i: int) -> np.ndarray:
    return np.linspace(-1, 1, 768, dtype=np.float32) * (1 + i % 7)


PRIOS = ["critical", "important", "bulk"]


async def _produce(c: fc.FusionClient, stream: str, keys: range) -> None:
    for i in keys:
        await c.produce(stream, f"k{i}", "text", _x(i), priority=PRIOS[i % 3], last=True)


async def _take(sub: Any, n: int) -> list:
    return [await sub.get(timeout=20) for _ in range(n)]


def test_resume_replays_missed_results_once_then_live(server):
    async def go() -> None:
        stream = "py-resume"
        ref = await fc.FusionClient.connect(server.url)
        ref_sub = await ref.subscribe(stream)
        a = await fc.FusionClient.connect(server.url)
        a_sub = await a.subscribe(stream)
        p = await fc.FusionClient.connect(server.url)
        try:
            await _produce(p, stream, range(0, 9))
            before = await _take(a_sub, 9)
            await _take(ref_sub, 9)
            point = a.resume_point(stream)
            assert point.epoch == a.epoch > 0
            assert point.critical == max(r.stream_seq for r in before if r.priority == "critical")
            assert point.important == max(r.stream_seq for r in before if r.priority == "important")
            await a.disconnect()
            await _produce(p, stream, range(9, 21))
            away = await _take(ref_sub, 12)  # all fanned out while `a` is away
            await a.reconnect()
            await _produce(p, stream, range(21, 24))
            live = await _take(ref_sub, 3)
            missed = [r for r in away if r.priority != "bulk"]
            got = await _take(a_sub, len(missed) + len(live))
            with pytest.raises(asyncio.TimeoutError):
                await a_sub.get(timeout=0.3)
            replayed = [r for r in got if r.replayed]
            assert sorted(r.stream_seq for r in replayed) == sorted(r.stream_seq for r in missed)
            by_seq = {r.stream_seq: r for r in missed}
            for r in replayed:
                w = by_seq[r.stream_seq]
                assert (r.key, r.priority) == (w.key, w.priority)
                assert np.array_equal(r.fused, w.fused) and np.array_equal(r.weights, w.weights)
            assert sorted(r.stream_seq for r in got if not r.replayed) == [r.stream_seq for r in live]
            for cls_ in ("critical", "important"):
                order = [r.stream_seq for r in got if r.priority == cls_]
                assert order == sorted(order) and len(set(order)) == len(order)
            assert all(n.get("kind") != "unrecoverable" for n in _drain(a.notices))
        finally:
            for c in (ref, a, p):
                await c.close()

    asyncio.run(go())


def _drain(q: asyncio.Queue) -> list:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_resume_with_a_wrong_epoch_is_announced_unrecoverable(server):
    async def go() -> None:
        stream = "py-epoch"
        c = await fc.FusionClient.connect(server.url)
        p = await fc.FusionClient.connect(server.url)
        try:
            w = await c.subscribe(stream)
            await _produce(p, stream, range(0, 3))
            await _take(w, 3)
            stale = fc.ResumePoint(c.epoch ^ 1, 10, 20)
            c2 = await fc.FusionClient.connect(server.url)
            sub = await c2.subscribe(stream, resume=stale)
            got = await _take(sub, 2)  # the CRITICAL and IMPORTANT of the 3, from the new start
            assert all(r.replayed for r in got)
            assert sorted(r.priority for r in got) == ["critical", "important"]
            await asyncio.sleep(0.1)
            un = [n for n in _drain(c2.notices) if n.get("kind") == "unrecoverable"]
            assert sorted((n["class"], n["first"], n["last"], n["reason"]) for n in un) == [
                ("critical", 11, None, "epoch"), ("important", 21, None, "epoch")]
            assert c2.resume_point(stream).epoch == c.epoch
            await c2.close()
        finally:
            await c.close()
            await p.close()

    asyncio.run(go())


def test_version_1_sessions_get_version_1_frames(server):
    async def go() -> None:
        from websockets.asyncio.client import connect

        async with connect(server.url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "hello", "version": 1, "results": "binary"}))
            await ws.send(json.dumps({"type": "subscribe", "stream": "py-v1", "id": 1}))
            await ws.send(fc.encode_produce("py-v1", "k", "text", _x(1), last=True))
            while True:
                m = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(m, bytes):
                    break
                j = json.loads(m)
                if j["type"] == "welcome":
                    assert j["version"] == 1 and j["epoch"] > 0
            assert m[2] == 1 and len(m) == 24 + len("py-v1") + 1 + 3 + 4 * (512 + 3)
            r = fc.decode_result(m)
            assert (r.key, r.stream_seq, r.replayed) == ("k", 0, False)

    asyncio.run(go())


@pytest.mark.skipif(os.environ.get("FUSION_CLIENT_INSTALLED") != "1",
                    reason="FUSION_CLIENT_INSTALLED=1 (scripts/test) says the package is installed")
def test_the_installed_package_is_tested():
    # The module under test is the installed package (site-packages), with its py.typed, and it
    # is the same file as the single-file copy in this checkout (setup reinstalls it each run).
    installed = Path(fc.__file__).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert installed == site / "fusion_client" / "__init__.py", f"imported {installed}, not from {site}"
    assert (installed.parent / "py.typed").is_file()
    assert installed.read_bytes() == SINGLE_FILE.read_bytes(), "stale install: rerun scripts/setup"


def test_the_single_file_copy_runs_on_its_own(server, tmp_path):
    # The README's `python clients/python/fusion_client.py URL`, from a copy of that one file in an
    # empty directory: it connects and fuses a batch.
    copy = tmp_path / "fusion_client.py"
    shutil.copyfile(SINGLE_FILE, copy)
    out = subprocess.run([sys.executable, str(copy), server.url], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "connected:" in out.stdout and "fused (4, " in out.stdout, out.stdout


# --- fast paths: results frames decoded in one pass, samples frames built in one buffer, and
# fuse()'s larger window with recovery of dropped results -----------------------------------


def _record(seq: int, key: bytes, stream: bytes = b"s", d: int = 4, m: int = 2, prio: int = 1, flags: int = 0,
            version: int = 2) -> bytes:
    if version == 2:
        head = struct.pack("<2sBBBBHHHIQQ", b"FE", 2, 2, prio, flags, len(stream), len(key), m, d, seq, seq + 100)
    else:
        head = struct.pack("<2sBBBBHHHIQ", b"FE", 1, 2, prio, 0, len(stream), len(key), m, d, seq)
    rng = np.random.default_rng(seq)
    return (head + stream + key + bytes((seq + j) % 2 for j in range(m))
            + rng.standard_normal(d).astype("<f4").tobytes() + rng.random(m).astype("<f4").tobytes())


def _frame(recs: list, version: int = 2) -> bytes:
    return struct.pack("<2sBBI", b"FE", version, 4, len(recs)) + b"".join(struct.pack("<I", len(r)) + r for r in recs)


def _assert_same(ra: fc.ResultArrays, rs: list) -> None:
    """A ResultArrays holds exactly these Results, bit for bit."""
    assert len(ra) == len(rs)
    assert ra.keys() == [r.key for r in rs] and all(r.stream == ra.stream for r in rs)
    assert ra.seq.tolist() == [r.seq for r in rs] and ra.stream_seq.tolist() == [r.stream_seq for r in rs]
    assert [fc.PRIORITY_NAMES[int(p)] for p in ra.priority] == [r.priority for r in rs]
    assert ra.replayed.tolist() == [r.replayed for r in rs]
    assert ra.mask.tobytes() == b"".join(r.mask.tobytes() for r in rs)
    assert ra.fused.dtype == np.float32 and ra.weights.dtype == np.float32
    assert ra.fused.tobytes() == b"".join(r.fused.tobytes() for r in rs)
    assert ra.weights.tobytes() == b"".join(r.weights.tobytes() for r in rs)
    for a, b in zip(ra.results(), rs):
        assert (a.key, a.seq, a.stream_seq, a.priority, a.replayed) == (b.key, b.seq, b.stream_seq, b.priority, b.replayed)
        assert a.fused.tobytes() == b.fused.tobytes() and a.weights.tobytes() == b.weights.tobytes()


def test_results_arrays_fast_path_matches_the_general_decoder():
    for version in (1, 2):
        recs = [_record(7 + i, b"k%03d" % i, prio=i % 3, flags=i % 2, version=version) for i in range(64)]
        frame = _frame(recs, version)
        ra = fc.decode_results_arrays(frame)
        assert ra is not None and ra.stream == "s"
        _assert_same(ra, fc.decode_results(frame))
        assert fc.decode_results_arrays(_frame(recs[:1], version)) is not None  # one record
    # Not a results frame: a single result (4.2), or a malformed frame (the general decoder
    # reports it).
    assert fc.decode_results_arrays(_record(1, b"k")) is None
    frame = _frame([_record(1, b"ab"), _record(2, b"cd")])
    for bad in (frame[:-1], frame + b"x", frame[:6], struct.pack("<2sBBI", b"FE", 2, 4, 3) + frame[8:]):
        assert fc.decode_results_arrays(bad) is None
        with pytest.raises(fc.FusionError):
            fc.decode_results(bad)


def test_results_arrays_fall_back_on_records_that_differ():
    cases = {
        "mixed-length keys": [_record(1, b"a"), _record(2, b"bcd"), _record(3, b"ef")],
        # same record length, but the stream/key split differs
        "same length, other split": [_record(1, b"c", stream=b"ab"), _record(2, b"bc", stream=b"a")],
        # same record length, but another M and D (1 + 4 * 6 = 25 = 2 + 4 * 5 + ... with a longer key)
        "same length, other M and D": [_record(1, b"kk", m=2, d=4), _record(2, b"kkk", m=1, d=5)],
        "two streams": [_record(1, b"k", stream=b"s1"), _record(2, b"k", stream=b"s2")],
    }
    for name, recs in cases.items():
        assert len(set(len(r) for r in recs)) == (1 if name != "mixed-length keys" else 3), name
        frame = _frame(recs)
        assert fc.decode_results_arrays(frame) is None, name
        rs = fc.decode_results(frame)
        assert [r.seq for r in rs] == [1, 2, 3][:len(recs)], name
        for r, raw in zip(rs, recs):  # the general decoder reads each record as a frame of its own
            _assert_same(fc.ResultArrays.of(r), [fc.decode_result(raw)])
    # A version 1 record inside a version 2 frame is not the same layout either.
    assert fc.decode_results_arrays(_frame([_record(1, b"k"), _record(2, b"k", version=1)])) is None


def test_samples_frames_built_masked_in_one_buffer_equal_encode_samples():
    """fuse()'s frames, unmasked, are byte for byte encode_samples' frames: inputs already in the
    wire dtype (masked in one pass), others (f64, Fortran order, f16 blocks of 2 mod 4 bytes
    that shift the key's phase for the next block) converted and masked in place; the blocks
    start 8-aligned in the buffer, and a fresh key gives a different frame."""
    rng = np.random.default_rng(4)
    keys = ["k1", "k2", "k3", "k4", "k5"]
    cases = [
        {"vision": rng.standard_normal((5, 6)).astype(np.float32), "text": rng.standard_normal((5, 3)).astype(np.float32)},
        {"vision": rng.standard_normal((5, 6)), "text": rng.standard_normal((5, 3)).astype(np.float32)},
        {"vision": np.asfortranarray(rng.standard_normal((5, 6)).astype(np.float32)),
         "text": rng.standard_normal((5, 3)).astype(np.float32)},
        {"vision": rng.standard_normal((5, 3)).astype(np.float16), "text": rng.standard_normal((5, 5)).astype(np.float16)},
        {"vision": rng.standard_normal((5, 4)).astype(np.float16), "text": rng.standard_normal((5, 7)).astype(np.float16)},
    ]
    for feats in cases:
        table = b"".join(struct.pack("<IH", a.shape[1], len(n)) + n.encode() for n, a in feats.items())
        wire = np.dtype("<f2" if all(a.dtype == np.float16 for a in feats.values()) else "<f4")
        ref = fc.encode_samples("st", keys, feats, priority="bulk")
        frames = set()
        for key in (b"\x00\x00\x00\x00", b"\x9a\x13\xfe\x01", bytes(rng.integers(0, 256, 4, dtype=np.uint8))):
            buf, start = fc._masked_samples_frame(b"st", 2, table, 2, fc._encode_keys(keys), 5, list(feats.values()),
                                                  wire, key)
            assert start >= fc.WS_HEADER_ROOM and len(buf) - start == len(ref)
            blocks = sum(a.size for a in feats.values()) * wire.itemsize
            assert (len(buf) - blocks) % 8 == 0  # where the blocks start
            masked = bytes(buf[start:])
            frames.add(masked)
            mask = np.resize(np.frombuffer(key, np.uint8), len(ref))
            assert (np.frombuffer(masked, np.uint8) ^ mask).tobytes() == ref
            fc._mask(buf, start, len(buf) - start, key)  # its own inverse
            assert bytes(buf[start:]) == ref
        assert len(frames) == 3
    # Keys of several lengths: one `u16 len, key` each, as PROTOCOL.md 4.4 writes it.
    mixed = ["a", "bcd", 7, "é"]
    assert fc._encode_keys(mixed) == b"".join(struct.pack("<H", len(k)) + k for k in (str(k).encode() for k in mixed))


def test_subscribe_arrays_yields_what_subscribe_does(server):
    """Results frames from a real server, keys of one length (the one-pass path) and of mixed
    lengths (the fallback): subscribe_arrays gives the same results in the same order as a plain
    subscription of another connection."""
    rng = np.random.default_rng(5)
    n = 150  # results of one produce_samples fit the IMPORTANT send queue (300): none dropped
    feats = {"text": rng.standard_normal((n, 768), dtype=np.float32)}
    same = [f"s{i:04d}" for i in range(n)]
    mixed = [f"m{i}" for i in range(n)]  # 2 to 4 bytes
    fast: list = []

    async def go() -> tuple:
        async with await fc.FusionClient.connect(server.url, batch_results=True) as a, \
                await fc.FusionClient.connect(server.url, batch_results=True) as p:
            ref_sub = await p.subscribe("py-arrays")
            sub = await a.subscribe_arrays("py-arrays")
            with pytest.raises(ValueError):
                await a.subscribe("py-arrays")
            real = fc.decode_results_arrays

            def spy(buf: bytes) -> Any:
                out = real(buf)
                fast.append(out is not None)
                return out

            fc.decode_results_arrays = spy
            ref: list = []
            got: list = []
            try:
                for keys in (same, mixed):
                    await p.produce_samples("py-arrays", keys, feats)
                    ref += [await ref_sub.get(timeout=10) for _ in range(n)]
                    while sum(len(x) for x in got) < len(ref):
                        got.append(await sub.get(timeout=10))
            finally:
                fc.decode_results_arrays = real
            return ref, got

    ref, got = asyncio.run(go())
    assert any(fast) and not all(fast), fast  # both paths were taken
    rows = [r for ra in got for r in ra.results()]
    assert [r.key for r in rows] == same + mixed == [r.key for r in ref]
    for a, b in zip(rows, ref):
        assert a.fused.tobytes() == b.fused.tobytes() and a.weights.tobytes() == b.weights.tobytes()
        assert a.mask.tobytes() == b.mask.tobytes() and (a.priority, a.stream_seq) == (b.priority, b.stream_seq)


def _dropped(metrics: str, cls_: str) -> int:
    """Results of class `cls_` the server dropped so far (GET /status.json)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{metrics}/status.json", timeout=10) as r:
        classes = json.loads(r.read())["classes"]
    return int(next(c["dropped"] for c in classes if c["class"] == cls_))


def test_fuse_keeps_its_frames_under_the_servers_max_frame_bytes(server, tmp_path):
    """A server with a small `max_frame_bytes` (welcome `limits`): fuse() sends frames that fit
    it (a larger one would close the connection, 1009) and gets what the default server gives."""
    cfg = tmp_path / "small.toml"
    cfg.write_text("max_frame_bytes = 200000\n")
    small = Server("--config", str(cfg))
    try:
        rng = np.random.default_rng(11)
        feats = {"vision": rng.standard_normal((300, 1024), dtype=np.float32),
                 "text": rng.standard_normal((300, 768), dtype=np.float32)}
        got, gw = fc.fuse(small.url, "small-frames", feats, timeout=30)
        want, ww = fc.fuse(server.url, "small-frames", feats, timeout=30)
        assert got.shape == (300, want.shape[1])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gw, ww, rtol=1e-5, atol=1e-6)
    finally:
        small.stop()


def test_fuse_recovers_results_the_server_drops():
    """A send queue far smaller than fuse()'s window: the server drops IMPORTANT results
    (announced in `dropped` notices), fuse() sends those samples again, and every result is
    still the reference's, as with a window that never overflows."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "serve.toml"
        # Batches of up to 128 into an IMPORTANT queue of 40 (fuse() asks for that size here):
        # most batches overflow it (fuse()'s frames of 33 rows are under half a batch, so they
        # are merged, not batches of their own: docs/DESIGN.md section 4.3). CRITICAL 140: more
        # than a batch.
        cfg.write_text("max_batch = 128\n[send_queue]\nimportant = 40\nbulk = 40\ncritical = 140\n"
                       "[engine]\ndevices = [\"cpu\"]\n")
        metrics = f"127.0.0.1:{free_port()}"
        s = Server("--config", str(cfg), "--metrics", metrics)
        try:
            rng = np.random.default_rng(6)
            b = 1500
            feats = {"vision": rng.standard_normal((b, 1024), dtype=np.float32),
                     "text": rng.standard_normal((b, 768), dtype=np.float32),
                     "audio": rng.standard_normal((b, 128), dtype=np.float32)}
            mask = np.ones((b, 3), np.uint8)
            mask[::5, 0] = 0
            safe_f, safe_w = fc.fuse(s.url, "py-safe", feats, mask=mask, window=36, timeout=120, send_queue=40)
            assert _dropped(metrics, "important") == 0
            fused, weights = fc.fuse(s.url, "py-drops", feats, mask=mask, window=4096, timeout=120, send_queue=40)
            assert _dropped(metrics, "important") > 0  # the recovery was used
            # A window the sender waits on (resends are queued in front of it meanwhile).
            small_f, small_w = fc.fuse(s.url, "py-drops", feats, mask=mask, window=200, timeout=120, send_queue=40)
            bulk_f, bulk_w = fc.fuse(s.url, "py-drops", feats, mask=mask, priority="bulk", window=4096, timeout=120, send_queue=40)
            assert _dropped(metrics, "bulk") > 0
            # CRITICAL keeps 90% of its queue whatever window is asked for (a CRITICAL result
            # that does not fit would close the connection with 1013). This run only checks that
            # it still answers every row: without the cap it passed too here (the server's
            # writer kept up), so the cap itself is not proven by it.
            crit_f, crit_w = fc.fuse(s.url, "py-crit", feats, mask=mask, priority="critical", window=4096,
                                     timeout=120)
            ref_f, ref_w = offline_fuse(feats, mask, ["vision", "text", "audio"], None)
            # Every row answered, with the reference's numbers, whichever way it came (resends
            # are fused in other batches: the CPU kernel's last bits may differ with a row's
            # place in its batch, so the runs are compared with the reference, not bit for bit).
            for f, w in ((safe_f, safe_w), (fused, weights), (small_f, small_w), (bulk_f, bulk_w), (crit_f, crit_w)):
                assert rel(f, ref_f) <= 1e-5 and rel(w, ref_w) <= 1e-5
                assert np.abs(f).sum(1).min() > 0 and np.all(w[mask == 0] == 0)
        finally:
            s.stop()


def test_hello_asks_for_send_queue_sizes(server):
    """`send_queue` in hello (PROTOCOL.md 2): the sizes asked for, capped at the server's
    max_send_queue, are this connection's, and the welcome says so; fuse() asks for
    FUSE_SEND_QUEUE and still answers every row."""
    async def go() -> dict:
        async with await fc.FusionClient.connect(server.url, send_queue={"important": 5000, "bulk": 10**9}) as c:
            return c.welcome["limits"]

    limits = asyncio.run(go())
    assert limits["send_queue"]["important"] == 5000
    assert limits["send_queue"]["bulk"] == limits["max_send_queue"] == 16384
    assert limits["send_queue"]["critical"] == 400  # not asked: the server's default
    rng = np.random.default_rng(9)
    feats = {"vision": rng.standard_normal((3000, 1024), dtype=np.float32),
             "text": rng.standard_normal((3000, 768), dtype=np.float32),
             "audio": rng.standard_normal((3000, 128), dtype=np.float32)}
    fused, weights = fc.fuse(server.url, "py-queue", feats)
    ref_f, ref_w = offline_fuse(feats, np.ones((3000, 3), np.uint8), ["vision", "text", "audio"], None)
    assert rel(fused, ref_f) <= 1e-5 and rel(weights, ref_w) <= 1e-5


def test_send_masked_writes_one_masked_frame_or_falls_back_to_send():
    """fuse()'s frames: masked in place with a random key and written to the transport inside
    websockets' send context, every length form of the header; without that context (another
    websockets), the payload goes through `send` as it is."""
    import contextlib

    class Transport:
        def __init__(self) -> None:
            self.data = b""

        def write(self, d: Any) -> None:
            self.data += bytes(d)

    class Ws:
        send_in_progress = None

        def __init__(self) -> None:
            self.transport = Transport()
            self.sent: list[bytes] = []

        @contextlib.asynccontextmanager
        async def send_context(self) -> Any:
            yield

        async def send(self, m: Any) -> None:
            self.sent.append(bytes(m))

    class Ws13(Ws):  # websockets 13.x's name for the same future
        fragmented_send_waiter = None

        def __getattribute__(self, name: str) -> Any:
            if name == "send_in_progress":
                raise AttributeError(name)
            return object.__getattribute__(self, name)

    class Plain:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        async def send(self, m: Any) -> None:
            self.sent.append(bytes(m))

    def unframe(b: bytes) -> bytes:
        assert b[0] == 0x82 and b[1] & 0x80, b[:2]
        n, o = b[1] & 0x7F, 2
        if n == 126:
            n, o = struct.unpack("!H", b[2:4])[0], 4
        elif n == 127:
            n, o = struct.unpack("!Q", b[2:10])[0], 10
        key, p = np.frombuffer(b[o:o + 4], np.uint8), np.frombuffer(b[o + 4:], np.uint8)
        assert p.size == n
        return (p ^ np.resize(key, n)).tobytes()

    async def run() -> None:
        keys = set()
        for n in (0, 1, 5, 125, 126, 127, 65535, 65536, 70001):
            payload = (np.arange(n, dtype=np.int64) * 7 + 3).astype(np.uint8).tobytes()
            for cls in (Ws, Ws13, Plain):
                c = object.__new__(fc.FusionClient)
                c.closed = None
                c._ws = cls()
                buf = bytearray(fc.WS_HEADER_ROOM) + bytearray(payload)
                await c._send_masked(buf, fc.WS_HEADER_ROOM)
                if cls is not Plain:
                    assert unframe(c._ws.transport.data) == payload and not c._ws.sent
                    keys.add(c._ws.transport.data[-n - 4:len(c._ws.transport.data) - n] if n else b"")
                else:
                    assert c._ws.sent == [payload]
                # Masked already (fuse()'s frames): sent with that key, or unmasked for send().
                c._ws = cls()
                arr = np.zeros(fc.WS_HEADER_ROOM + 3 + n, np.uint8)  # as _masked_samples_frame's
                arr[fc.WS_HEADER_ROOM + 3:] = np.frombuffer(payload, np.uint8)
                fc._mask(arr, fc.WS_HEADER_ROOM + 3, n, b"\x01\x02\x03\x04")
                await c._send_masked(arr, fc.WS_HEADER_ROOM + 3, b"\x01\x02\x03\x04")
                if cls is not Plain:
                    data = c._ws.transport.data
                    assert unframe(data) == payload and not c._ws.sent
                    assert data[len(data) - n - 4:len(data) - n] == b"\x01\x02\x03\x04"
                else:
                    assert c._ws.sent == [payload]
        assert len(keys) > 2  # a fresh key per frame

    asyncio.run(run())
