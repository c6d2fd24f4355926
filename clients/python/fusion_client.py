"""fusion_client: a small Python client for fusion-engine's streaming protocol v2.

One file, to copy into a coordinator (needs `websockets` >= 13.1 and `numpy` >= 1.23.2), or the
package `fusion-engine-client`: `pip install ./clients/python` installs this same file as the
`fusion_client` package, with its type hints (`py.typed`).
The protocol is docs/PROTOCOL.md; this client implements hello/welcome, subscribe (with resume
and conflation), binary produce, binary results (v1 and v2 frames), errors and notices.

Request/response in one call:

    from fusion_client import fuse
    fused, weights = fuse("ws://127.0.0.1:7878", "cam-1",
                          {"vision": v, "text": t, "audio": a})   # each [B, d_m]

Streaming:

    async with await FusionClient.connect("ws://127.0.0.1:7878") as c:
        results = await c.subscribe("cam-1")
        await c.produce("cam-1", "frame-1", "vision", v0, priority="critical")
        await c.produce("cam-1", "frame-1", "text", t0, last=True)
        async for r in results:          # Result(stream, key, seq, priority, mask, fused, weights,
            ...                          #        stream_seq, replayed)

Many results at a time, as arrays (`connect(..., batch_results=True)`: a results frame whose
records share one layout is decoded with one np.frombuffer):

        rs = await c.subscribe_arrays("cam-1")
        async for ra in rs:              # ResultArrays: keys(), seq, priority, mask [n, M],
            ...                          #   fused [n, D], weights [n, M], stream_seq, replayed

TLS (PROTOCOL.md 1): a server started with `--tls-cert/--tls-key` is `wss://HOST:PORT`; pass
`ca_file="cert.pem"` to `connect`/`fuse` to trust a self-signed certificate (or a private CA)
instead of the system's CA store.

Resuming (PROTOCOL.md 7.4): the client keeps the server epoch and, per subscribed stream, the
last CRITICAL and IMPORTANT stream seq it received. After the connection was lost (a subscription
raises ConnectionClosed), `await c.reconnect()` opens a new connection and resubscribes every
stream from there: the results missed meanwhile arrive (marked `replayed`) on the same
subscription objects, or an `unrecoverable` notice in `c.notices` names what was lost.

    try:
        async for r in results: ...
    except ConnectionClosed:
        await c.reconnect()              # then keep reading `results`
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import json
import os
import ssl
import struct
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, Mapping, Optional, Sequence, TypeVar, Union

import numpy as np
import numpy.typing as npt

try:  # websockets >= 13
    from websockets.asyncio.client import connect as _ws_connect
except ImportError:  # pragma: no cover - old websockets
    from websockets import connect as _ws_connect  # type: ignore[no-redef, unused-ignore]

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

__version__ = "0.1.0"

PROTOCOL_VERSION = 2
PRODUCE_VERSION = 1  # produce frames keep version byte 1 in protocol version 2
MAGIC = b"FE"
KIND_PRODUCE = 1
KIND_RESULT = 2
KIND_SAMPLES = 3
KIND_RESULTS = 4  # several results in one frame (PROTOCOL.md 4.5, hello "batch_results")
DTYPES = {np.dtype("<f4"): 0, np.dtype("<f2"): 1}  # bf16 (2) is sent as raw uint16 bits
PRIORITIES = {"critical": 0, "important": 1, "bulk": 2}
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}
FLAG_ACK = 1
FLAG_LAST = 2
_PRODUCE_HEADER = struct.Struct("<2sBBBBBBHHHHII")  # 24 bytes
_SAMPLES_HEADER = struct.Struct("<2sBBBBBBHHIII")  # 24 bytes
_RESULT_HEADER = struct.Struct("<2sBBBBHHHIQ")  # 24 bytes (version 1)
_RESULT_HEADER_V2 = struct.Struct("<2sBBBBHHHIQQ")  # 32 bytes (version 2: + stream_seq)
_RESULTS_HEADER = struct.Struct("<2sBBI")  # 8 bytes: magic, version, kind 4, record count
_RECORD_LEN = struct.Struct("<I")
RESULT_FLAG_REPLAYED = 1
# fuse(): bytes of features per samples frame at most. Session 9 (docs/PERF.md) kept ~250 KB
# frames in cache through websockets' copies; fuse() now builds each frame masked in one pass and
# writes it to the transport itself, and 1 MiB frames cost the client less per sample (less
# Python per frame) and are batches of their own in the server (>= half its max_batch of 256
# rows of the embedded head): docs/PERF.md session 13.
FUSE_FRAME_BYTES = 1 << 20
# The send queue fuse() asks the server for, in results of its class (hello `send_queue`,
# PROTOCOL.md 2): its window is 90% of what it is granted, so a larger queue keeps more samples
# in flight without the server ever dropping a result (docs/PERF.md session 10).
FUSE_SEND_QUEUE = 4096
# Bytes of a WebSocket client frame header at most (2, an 8-byte length, the 4-byte masking key).
WS_HEADER_ROOM = 14

Json = dict[str, Any]  # a decoded JSON message
Features = Mapping[str, npt.ArrayLike]  # modality name -> array
F32 = npt.NDArray[np.float32]
PathLike = Union[str, "os.PathLike[str]"]  # a file name (the TLS CA file)
_T = TypeVar("_T")


class FusionError(Exception):
    """An `error` message from the server (code is the stable machine code)."""

    def __init__(self, code: str, message: str, retry: bool = False, detail: Optional[Json] = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry = retry
        self.detail = detail or {}


class ConnectionClosed(Exception):
    """The server closed the connection (code and reason as sent, e.g. 1013 'slow_consumer last_seq=9')."""

    def __init__(self, code: Optional[int], reason: str):
        super().__init__(f"connection closed: {code} {reason}")
        self.code = code
        self.reason = reason


@dataclass
class Result:
    """One fused sample."""

    stream: str
    key: str
    seq: int
    priority: str
    mask: npt.NDArray[np.uint8]  # [M] uint8, head order
    fused: F32  # [D] float32
    weights: F32  # [M] float32, head order
    stream_seq: int = 0  # per-stream seq (PROTOCOL.md 7.4); 0 in a version 1 binary result
    replayed: bool = False  # a replay of a result missed while away


def encode_produce(stream: str, key: str, modality: str, values: npt.ArrayLike, priority: str = "important",
                   last: bool = False, ack: bool = False, request_id: int = 0, bf16: bool = False) -> bytes:
    """Binary produce frame (PROTOCOL.md 4.1). `values` is 1-D; float16 arrays are sent as F16,
    `bf16=True` sends a uint16 array of bfloat16 bits, everything else as F32."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {list(PRIORITIES)}, got {priority!r}")
    x = np.asarray(values)
    if x.ndim != 1:
        raise ValueError(f"values for {modality!r} must be 1-D, got shape {x.shape}")
    if bf16:
        if x.dtype != np.uint16:
            raise ValueError("bf16=True expects a uint16 array of bfloat16 bit patterns")
        dtype, payload = 2, x.astype("<u2").tobytes()
    elif x.dtype == np.float16:
        dtype, payload = 1, x.astype("<f2").tobytes()
    else:
        dtype, payload = 0, x.astype("<f4").tobytes()
    s, k, m = stream.encode(), key.encode(), modality.encode()
    flags = (FLAG_ACK if ack else 0) | (FLAG_LAST if last else 0)
    head = _PRODUCE_HEADER.pack(MAGIC, PRODUCE_VERSION, KIND_PRODUCE, dtype, PRIORITIES[priority], flags, 0,
                                len(s), len(k), len(m), 0, request_id, x.shape[0])
    return head + s + k + m + payload


def encode_samples(stream: str, keys: Sequence[Any], features: Features, priority: str = "important", ack: bool = False,
                   request_id: int = 0) -> bytes:
    """Binary samples frame (PROTOCOL.md 4.4): many whole samples of one stream. `features` maps
    modality name -> [N, d_m] array, N = len(keys); the modalities not given are absent. All
    float16 arrays are sent as F16, anything else as F32."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {list(PRIORITIES)}, got {priority!r}")
    names = list(features)
    if not names or not keys:
        raise ValueError("a samples frame needs at least one modality and one key")
    arrays = [np.asarray(features[n]) for n in names]
    for n, a in zip(names, arrays):
        if a.ndim != 2 or a.shape[0] != len(keys):
            raise ValueError(f"features[{n!r}] must be [{len(keys)}, d], got shape {a.shape}")
    f16 = all(a.dtype == np.float16 for a in arrays)
    code, wire = (1, "<f2") if f16 else (0, "<f4")
    s = stream.encode()
    head = _SAMPLES_HEADER.pack(MAGIC, PRODUCE_VERSION, KIND_SAMPLES, code, PRIORITIES[priority],
                                FLAG_ACK if ack else 0, 0, len(s), len(names), len(keys), request_id, 0)
    table = b"".join(struct.pack("<IH", a.shape[1], len(m)) + m
                     for m, a in zip((n.encode() for n in names), arrays))
    return b"".join([head, s, table, _encode_keys(keys)] + [np.ascontiguousarray(a, wire).tobytes() for a in arrays])


def _encode_keys(keys: Sequence[Any]) -> bytes:
    """The keys section of a samples frame: `u16 len, key` per key (one join when every key has
    the same length, the usual case)."""
    enc = [str(k).encode() for k in keys]
    n = len(enc[0]) if enc else 0
    if n < 0x10000 and all(len(k) == n for k in enc):
        prefix = struct.pack("<H", n)
        return prefix + prefix.join(enc)
    return b"".join(struct.pack("<H", len(k)) + k for k in enc)


def _masked_samples_frame(stream: bytes, prio: int, table: bytes, nmods: int, keys: bytes, n: int,
                          blocks: Sequence[npt.NDArray[Any]], wire: np.dtype[Any],
                          key: bytes) -> tuple[npt.NDArray[np.uint8], int]:
    """A samples frame (4.4) built in one buffer and masked with the WebSocket masking `key`
    (RFC 6455 5.3) as it is built: returns (buf, start), the frame is `buf[start:]` and
    `buf[:start]` (at least WS_HEADER_ROOM bytes) is room for the WebSocket frame header
    (`_send_masked`). `table` and `keys` are the encoded modality table and keys section,
    `blocks` the [n, width] arrays in table order. `start` puts the blocks at an 8-aligned
    address, so a block already in the wire dtype is read once and written masked in one
    aligned numpy pass (no copy and second pass to mask it, no unaligned buffering: docs/PERF.md
    session 13); others are converted into the frame, then masked in place."""
    fixed = _SAMPLES_HEADER.pack(MAGIC, PRODUCE_VERSION, KIND_SAMPLES, DTYPES[wire], prio, 0, 0, len(stream), nmods,
                                 n, 0, 0) + stream + table + keys
    start = WS_HEADER_ROOM + (-(WS_HEADER_ROOM + len(fixed))) % 8
    body = start + len(fixed)
    sizes = [int(a.size) * wire.itemsize for a in blocks]
    # Not zero-filled: every byte from `start` on is written below.
    out = np.empty(body + sum(sizes), np.uint8)
    out[start:body] = np.frombuffer(fixed, np.uint8)
    _mask(out, start, len(fixed), key)
    # The key as it lines up with the blocks: they start len(fixed) bytes into the payload.
    phase = len(fixed) % 4
    kb = key[phase:] + key[:phase]
    k32 = np.frombuffer(kb, "<u4")[0]
    o = body
    for a, nb in zip(blocks, sizes):
        if a.dtype == wire and a.flags.c_contiguous and nb % 4 == 0 and (o - body) % 4 == 0:
            np.bitwise_xor(a.reshape(-1).view("<u4"), k32, out=np.frombuffer(out, "<u4", nb // 4, o))
        else:
            np.copyto(np.frombuffer(out, wire, a.size, o).reshape(a.shape), a, casting="unsafe")
            ph = (o - body) % 4
            _mask(out, o, nb, kb[ph:] + kb[:ph])
        o += nb
    return out, start


def _mask(buf: Union[bytearray, npt.NDArray[np.uint8]], at: int, n: int, key: bytes) -> None:
    """XORs `buf[at:at + n]` with the 4-byte `key` repeated from its first byte (RFC 6455 5.3:
    the key as it lines up with that byte), in place; its inverse too."""
    whole = n // 4 * 4
    if whole:
        words = np.frombuffer(buf, "<u4", whole // 4, at)
        np.bitwise_xor(words, np.frombuffer(key, "<u4")[0], out=words)
    for i in range(whole, n):
        buf[at + i] ^= key[i - whole]


def split_results(buf: bytes) -> list[bytes]:
    """The records of a `results` frame (PROTOCOL.md 4.5), each a whole binary result (4.2)."""
    if len(buf) < _RESULTS_HEADER.size:
        raise FusionError("malformed", f"results frame of {len(buf)} bytes is shorter than its header")
    magic, _version, kind, count = _RESULTS_HEADER.unpack_from(buf, 0)
    if magic != MAGIC or kind != KIND_RESULTS:
        raise FusionError("malformed", f"not a results frame (magic {magic!r}, kind {kind})")
    out: list[bytes] = []
    o = _RESULTS_HEADER.size
    for _ in range(count):
        if o + 4 > len(buf):
            raise FusionError("malformed", "results frame ends inside a record length")
        (n,) = _RECORD_LEN.unpack_from(buf, o)
        o += 4
        if o + n > len(buf):
            raise FusionError("malformed", "results frame ends inside a record")
        out.append(buf[o:o + n])
        o += n
    if o != len(buf):
        raise FusionError("malformed", f"results frame has {len(buf) - o} bytes after its {count} records")
    return out


def decode_results(buf: bytes) -> list[Result]:
    """Every result of a binary frame: a `results` frame (4.5) or a single result (4.2)."""
    if len(buf) > 3 and buf[3] == KIND_RESULTS:
        return [decode_result(r) for r in split_results(buf)]
    return [decode_result(buf)]


def decode_result(buf: bytes) -> Result:
    """Binary result frame (PROTOCOL.md 4.2), version 1 (24-byte header) or 2 (32 bytes)."""
    if len(buf) < _RESULT_HEADER.size:
        raise FusionError("malformed", f"result frame of {len(buf)} bytes is shorter than its header")
    magic, version, kind, prio, flags, slen, klen, m, d, seq = _RESULT_HEADER.unpack_from(buf, 0)
    if magic != MAGIC or version not in (1, 2) or kind != KIND_RESULT:
        raise FusionError("malformed", f"not a result frame (magic {magic!r}, version {version}, kind {kind})")
    header, stream_seq = _RESULT_HEADER.size, 0
    if version == 2:
        if len(buf) < _RESULT_HEADER_V2.size:
            raise FusionError("malformed", f"v2 result frame of {len(buf)} bytes is shorter than its header")
        header, stream_seq = _RESULT_HEADER_V2.size, _RESULT_HEADER_V2.unpack_from(buf, 0)[10]
    expected = header + slen + klen + m + 4 * (d + m)
    if len(buf) != expected:
        raise FusionError("malformed", f"result frame has {len(buf)} bytes, expected {expected}")
    o = header
    stream = buf[o:o + slen].decode()
    o += slen
    key = buf[o:o + klen].decode()
    o += klen
    mask = np.frombuffer(buf, np.uint8, m, o).copy()
    o += m
    fused = np.frombuffer(buf, "<f4", d, o).astype(np.float32)
    o += 4 * d
    weights = np.frombuffer(buf, "<f4", m, o).astype(np.float32)
    replayed = version == 2 and bool(flags & RESULT_FLAG_REPLAYED)
    return Result(stream, key, seq, PRIORITY_NAMES.get(prio, str(prio)), mask, fused, weights,
                  stream_seq, replayed)


@dataclass
class ResultArrays:
    """Several results of one stream as arrays, row i being one result (a `results` frame decoded
    in one pass: `decode_results_arrays`, or `FusionClient.subscribe_arrays`). Every key has
    the same length in bytes: `key_bytes` is [n, key_len] uint8 (UTF-8), `keys()` decodes them."""

    stream: str
    key_bytes: npt.NDArray[np.uint8]  # [n, key_len]
    seq: npt.NDArray[np.uint64]  # [n]
    stream_seq: npt.NDArray[np.uint64]  # [n]; 0 in version 1 frames
    priority: npt.NDArray[np.uint8]  # [n] codes (0 critical, 1 important, 2 bulk)
    replayed: npt.NDArray[np.bool_]  # [n]
    mask: npt.NDArray[np.uint8]  # [n, M]
    fused: F32  # [n, D]
    weights: F32  # [n, M]

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    def keys(self) -> list[str]:
        return [bytes(k).decode() for k in self.key_bytes]

    def results(self) -> list[Result]:
        """The same results as Result objects (one per row)."""
        return [Result(self.stream, k, int(self.seq[i]), PRIORITY_NAMES.get(int(self.priority[i]), str(self.priority[i])),
                       self.mask[i].copy(), self.fused[i].copy(), self.weights[i].copy(), int(self.stream_seq[i]),
                       bool(self.replayed[i])) for i, k in enumerate(self.keys())]

    @staticmethod
    def of(r: Result) -> ResultArrays:
        """One Result as a ResultArrays of one row."""
        return ResultArrays(r.stream, np.frombuffer(r.key.encode(), np.uint8)[None, :].copy(),
                            np.array([r.seq], np.uint64), np.array([r.stream_seq], np.uint64),
                            np.array([PRIORITIES.get(r.priority, 255)], np.uint8), np.array([r.replayed], np.bool_),
                            np.asarray(r.mask, np.uint8)[None, :], np.asarray(r.fused, np.float32)[None, :],
                            np.asarray(r.weights, np.float32)[None, :])


@functools.lru_cache(maxsize=64)
def _records_dtype(version: int, slen: int, klen: int, m: int, d: int) -> np.dtype[np.void]:
    """A structured dtype for one record of a `results` frame (u32 length + a 4.2 result) whose
    strings, M and D are the given ones: the whole frame is then one np.frombuffer."""
    h = _RESULT_HEADER_V2.size if version == 2 else _RESULT_HEADER.size
    names = ["length", "ident", "priority", "flags", "shape", "seq"]
    formats: list[Any] = ["<u4", "<u4", "u1", "u1", ("<u2", (5,)), "<u8"]
    offsets = [0, 4, 8, 9, 10, 20]  # ident: magic, version, kind; shape: slen, klen, M, D (u32)
    if version == 2:
        names.append("stream_seq")
        formats.append("<u8")
        offsets.append(28)
    o = 4 + h
    for name, fmt, size in (("stream", ("u1", (slen,)), slen), ("key", ("u1", (klen,)), klen),
                            ("mask", ("u1", (m,)), m), ("fused", ("<f4", (d,)), 4 * d),
                            ("weights", ("<f4", (m,)), 4 * m)):
        names.append(name)
        formats.append(fmt)
        offsets.append(o)
        o += size
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": o})


def decode_results_arrays(buf: bytes) -> Optional[ResultArrays]:
    """A `results` frame (PROTOCOL.md 4.5) decoded in one pass, when every record has the same
    layout (one stream, keys of one length, the same M and D, one version): one np.frombuffer
    over a structured dtype. None for any other frame (a single result, records that differ, or
    a malformed frame): `decode_results` is the general decoder (and the one that reports
    malformed frames)."""
    n_buf = len(buf)
    if n_buf < _RESULTS_HEADER.size + 4 + _RESULT_HEADER.size or buf[3] != KIND_RESULTS:
        return None
    magic, version, _kind, count = _RESULTS_HEADER.unpack_from(buf, 0)
    if magic != MAGIC or version not in (1, 2) or count < 1:
        return None
    (length,) = _RECORD_LEN.unpack_from(buf, _RESULTS_HEADER.size)
    if n_buf - _RESULTS_HEADER.size != count * (4 + length):
        return None
    header = _RESULT_HEADER_V2 if version == 2 else _RESULT_HEADER
    if length < header.size:
        return None
    magic2, version2, kind2, _prio, _flags, slen, klen, m, d = header.unpack_from(buf, _RESULTS_HEADER.size + 4)[:9]
    if (magic2 != MAGIC or version2 != version or kind2 != KIND_RESULT or min(slen, klen, m, d) == 0
            or length != header.size + slen + klen + m + 4 * (d + m)):
        return None
    rec = np.frombuffer(buf, _records_dtype(version, slen, klen, m, d), count, _RESULTS_HEADER.size)
    first = rec[:1]
    if not (count == 1 or (bool((rec["length"] == length).all()) and bool((rec["ident"] == first["ident"]).all())
                           and bool((rec["shape"] == first["shape"]).all())
                           and bool((rec["stream"] == first["stream"]).all()))):
        return None
    flags = rec["flags"]
    replayed = (flags & RESULT_FLAG_REPLAYED).astype(np.bool_) if version == 2 else np.zeros(count, np.bool_)
    stream_seq = rec["stream_seq"].astype(np.uint64) if version == 2 else np.zeros(count, np.uint64)
    return ResultArrays(bytes(rec["stream"][0]).decode(), rec["key"].copy(), rec["seq"].astype(np.uint64),
                        stream_seq, rec["priority"].copy(), replayed, rec["mask"].copy(),
                        rec["fused"].astype(np.float32), rec["weights"].astype(np.float32))


def _result_from_json(msg: Json) -> Result:
    return Result(msg["stream"], str(msg["key"]), int(msg["seq"]), msg.get("priority", "important"),
                  np.asarray(msg.get("mask", []), np.uint8), np.asarray(msg["fused"], np.float32),
                  np.asarray(msg["weights"], np.float32), int(msg.get("stream_seq", 0)),
                  bool(msg.get("replayed", False)))


@dataclass
class ResumePoint:
    """Where a subscription resumes (PROTOCOL.md 7.4): the server epoch and the last stream seq
    received of each replayed class."""

    epoch: int
    critical: int = 0
    important: int = 0

    def to_json(self) -> dict[str, int]:
        return {"epoch": self.epoch, "critical": self.critical, "important": self.important}


_Item = TypeVar("_Item")


class _QueueIterator(Generic[_Item]):
    """Async iterator over one stream's queue of received items; a ConnectionClosed in the queue
    ends it (1000/1001: cleanly, else raised)."""

    def __init__(self, stream: str, queue: asyncio.Queue[Union[_Item, BaseException]]):
        self.stream = stream
        self._queue = queue

    def __aiter__(self) -> _QueueIterator[_Item]:
        return self

    async def __anext__(self) -> _Item:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            if isinstance(item, ConnectionClosed) and item.code in (1000, 1001):
                raise StopAsyncIteration
            raise item
        return item

    async def get(self, timeout: Optional[float] = None) -> _Item:
        """The next item (raises asyncio.TimeoutError after `timeout` seconds)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    def get_nowait(self) -> Optional[_Item]:
        """The next item if one is already received, else None (no waiting, no timer: the
        cheap way to drain a burst after `get`). Raises like iteration does when the
        connection ended."""
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if isinstance(item, BaseException):
            # Leave the end-of-stream marker for the next get/iteration as well.
            self._queue.put_nowait(item)
            if isinstance(item, ConnectionClosed) and item.code in (1000, 1001):
                return None
            raise item
        return item


class _Subscription(_QueueIterator[Result]):
    """Async iterator over one stream's results (see FusionClient.subscribe)."""

    def __init__(self, client: FusionClient, stream: str, queue: asyncio.Queue[Union[Result, BaseException]]):
        super().__init__(stream, queue)
        self._client = client


class _ArraySubscription(_QueueIterator[ResultArrays]):
    """One stream's results as ResultArrays (see FusionClient.subscribe_arrays)."""


class FusionClient:
    """One connection. Create with `await FusionClient.connect(url, token=...)`.

    A background task reads the socket: results go to their stream's subscription queue, errors
    and notices to `errors` / `notices` (asyncio queues; errors about a produce also fail the
    matching `produce(..., ack=True)` call). Queues are bounded (`max_buffered` per stream);
    when a consumer does not keep up, the server's own backpressure takes over (the client stops
    reading once its queue is full).
    """

    def __init__(self, ws: ClientConnection, welcome: Json, max_buffered: int, url: str = "",
                 token: Optional[str] = None, open_timeout: float = 10.0, batch_results: bool = False,
                 ca_file: Optional[PathLike] = None, send_queue: Optional[Mapping[str, int]] = None):
        self._ws = ws
        self._send_queue = dict(send_queue) if send_queue else None
        self._url, self._token, self._open_timeout = url, token, open_timeout
        self._ca_file = ca_file
        self._set_welcome(welcome)
        self._max_buffered = max_buffered
        self._subs: dict[str, asyncio.Queue[Union[Result, BaseException]]] = {}
        # Streams subscribed with subscribe_arrays: their results go here as ResultArrays.
        self._array_subs: dict[str, asyncio.Queue[Union[ResultArrays, BaseException]]] = {}
        self._conflate: dict[str, Optional[str]] = {}
        self._points: dict[str, ResumePoint] = {}
        self._leaving = False  # set while disconnect()/reconnect() replace the socket
        self._batch_results = batch_results
        self._pending: dict[int, asyncio.Future[Json]] = {}
        self._ids = itertools.count(1)
        self.errors: asyncio.Queue[FusionError] = asyncio.Queue(maxsize=10000)
        self.notices: asyncio.Queue[Json] = asyncio.Queue(maxsize=10000)
        self.closed: Optional[ConnectionClosed] = None
        self._reader = asyncio.create_task(self._read_loop())

    def _set_welcome(self, welcome: Json) -> None:
        self.welcome = welcome
        self.epoch = int(welcome.get("epoch", 0))
        self.head: Json = welcome.get("head", {})
        self.modalities: list[str] = [m["name"] for m in self.head.get("modalities", [])]
        self.widths: dict[str, int] = {m["name"]: m["width"] for m in self.head.get("modalities", [])}
        self.dim: Optional[int] = self.head.get("dim")

    @staticmethod
    async def _open(url: str, token: Optional[str], open_timeout: float,
                    batch_results: bool = False,
                    ca_file: Optional[PathLike] = None,
                    send_queue: Optional[Mapping[str, int]] = None) -> tuple[ClientConnection, Json]:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        kwargs: dict[str, Any] = {"max_size": 64 * 1024 * 1024, "open_timeout": open_timeout}
        if headers:
            kwargs["additional_headers"] = headers
        if ca_file is not None and url.lower().startswith("wss:"):
            # Only the CA file's certificates are trusted (ssl's rule for `cafile`).
            kwargs["ssl"] = ssl.create_default_context(cafile=os.fspath(ca_file))
        ws = await _ws_connect(url, **kwargs)
        hello: Json = {"type": "hello", "version": PROTOCOL_VERSION, "results": "binary",
                       "batch_results": batch_results, "client": "fusion_client.py"}
        if send_queue:
            hello["send_queue"] = dict(send_queue)
        await ws.send(json.dumps(hello))
        while True:
            raw = await asyncio.wait_for(ws.recv(), open_timeout)
            if isinstance(raw, str):
                msg = json.loads(raw)
                if msg.get("type") == "welcome":
                    return ws, msg
                if msg.get("type") == "error":
                    await ws.close()
                    raise FusionError(msg.get("code", "?"), msg.get("message", ""), bool(msg.get("retry")), msg)

    @classmethod
    async def connect(cls, url: str, token: Optional[str] = None, max_buffered: int = 100000,
                      open_timeout: float = 10.0, batch_results: bool = False,
                      ca_file: Optional[PathLike] = None,
                      send_queue: Optional[Mapping[str, int]] = None) -> FusionClient:
        """Connects, says hello (protocol 2, binary results), waits for `welcome`.
        `batch_results`: the server may send several results in one frame (PROTOCOL.md 4.5);
        subscriptions yield the same results either way, with less work per result.
        `ca_file`: for `wss://` URLs, a PEM file of the CA certificates to trust (a self-signed
        server certificate) instead of the system's; ignored for `ws://`.
        `send_queue`: the sizes of this connection's result queues on the server to ask for,
        e.g. `{"important": 4096}` (PROTOCOL.md 2: at most the server's `max_send_queue`; the
        sizes granted are in `welcome["limits"]["send_queue"]`)."""
        ws, welcome = await cls._open(url, token, open_timeout, batch_results, ca_file, send_queue)
        return cls(ws, welcome, max_buffered, url, token, open_timeout, batch_results, ca_file,
                   send_queue)

    def resume_point(self, stream: str) -> Optional[ResumePoint]:
        """Where `stream` would resume now (None when not subscribed)."""
        p = self._points.get(stream)
        return None if p is None else ResumePoint(p.epoch, p.critical, p.important)

    async def disconnect(self) -> None:
        """Closes the connection but keeps subscriptions, their queues and resume points for
        `reconnect()`."""
        self._leaving = True
        try:
            await self._ws.close()
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 5)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                self._reader.cancel()
        finally:
            self._leaving = False

    async def reconnect(self) -> None:
        """Opens a new connection to the same server and resubscribes every stream from its
        resume point: what was missed is replayed into the same subscription queues, or named
        in an `unrecoverable` notice (in `notices`)."""
        if not self._reader.done():
            await self.disconnect()
        ws, welcome = await self._open(self._url, self._token, self._open_timeout, self._batch_results,
                                       self._ca_file, self._send_queue)
        self._ws = ws
        self._set_welcome(welcome)
        self.closed = None
        self._reader = asyncio.create_task(self._read_loop())
        for stream in list(self._subs):
            await self.subscribe(stream, conflate=self._conflate.get(stream), resume=self._points.get(stream))
        for stream in list(self._array_subs):
            await self.subscribe_arrays(stream, conflate=self._conflate.get(stream), resume=self._points.get(stream))

    async def __aenter__(self) -> FusionClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _request(self, msg: Json, timeout: float = 10.0) -> Json:
        rid = next(self._ids)
        msg["id"] = rid
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._ws.send(json.dumps(msg))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def subscribe(self, stream: str, conflate: Optional[str] = None,
                        resume: Optional[ResumePoint] = None) -> _Subscription:
        """Subscribes to a stream; returns an async iterator of its Results. `conflate`
        ("key" or "stream") keeps only the newest queued BULK result per key or stream
        (PROTOCOL.md 7.5); `resume` replays what was missed since that point (7.4)."""
        if stream in self._array_subs:
            raise ValueError(f"stream {stream!r} is already subscribed with subscribe_arrays")
        q = self._subs.get(stream)
        if q is None:
            q = asyncio.Queue(maxsize=self._max_buffered)
            self._subs[stream] = q
        await self._subscribe(stream, conflate, resume)
        return _Subscription(self, stream, q)

    async def subscribe_arrays(self, stream: str, conflate: Optional[str] = None,
                               resume: Optional[ResumePoint] = None) -> _ArraySubscription:
        """Like `subscribe`, but the results come as ResultArrays, several at a time: a `results`
        frame (connect with `batch_results=True`) whose records share one layout is decoded in
        one pass (`decode_results_arrays`), any other result arrives as a ResultArrays of one
        row. The same results in the same order as `subscribe` gives."""
        if stream in self._subs:
            raise ValueError(f"stream {stream!r} is already subscribed with subscribe")
        q = self._array_subs.get(stream)
        if q is None:
            q = asyncio.Queue(maxsize=self._max_buffered)
            self._array_subs[stream] = q
        await self._subscribe(stream, conflate, resume)
        return _ArraySubscription(stream, q)

    async def _subscribe(self, stream: str, conflate: Optional[str], resume: Optional[ResumePoint]) -> None:
        msg: dict[str, Any] = {"type": "subscribe", "stream": stream}
        if conflate is not None:
            msg["conflate"] = conflate
        if resume is not None:
            msg["resume"] = resume.to_json()
            self._points[stream] = ResumePoint(resume.epoch, resume.critical, resume.important)
        else:
            self._points.pop(stream, None)
        self._conflate[stream] = conflate
        await self._request(msg)

    async def unsubscribe(self, stream: str) -> None:
        await self._request({"type": "unsubscribe", "stream": stream})
        self._subs.pop(stream, None)
        self._array_subs.pop(stream, None)
        self._points.pop(stream, None)
        self._conflate.pop(stream, None)

    def _track_arrays(self, ra: ResultArrays) -> None:
        """_track for every row of a ResultArrays at once."""
        p = self._points.get(ra.stream)
        if p is None:
            return
        for code, name in ((0, "critical"), (1, "important")):
            sel = ra.stream_seq[ra.priority == code]
            if sel.size:
                setattr(p, name, max(getattr(p, name), int(sel.max())))

    def _track(self, msg: Union[Result, Json]) -> None:
        """Resume bookkeeping from one received message (a Result or a JSON dict)."""
        if isinstance(msg, Result):
            p = self._points.get(msg.stream)
            if p is not None and msg.stream_seq:
                if msg.priority == "critical":
                    p.critical = max(p.critical, msg.stream_seq)
                elif msg.priority == "important":
                    p.important = max(p.important, msg.stream_seq)
            return
        t = msg.get("type")
        if t == "ack" and msg.get("op") == "subscribe" and "epoch" in msg:
            s, epoch, last = str(msg.get("stream", "")), int(msg["epoch"]), int(msg.get("last", 0))
            p = self._points.get(s)
            if p is None:
                self._points[s] = ResumePoint(epoch, last, last)
            elif p.epoch != epoch:  # a resume across a restart: replayed from the new start
                self._points[s] = ResumePoint(epoch, 0, 0)
        elif t == "notice" and msg.get("kind") == "unrecoverable" and msg.get("last") is not None:
            p = self._points.get(str(msg.get("stream", "")))
            if p is not None and msg.get("class") in ("critical", "important"):
                cls_ = msg["class"]
                setattr(p, cls_, max(getattr(p, cls_), int(msg["last"])))

    async def produce(self, stream: str, key: str, modality: str, values: npt.ArrayLike, priority: str = "important",
                      last: bool = False, ack: bool = False, timeout: float = 10.0) -> None:
        """Sends one modality of one sample (binary). With `ack=True`, waits until the server
        accepted it and raises FusionError if it did not."""
        await self._send_frame(lambda rid: encode_produce(stream, key, modality, values, priority, last,
                                                          rid != 0, rid), ack, timeout)

    async def produce_samples(self, stream: str, keys: Sequence[Any], features: Features, priority: str = "important",
                              ack: bool = False, timeout: float = 10.0) -> None:
        """Sends whole samples in one samples frame (PROTOCOL.md 4.4): `features` maps modality
        -> [N, d] array with N = len(keys). With `ack=True`, waits until the server accepted
        the frame and raises FusionError if it did not (a bad frame is refused as a whole)."""
        await self._send_frame(lambda rid: encode_samples(stream, keys, features, priority, rid != 0, rid),
                               ack, timeout)

    async def _send_bytes(self, frame: Union[bytes, bytearray]) -> None:
        """Sends a binary frame as it is (no request id, no ack)."""
        if self.closed:
            raise self.closed
        await self._ws.send(frame)

    async def _send_masked(self, buf: Union[bytearray, npt.NDArray[np.uint8]], start: int,
                           masked_with: Optional[bytes] = None) -> None:
        """Sends `buf[start:]` as one binary message; `buf[:start]` (at least WS_HEADER_ROOM
        bytes) is free room for the WebSocket frame header. The payload is masked in place with
        a fresh random key (or was already, with `masked_with`: `_masked_samples_frame`) and the
        frame handed to the connection's transport inside websockets' own send context (state
        check, then flow control), instead of websockets copying it twice to mask and serialise
        it (docs/PERF.md session 12: ~10% of fuse()'s CPU). `buf` is not used again. Falls back
        to `send` (of the payload unmasked) where that context is not available."""
        if self.closed:
            raise self.closed
        ws: Any = self._ws
        send_context = getattr(ws, "send_context", None)
        transport = getattr(ws, "transport", None)
        # The future websockets keeps while a fragmented message is being sent (its name since
        # 14; 13.x called it fragmented_send_waiter).
        busy = next((a for a in ("send_in_progress", "fragmented_send_waiter") if hasattr(ws, a)), None)
        n = len(buf) - start
        view = buf.data if isinstance(buf, np.ndarray) else memoryview(buf)
        if start < WS_HEADER_ROOM or send_context is None or transport is None or busy is None:
            if masked_with is not None:
                _mask(buf, start, n, masked_with)
            await ws.send(view[start:])
            return
        # As websockets' send does: never between the fragments of another message.
        while getattr(ws, busy) is not None:
            await asyncio.shield(getattr(ws, busy))
        key = masked_with
        if key is None:
            key = os.urandom(4)
            _mask(buf, start, n, key)
        if n < 126:
            head = struct.pack("!BB", 0x82, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x82, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x82, 0x80 | 127, n)
        head += key
        at = start - len(head)
        buf[at:start] = np.frombuffer(head, np.uint8) if isinstance(buf, np.ndarray) else head
        async with send_context():
            transport.write(view[at:])

    async def _send_frame(self, frame: Callable[[int], bytes], ack: bool, timeout: float) -> None:
        """Sends `frame(request_id)`; with `ack`, under a fresh request id, waiting for its ack."""
        if self.closed:
            raise self.closed
        if not ack:
            await self._ws.send(frame(0))
            return
        rid = next(self._ids) & 0xFFFFFFFF or 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._ws.send(frame(rid))
            await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def ping(self, timeout: float = 10.0) -> None:
        await self._request({"type": "ping"}, timeout)

    async def close(self) -> None:
        try:
            await self._ws.close()
        finally:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass

    def _fail_all(self, exc: BaseException) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        if self._leaving:  # disconnect()/reconnect(): the subscriptions go on
            return
        for q in self._subs.values():
            try:
                q.put_nowait(exc)
            except asyncio.QueueFull:
                pass
        for aq in self._array_subs.values():
            try:
                aq.put_nowait(exc)
            except asyncio.QueueFull:
                pass

    async def _read_loop(self) -> None:
        try:
            async for raw in self._ws:
                if isinstance(raw, bytes):
                    if self._array_subs:
                        # One pass over a whole results frame whose records share one layout.
                        ra = decode_results_arrays(raw)
                        if ra is not None and ra.stream not in self._subs:
                            self._track_arrays(ra)
                            aq = self._array_subs.get(ra.stream)
                            if aq is not None:
                                await aq.put(ra)  # blocks (stops reading) when the consumer is behind
                            continue
                    for r in decode_results(raw):
                        self._track(r)
                        q = self._subs.get(r.stream)
                        if q is not None:
                            await q.put(r)  # blocks (stops reading) when the consumer is behind
                        else:
                            aq = self._array_subs.get(r.stream)
                            if aq is not None:
                                await aq.put(ResultArrays.of(r))
                    continue
                msg = json.loads(raw)
                t = msg.get("type")
                if t == "result":
                    r = _result_from_json(msg)
                    self._track(r)
                    q = self._subs.get(r.stream)
                    if q is not None:
                        await q.put(r)
                    else:
                        aq = self._array_subs.get(r.stream)
                        if aq is not None:
                            await aq.put(ResultArrays.of(r))
                elif t in ("ack", "pong"):
                    self._track(msg)
                    fut = self._pending.get(msg.get("id"))
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif t == "error":
                    err = FusionError(msg.get("code", "?"), msg.get("message", ""), bool(msg.get("retry")), msg)
                    fut = self._pending.get(msg.get("id"))
                    if fut is not None and not fut.done():
                        fut.set_exception(err)
                    else:
                        _put_nowait_drop_oldest(self.errors, err)
                elif t == "notice":
                    self._track(msg)
                    _put_nowait_drop_oldest(self.notices, msg)
            code = getattr(self._ws, "close_code", None)
            reason = getattr(self._ws, "close_reason", "") or ""
            self.closed = ConnectionClosed(code, reason)
        except asyncio.CancelledError:
            self.closed = ConnectionClosed(1000, "closed by client")
            raise
        except Exception as e:  # connection errors end the session
            code = getattr(self._ws, "close_code", None)
            reason = getattr(self._ws, "close_reason", "") or str(e)
            self.closed = ConnectionClosed(code, reason)
        finally:
            if self.closed is None:
                self.closed = ConnectionClosed(None, "reader stopped")
            self._fail_all(self.closed)


def _put_nowait_drop_oldest(q: asyncio.Queue[_T], item: _T) -> None:
    if q.full():
        q.get_nowait()
    q.put_nowait(item)


async def fuse_async(url: str, stream: str, features: Features, mask: Optional[npt.ArrayLike] = None,
                     priority: str = "important", token: Optional[str] = None,
                     timeout: float = 60.0, ca_file: Optional[PathLike] = None,
                     window: Optional[int] = None,
                     send_queue: int = FUSE_SEND_QUEUE) -> tuple[F32, F32]:
    """Fuses a batch: `features` maps modality name -> [B, d_m] array (or [d_m] for one sample);
    `mask` is [B, M] in the order of `features` (1 = present). Returns (fused [B, D],
    weights [B, M]) with weights in the order of `features`' keys. `ca_file`: see
    `FusionClient.connect`. `window`: at most this many samples sent and not yet answered.
    fuse() asks the server for a send queue of `send_queue` results for the class (default
    FUSE_SEND_QUEUE; the server caps it at its `max_send_queue`, and one without that option
    keeps its own size); the default window, 90% of the queue granted
    (welcome `limits.send_queue`), lets no result be dropped. A larger window (IMPORTANT or BULK only; CRITICAL keeps the
    default, as a CRITICAL result that does not fit closes the connection) lets the server drop
    results when this reader falls behind: fuse() then sends those samples again, and halves
    the window for a while (docs/PERF.md session 9: on a busy 2-vCPU VM, 1024 carried less
    than 270 because of the drops)."""
    names = list(features)
    arrays = {n: np.asarray(features[n]) for n in names}
    single = all(a.ndim == 1 for a in arrays.values())
    if single:
        arrays = {n: a[None, :] for n, a in arrays.items()}
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) != 1 or any(a.ndim != 2 for a in arrays.values()):
        raise ValueError(f"features must all be [B, d_m] with the same B, got {[a.shape for a in arrays.values()]}")
    b = rows.pop()
    m = np.ones((b, len(names)), np.uint8) if mask is None else np.asarray(mask).astype(np.uint8).reshape(b, len(names))
    empty = np.flatnonzero(m.sum(1) == 0)
    if empty.size:
        raise ValueError(f"mask row {int(empty[0])} has no modality present")
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {list(PRIORITIES)}, got {priority!r}")
    # Keys of one length (tag, '-', the row number zero-padded), made with numpy: a samples frame's
    # keys section is then rows of this table, and a result's row is parsed from its key in one
    # pass over a results frame (no Python work per sample on the fast path).
    tag = uuid.uuid4().hex[:12]
    prefix = np.frombuffer(f"{tag}-".encode(), np.uint8)
    digits = len(str(max(b - 1, 0)))
    klen = len(prefix) + digits
    keytab = np.empty((b, 2 + klen), np.uint8)
    keytab[:, :2] = np.frombuffer(struct.pack("<H", klen), np.uint8)
    keytab[:, 2:2 + len(prefix)] = prefix
    rows_all = np.arange(b, dtype=np.int64)
    for p in range(digits):
        keytab[:, 2 + len(prefix) + p] = rows_all // 10 ** (digits - 1 - p) % 10 + 48
    pow10 = 10 ** np.arange(digits - 1, -1, -1, dtype=np.int64)

    def rows_of(key_bytes: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """Row numbers of [n, len] key bytes, and which of them are keys of this call."""
        n = key_bytes.shape[0]
        if key_bytes.shape[1] != klen:
            return np.zeros(n, np.int64), np.zeros(n, np.bool_)
        dig = key_bytes[:, len(prefix):].astype(np.int64) - 48
        ok = (key_bytes[:, :len(prefix)] == prefix).all(1) & ((dig >= 0) & (dig <= 9)).all(1)
        idx = dig @ pow10
        ok &= idx < b
        return np.where(ok, idx, 0), ok

    def rows_named(detail: Json) -> list[int]:
        """Rows of this call named by an error or notice (`keys`, or `key`)."""
        named = detail.get("keys") or [detail.get("key")]
        enc = [k.encode() for k in named if isinstance(k, str) and len(k.encode()) == klen]
        if not enc:
            return []
        idx, ok = rows_of(np.frombuffer(b"".join(enc), np.uint8).reshape(len(enc), klen))
        return [int(i) for i in idx[ok]]

    async with await FusionClient.connect(url, token=token, batch_results=True, ca_file=ca_file,
                                          send_queue={priority: max(1, int(send_queue))}) as c:
        unknown = [n for n in names if n not in c.widths]
        if unknown:
            raise FusionError("unknown_modality", f"the server's head has no modality {unknown[0]!r} "
                                                  f"(it has {c.modalities})")
        if c.dim is None:
            raise FusionError("malformed", "the server's welcome names no head dim")
        sub = await c.subscribe_arrays(stream)
        fused = np.zeros((b, c.dim), np.float32)
        weights = np.zeros((b, len(names)), np.float32)
        head_pos = [c.modalities.index(n) for n in names]
        got = np.zeros(b, bool)
        sent = np.zeros(b, bool)

        # Whole samples in samples frames (PROTOCOL.md 4.4), one pattern of present modalities
        # per frame, with at most `window` samples sent and not yet accounted for. The server queues results for this connection in a bounded per-class
        # queue (PROTOCOL.md 7) and drops IMPORTANT/BULK results (closes on CRITICAL) when the
        # reader falls that far behind. By default at most 90% of the class queue is
        # unanswered, so even if this reader stalls every result in flight fits it. IMPORTANT
        # and BULK may be given a larger window; what the server drops is then sent again: every
        # result it drops is counted in a `dropped` notice (7.1, 7.2), so once the results received
        # plus the drops and refusals announced account for every sample sent, the samples
        # sent and not answered are exactly the dropped ones. (Drops of other producers'
        # results on the same stream are counted too: then some samples are sent again early,
        # and their second result is ignored.)
        caps = (c.welcome.get("limits") or {}).get("send_queue") or {}
        safe = max(1, int(caps.get(priority, 256)) * 9 // 10)
        window = safe if window is None or priority == "critical" else max(1, int(window))
        # The window in use: halved (down to `safe`) at each `dropped` notice, grown by a frame
        # for every window's worth of results received since (additive increase, multiplicative
        # decrease): drops cost the server a fused sample and the client a resend.
        limit = {"now": window, "since": 0}
        row_bytes = sum(int(a.shape[1]) * 4 for a in arrays.values()) + 64
        # Frames of at most a quarter window (while the server fuses one, the next ones are on
        # their way) and at most FUSE_FRAME_BYTES, or what fits the server's max_frame_bytes
        # (welcome `limits`; a larger frame closes the connection, PROTOCOL.md 2) beside the
        # header and modality table (each name at most max_name_bytes, 256 by default).
        limits = c.welcome.get("limits") or {}
        max_frame = int(limits.get("max_frame_bytes") or FUSE_FRAME_BYTES)
        fixed = 64 + len(stream.encode()) + sum(6 + len(n.encode()) for n in names)
        chunk = max(1, min(window // 4, min(FUSE_FRAME_BYTES, max_frame - fixed) // row_bytes))

        # Mask patterns, in order of first appearance: the rows of each go in frames of their own.
        if bool(m.all()):
            pat_of = np.zeros(b, np.int64)
            pats = [np.ones(len(names), np.uint8)]
        else:
            uniq, first, inverse = np.unique(m, axis=0, return_index=True, return_inverse=True)
            order = np.argsort(first)
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            pat_of = rank[np.asarray(inverse).reshape(-1)]
            pats = [uniq[j] for j in order]
        sb = stream.encode()
        prio = PRIORITIES[priority]
        frames_of: list[tuple[bytes, list[str], np.dtype[Any]]] = []
        for pat in pats:
            present = [names[j] for j in range(len(names)) if pat[j]]
            f16 = all(arrays[n].dtype == np.float16 for n in present)
            table = b"".join(struct.pack("<IH", arrays[n].shape[1], len(n.encode())) + n.encode() for n in present)
            frames_of.append((table, present, np.dtype("<f2" if f16 else "<f4")))

        work: collections.deque[tuple[int, Union[slice, npt.NDArray[np.int64]]]] = collections.deque()

        def queue_rows(rows: npt.NDArray[np.int64], front: bool = False) -> None:
            parts: list[tuple[int, Union[slice, npt.NDArray[np.int64]]]] = []
            for pid in range(len(pats)):
                idx = rows[pat_of[rows] == pid] if len(pats) > 1 else rows
                # Frames of equal size (at most `chunk`): no short last frame, which a server
                # would hold up to its max_batch_delay for rows to batch it with (docs/PERF.md
                # session 13).
                for part in np.array_split(idx, -(-idx.size // chunk)) if idx.size else []:
                    lo = int(part[0])
                    # A contiguous run is a slice: the frame copies straight from the arrays.
                    parts.append((pid, slice(lo, lo + part.size) if int(part[-1]) - lo + 1 == part.size else part))
            if front:
                work.extendleft(reversed(parts))
            else:
                work.extend(parts)

        queue_rows(rows_all)
        # Accounting, in samples sent (resends included): each is answered by a result, dropped
        # (announced in a `dropped` notice) or refused (an error or `shed` naming its key).
        acct = {"sent": 0, "received": 0, "lost": 0}

        def in_flight() -> int:
            return acct["sent"] - acct["received"] - acct["lost"]

        progress = asyncio.Event()

        async def sender() -> None:
            while True:
                while not work:
                    progress.clear()
                    await progress.wait()
                pid, part = work[0]
                n_part = part.stop - part.start if isinstance(part, slice) else part.size
                if in_flight() > 0 and in_flight() + n_part > limit["now"]:
                    progress.clear()
                    await progress.wait()
                    continue  # resends may have been queued in front meanwhile
                work.popleft()
                if isinstance(part, slice):
                    if got[part].any():  # answered meanwhile (a resend): send only what is missing
                        part = np.arange(part.start, part.stop, dtype=np.int64)[~got[part]]
                else:
                    part = part[~got[part]]
                n_part = part.stop - part.start if isinstance(part, slice) else part.size
                if not n_part:
                    continue
                table, present, wire = frames_of[pid]
                key = os.urandom(4)
                frame, start = _masked_samples_frame(sb, prio, table, len(present), keytab[part].tobytes(), n_part,
                                                     [arrays[n][part] for n in present], wire, key)
                sent[part] = True
                acct["sent"] += n_part
                await c._send_masked(frame, start, key)
                # Let the reader run between frames (a send that need not wait for the socket
                # does not yield): results not read pile up in the server's send queue.
                await asyncio.sleep(0)

        def recover() -> None:
            """Everything sent is accounted for: what is sent and unanswered was dropped or
            refused; send it again."""
            if in_flight() < 0:  # drops of other producers' results of this stream were counted
                acct["lost"] += in_flight()
            if in_flight() == 0:
                missing = np.flatnonzero(sent & ~got)
                if missing.size:
                    sent[missing] = False
                    queue_rows(missing, front=True)
                    progress.set()

        def refused(rows: list[int]) -> None:
            """Samples refused (overloaded, shed): no result will come for them; send them again."""
            acct["lost"] += len(rows)
            again = np.unique(np.asarray(rows, np.int64))
            again = again[~got[again]]
            if again.size:
                sent[again] = False
                queue_rows(again, front=True)
                progress.set()

        task = asyncio.create_task(sender())
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            left_n = b
            while left_n:
                while not c.errors.empty():
                    err = c.errors.get_nowait()
                    mine = rows_named(err.detail)
                    if mine or err.detail.get("stream") in (None, stream):
                        if err.retry and mine:
                            # Overloaded: send those samples again after a short back-off.
                            await asyncio.sleep(0.005)
                            refused(mine)
                            continue
                        raise err
                while not c.notices.empty():
                    n = c.notices.get_nowait()
                    kind = n.get("kind")
                    if kind == "shed" and n.get("stream") == stream:
                        # BULK shed under saturation: send those samples again after a back-off.
                        shed = rows_named(n)
                        if shed:
                            await asyncio.sleep(0.005)
                            refused(shed)
                    elif kind == "dropped" and n.get("class") == priority:
                        acct["lost"] += int(n.get("count", 0))
                        limit["now"], limit["since"] = max(min(safe, window), limit["now"] // 2), 0
                recover()
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise asyncio.TimeoutError(f"{left_n} of {b} results missing after {timeout}s (samples sent "
                                               f"{acct['sent']}, results {acct['received']}, announced dropped "
                                               f"or refused {acct['lost']}, queued to send {len(work)} frames)")
                ra: Optional[ResultArrays]
                try:
                    ra = await sub.get(timeout=min(left, 0.05))
                except asyncio.TimeoutError:
                    failed = task.exception() if task.done() else None
                    if failed is not None:
                        raise failed
                    continue
                # Then every frame already received, without a timer each.
                while ra is not None:
                    idx, ok = rows_of(ra.key_bytes)
                    n_ok = int(ok.sum())
                    acct["received"] += n_ok
                    limit["since"] += n_ok
                    if limit["since"] >= limit["now"] and limit["now"] < window:
                        limit["now"], limit["since"] = min(window, limit["now"] + chunk), 0
                    sel = np.flatnonzero(ok)
                    idx = idx[sel]
                    fresh = ~got[idx]
                    if not fresh.all():
                        sel, idx = sel[fresh], idx[fresh]
                    if idx.size:
                        # The first result of a row wins (a row sent twice may come back twice).
                        idx, first = np.unique(idx, return_index=True)
                        sel = sel[first]
                        fused[idx] = ra.fused[sel]
                        weights[idx] = ra.weights[sel][:, head_pos]
                        got[idx] = True
                        left_n -= idx.size
                    ra = sub.get_nowait()
                progress.set()
        finally:
            task.cancel()
    if single:
        return fused[0], weights[0]
    return fused, weights


def fuse(url: str, stream: str, features: Features, mask: Optional[npt.ArrayLike] = None,
         priority: str = "important", token: Optional[str] = None, timeout: float = 60.0,
         ca_file: Optional[PathLike] = None, window: Optional[int] = None,
         send_queue: int = FUSE_SEND_QUEUE) -> tuple[F32, F32]:
    """Blocking request/response: see fuse_async."""
    return asyncio.run(fuse_async(url, stream, features, mask, priority, token, timeout, ca_file, window,
                                  send_queue))


async def _demo(url: str) -> None:  # pragma: no cover - manual use
    async with await FusionClient.connect(url) as c:
        print("connected:", c.welcome.get("server"), "modalities", c.widths, "D", c.dim)
    feats = {n: np.random.default_rng(0).standard_normal((4, w), dtype=np.float32)
             for n, w in c.widths.items()}
    fused, weights = await fuse_async(url, "demo", feats)
    print("fused", fused.shape, "weights", weights.round(3).tolist())


if __name__ == "__main__":  # pragma: no cover
    import sys

    asyncio.run(_demo(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:7878"))
