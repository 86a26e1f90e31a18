"""Support for tests/test_hostile.py (not a test module): the apps a hostile client attacks, a
server handle that watches the server's memory, and the attacker's own tools (raw frames built
fast, floods with a deadline, a client that answers pings from a reader thread, a bystander
that measures its own service).

The apps (run in the server process, ``python -m wsmanager tests.hostile_support:app``):

* ``/never?hold=S``    accepts and does not read for S seconds (then reads to the end, so the
                       server can stop); the attacker's favourite.
* ``/slow?first=F&delay=D``  waits F s after the accept, then reads one message every D s and
                       answers each with ``got:<i>:<kind>:<len>``.
* ``/echo``            echoes every message; the text ``cmd:flood:<n>`` queues n 64 KiB frames
                       through the engine directly (the manager's path, which does not wait).
* ``/digest``          answers each message with ``<kind>:<len>:<sha256 hex>`` (a big message's
                       integrity without sending it back).
* ``/sink``            reads and counts; the text ``report`` answers ``<count>:<bytes>``.
* ``GET /health``      a trivial HTTP route the test times while the server is attacked.
* ``GET /stats``       the engine's ``stats()``.
* ``GET /events``      every ``websocket.disconnect`` the app saw: path, code, reason and the
                       engine's ``wsmanager.reason`` (as ``why``).
* ``GET /block?secs=S`` blocks the event loop for S seconds (time.sleep in an ``async def``).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import select
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect

from tests.native_support import RawClient, close_frame, frame, recv_head  # noqa: F401
from tests.servers import AppServer

MiB = 1024 * 1024
KiB = 1024
APP = "tests.hostile_support:app"

# ---- the apps ----------------------------------------------------------------------------

app = FastAPI()
EVENTS: list[dict[str, Any]] = []


def _record(path: str, msg: dict[str, Any]) -> None:
    EVENTS.append({"path": path, "code": msg.get("code"), "reason": msg.get("reason"),
                   "why": msg.get("wsmanager.reason"), "t": time.monotonic()})


async def _send(ws: WebSocket, text: str | None = None, data: bytes | None = None) -> None:
    """Sends, ignoring a peer that is already gone: its disconnect is still to be received."""
    try:
        if text is not None:
            await ws.send_text(text)
        else:
            await ws.send_bytes(data or b"")
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass


async def _messages(ws: WebSocket, path: str) -> AsyncIterator[dict[str, Any]]:
    """Yields each message the peer sends until its disconnect, which is recorded under path."""
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            _record(path, msg)
            return
        yield msg


async def _drain_to_end(ws: WebSocket, path: str) -> None:
    async for _ in _messages(ws, path):
        pass


@app.websocket("/never")
async def never(ws: WebSocket, hold: float = 5.0) -> None:
    await ws.accept()
    await asyncio.sleep(hold)
    await _drain_to_end(ws, "/never")


@app.websocket("/slow")
async def slow(ws: WebSocket, first: float = 3.0, delay: float = 0.05) -> None:
    await ws.accept()
    await asyncio.sleep(first)
    i = 0
    async for msg in _messages(ws, "/slow"):
        data = msg.get("bytes")
        kind, n = ("b", len(data)) if data is not None else ("t", len(msg.get("text") or ""))
        await _send(ws, f"got:{i}:{kind}:{n}")
        i += 1
        await asyncio.sleep(delay)


@app.websocket("/echo")
async def echo(ws: WebSocket) -> None:
    await ws.accept()
    native = ws.scope["extensions"].get("wsmanager.native")
    async for msg in _messages(ws, "/echo"):
        text = msg.get("text")
        if text is not None and text.startswith("cmd:flood:"):
            chunk = b"x" * 65536
            for _ in range(int(text.split(":")[2])):
                native.engine.send(native.handle, chunk)
            continue
        if text is not None:
            await _send(ws, text)
        else:
            await _send(ws, data=msg["bytes"])


@app.websocket("/digest")
async def digest(ws: WebSocket) -> None:
    await ws.accept()
    async for msg in _messages(ws, "/digest"):
        data = msg.get("bytes")
        kind = "b"
        if data is None:
            kind, data = "t", msg["text"].encode()
        await _send(ws, f"{kind}:{len(data)}:{hashlib.sha256(data).hexdigest()}")


@app.websocket("/sink")
async def sink(ws: WebSocket) -> None:
    await ws.accept()
    count = nbytes = 0
    async for msg in _messages(ws, "/sink"):
        if msg.get("text") == "report":
            await _send(ws, f"{count}:{nbytes}")
            continue
        count += 1
        nbytes += len(msg.get("bytes") or msg.get("text") or "")


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/stats")
async def stats() -> dict[str, Any]:
    from wsmanager.uvicorn import get_engine
    return get_engine().stats()


@app.get("/events")
async def events() -> list[dict[str, Any]]:
    return EVENTS


@app.get("/block")
async def block(secs: float = 1.0) -> dict[str, float]:
    time.sleep(min(secs, 10.0))  # on purpose: the event loop does nothing meanwhile
    return {"blocked": secs}


# ---- the server and its memory -------------------------------------------------------------

ASAN = "asan" in os.environ.get("LD_PRELOAD", "")


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread; ``baseline`` is the
    value when it started (growth is measured from there)."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = rss_kib(pid)
        self.peak = self.baseline
        self.last = self.baseline
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            v = rss_kib(self.pid)
            if v:
                self.last = v
                self.peak = max(self.peak, v)
            self._stop.wait(self.interval)

    def growth_mib(self) -> float:
        """Peak growth so far, MiB."""
        return (self.peak - self.baseline) / 1024

    def now_growth_mib(self) -> float:
        return (rss_kib(self.pid) - self.baseline) / 1024

    def stop(self) -> None:
        self._stop.set()
        self._t.join(2)


class HostileServer(AppServer):
    """``python -m wsmanager`` serving ``app_path`` (default: this module's app) on 127.0.0.1,
    its log in ``tmp``; with the warm-up before an attack and the log lines after it."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, app_path: str = APP) -> None:
        super().__init__(app_path, "native", via_main=True, env=env, log_path=tmp / "server.log")

    def warm_up(self, ws_path: str = "/echo") -> None:
        """One WebSocket round trip and the HTTP routes, so lazy imports and first-use
        allocations are not charged to the attack."""
        c = RawClient(self.port, ws_path)
        assert c.status == 101, c.head
        if ws_path in ("/echo", "/digest"):
            c.send(frame(1, b"warm"))
            c.recv_data()
        c.send(close_frame(1000))
        c.expect_close()
        c.close()
        for path in ("/health", "/stats", "/events"):
            try:
                self.get(path)
            except OSError:
                pass
        time.sleep(0.2)

    def stats(self) -> dict[str, Any]:
        return self.get("/stats")

    def events(self) -> list[dict[str, Any]]:
        return self.get("/events")

    def stop_timed(self, sig: int = signal.SIGTERM, timeout: float = 8.0) -> tuple[int | None, float]:
        """(exit code, seconds to exit) of :meth:`stop`: None when it was killed after
        ``timeout`` (it did not stop on its own)."""
        return self.stop(sig, timeout), self.stop_seconds

    def log_problems(self) -> list[str]:
        """Lines of the server's log that say something was not contained."""
        bad = ("Traceback", "UnicodeDecodeError", "Exception in callback", "Exception in ASGI",
               "MemoryError", "Segmentation", "AddressSanitizer")
        return [line for line in self.log().splitlines() if any(b in line for b in bad)]


def timed_get(port: int, path: str = "/health", timeout: float = 5.0) -> float:
    """Seconds for one HTTP request to be answered; ``inf`` when it is not within timeout."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = recv_head(s)
            if not data.startswith(b"HTTP/1.1 200"):
                return float("inf")
    except OSError:
        return float("inf")
    return time.monotonic() - t0


class HttpProbe:
    """Times GET /health every ``every`` seconds in a thread; ``worst`` is the slowest answer."""

    def __init__(self, port: int, every: float = 0.25, timeout: float = 3.0) -> None:
        self.port = port
        self.every = every
        self.timeout = timeout
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(timed_get(self.port, "/health", self.timeout))
            self._stop.wait(self.every)

    def stop(self) -> float:
        self._stop.set()
        self._t.join(self.timeout + 2)
        return self.worst

    @property
    def worst(self) -> float:
        return max(self.samples) if self.samples else float("inf")


# ---- frames, fast ---------------------------------------------------------------------------
# The attacker does not need random masks: an all-zero key is a valid mask (the mask bit is set,
# the payload goes as is), and it lets millions of frames be built by bytes multiplication.

ZERO_KEY = b"\x00\x00\x00\x00"


def zframe(op: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A masked frame with an all-zero key."""
    b0 = (0x80 if fin else 0) | op
    n = len(payload)
    if n < 126:
        hdr = bytes([b0, 0x80 | n])
    elif n < 65536:
        hdr = bytes([b0, 0x80 | 126]) + struct.pack("!H", n)
    else:
        hdr = bytes([b0, 0x80 | 127]) + struct.pack("!Q", n)
    return hdr + ZERO_KEY + payload


def header(op: int, length: int, form: int, fin: bool = True) -> bytes:
    """A masked frame header (zero key) announcing ``length`` in the given length form:
    7 (one byte), 16 (126 + 2 bytes) or 64 (127 + 8 bytes), minimal or not."""
    b0 = (0x80 if fin else 0) | op
    if form == 7:
        return bytes([b0, 0x80 | length]) + ZERO_KEY
    if form == 16:
        return bytes([b0, 0x80 | 126]) + struct.pack("!H", length) + ZERO_KEY
    return bytes([b0, 0x80 | 127]) + struct.pack("!Q", length) + ZERO_KEY


def straddling_close(pad: int, code: int = 1000, reason: bytes = b"ok\xff\xfe",
                     op: int = 2, pad_byte: bytes = b"x") -> bytes:
    """A data frame of ``pad`` payload bytes, then a Close frame: one write. With pad=4078 the
    data frame takes 4 086 bytes (8 header, 126-form length), the Close header 6, its code
    bytes 4 092-4 093 and ``ok`` 4 094-4 095: the reason's ``\\xff\\xfe`` is the first thing in
    wslay's second 4 096-byte read, where wslay 1.1.1 restarts its check two bytes in. Other
    pads move the cut through the code, the reason and the header."""
    return frame(op, pad_byte * pad) + frame(8, struct.pack("!H", code) + reason)


# ---- attackers -------------------------------------------------------------------------------

def connect(port: int, path: str, timeout: float = 5) -> RawClient:
    c = RawClient(port, path, timeout=timeout)
    assert c.status == 101, c.head
    return c


def flood(socks: list[socket.socket], data: bytes | list[bytes], duration: float,
          stop: Callable[[], bool] = lambda: False, total: int | None = None) -> int:
    """Writes ``data`` (repeated, or each of a list once) to every socket as fast as they take
    it, for at most ``duration`` seconds or until ``stop()`` (asked every 50 ms) or until each
    socket took ``total`` bytes. One thread, non-blocking sockets. Returns the bytes written."""
    for s in socks:
        s.setblocking(False)
    chunks = data if isinstance(data, list) else None
    off = {s: 0 for s in socks}     # offset into the current chunk
    idx = {s: 0 for s in socks}     # index of the current chunk (list mode)
    sent = {s: 0 for s in socks}
    live = list(socks)
    deadline = time.monotonic() + duration
    written = 0
    checked = time.monotonic()
    while live and time.monotonic() < deadline:
        now = time.monotonic()
        if now - checked > 0.05:
            checked = now
            if stop():
                break
        try:
            _, w, _ = select.select([], live, [], 0.05)
        except (OSError, ValueError):
            break
        for s in w:
            buf = chunks[idx[s]] if chunks is not None else data
            try:
                n = s.send(memoryview(buf)[off[s]:])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                live.remove(s)
                continue
            written += n
            sent[s] += n
            off[s] += n
            if off[s] >= len(buf):
                off[s] = 0
                if chunks is not None:
                    idx[s] += 1
                    if idx[s] >= len(chunks):
                        live.remove(s)
                        continue
            if total is not None and sent[s] >= total:
                live.remove(s)
    for s in socks:
        try:
            s.setblocking(True)
        except OSError:
            pass
    return written


def read_close(c: RawClient, timeout: float = 5) -> tuple[int | None, bytes, str]:
    """Reads until the server's Close frame: (code, reason, how) where how is "close", "eof",
    "reset" or "timeout"; data and control frames before it are skipped."""
    c.sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            f = c.recv_frame()
            if f is None:
                return None, b"", "eof"
            if f[0] == 8:
                p = f[1]
                return (struct.unpack("!H", p[:2])[0] if len(p) >= 2 else None), p[2:], "close"
    except socket.timeout:
        return None, b"", "timeout"
    except OSError:
        return None, b"", "reset"
    return None, b"", "timeout"


class LiveClient(RawClient):
    """A client that answers every ping (a reader thread), keeps the data frames it receives
    and notes the server's Close frame. Sends go through one lock, so a pong never lands in
    the middle of a data frame."""

    def __init__(self, port: int, path: str, timeout: float = 10) -> None:
        super().__init__(port, path, timeout=timeout)
        assert self.status == 101, self.head
        self.lock = threading.Lock()
        self.data: queue.Queue[tuple[int, bytes]] = queue.Queue()
        self.pings = 0
        self.pongs = 0
        self.close_code: int | None = None
        self.closed_at: float | None = None
        self.eof = False
        self.sock.settimeout(None)
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def _run(self) -> None:
        try:
            while True:
                f = self.recv_frame()
                if f is None:
                    break
                op, payload, _ = f
                if op == 9:
                    self.pings += 1
                    with self.lock:
                        self.sock.sendall(frame(10, payload))
                elif op == 10:
                    self.pongs += 1
                elif op == 8:
                    self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    self.closed_at = time.monotonic()
                    try:
                        with self.lock:
                            self.sock.sendall(close_frame(self.close_code or 1000))
                    except OSError:
                        pass
                    break
                else:
                    self.data.put((op, payload))
        except OSError:
            pass
        self.eof = True

    def next_data(self, timeout: float) -> tuple[int, bytes] | None:
        try:
            return self.data.get(timeout=timeout)
        except queue.Empty:
            return None

    def join(self, timeout: float = 2) -> None:
        self._t.join(timeout)


class Bystander:
    """A well-behaved client of /echo in its own thread: sends a numbered text message every
    ``every`` seconds (pipelined: it does not wait for each echo), a reader counts the echoes.
    After ``stop()``: ``sent``, ``received`` (in order), ``worst`` latency."""

    def __init__(self, port: int, every: float = 0.005, limit: int = 100_000) -> None:
        self.c = LiveClient(port, "/echo")
        self.every = every
        self.limit = limit
        self.sent_at: dict[int, float] = {}
        self.latencies: list[float] = []
        self.out_of_order = 0
        self.received = 0
        self.sent = 0
        self._give_up = float("inf")
        self._stop = threading.Event()
        self._w = threading.Thread(target=self._write, daemon=True)
        self._r = threading.Thread(target=self._read, daemon=True)
        self._w.start()
        self._r.start()

    def _write(self) -> None:
        while not self._stop.is_set() and self.sent < self.limit:
            self.sent_at[self.sent] = time.monotonic()
            try:
                self.c.send(frame(1, f"by:{self.sent}".encode()))
            except OSError:
                return
            self.sent += 1
            self._stop.wait(self.every)

    def _read(self) -> None:
        expect = 0
        while True:
            f = self.c.next_data(0.2)
            if f is None:
                if self.c.eof or (self._stop.is_set() and self.received >= self.sent):
                    return
                if self._stop.is_set() and time.monotonic() > self._give_up:
                    return
                continue
            n = int(f[1].decode().split(":")[1])
            if n != expect:
                self.out_of_order += 1
            expect = n + 1
            self.received += 1
            self.latencies.append(time.monotonic() - self.sent_at.get(n, time.monotonic()))

    def stop(self, wait: float = 5.0) -> None:
        """Stops sending and waits up to ``wait`` seconds for the missing echoes."""
        self._give_up = time.monotonic() + wait
        self._stop.set()
        self._w.join(2)
        self._r.join(wait + 1)
        try:
            self.c.send(close_frame(1000))
        except OSError:
            pass
        self.c.join(2)
        self.c.close()

    @property
    def worst(self) -> float:
        return max(self.latencies) if self.latencies else float("inf")


def wait_for(pred: Callable[[], Any], timeout: float, every: float = 0.05) -> Any:
    """Polls pred() until it is truthy or timeout; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
        except OSError:
            v = None
        if v or time.monotonic() > deadline:
            return v
        time.sleep(every)


def dump(obj: Any) -> str:
    return json.dumps(obj, default=str, sort_keys=True)
