"""The C engine on its own (``_core.Engine``), driven with socket pairs: ordering, fan-out,
flow control, handles, shutdown, and no fd / thread / memory growth over many connections."""
from __future__ import annotations

import gc
import os
import select
import socket
import struct
import time
from typing import Any, Iterator

import pytest

from wsmanager import _core

pytestmark = pytest.mark.skipif(not hasattr(_core, "Engine"), reason="no native engine")

from tests.native_support import frame  # noqa: E402


@pytest.fixture
def engine() -> Iterator[Any]:
    e = _core.Engine(ping_interval=0, close_timeout=1.0)
    yield e
    e.shutdown()


def pair(engine: Any) -> tuple[int, socket.socket, socket.socket]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    h = engine.register(ours.fileno())
    peer.settimeout(5)
    return h, ours, peer


def events(engine: Any, want: int = 1, timeout: float = 5) -> list[tuple]:
    out: list[tuple] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        select.select([engine.fileno()], [], [], 0.1)
        out += engine.drain()
    return out


def read_frames(sock: socket.socket, n: int) -> list[tuple[int, bytes]]:
    buf, out = b"", []
    while len(out) < n:
        while True:
            if len(buf) >= 2:
                ln, off = buf[1] & 0x7F, 2
                if ln == 126 and len(buf) >= 4:
                    ln, off = struct.unpack("!H", buf[2:4])[0], 4
                elif ln == 127 and len(buf) >= 10:
                    ln, off = struct.unpack("!Q", buf[2:10])[0], 10
                if ln < 126 or off > 2:
                    if len(buf) >= off + ln:
                        out.append((buf[0] & 0x0F, buf[off:off + ln]))
                        buf = buf[off + ln:]
                        break
            chunk = sock.recv(1 << 20)
            assert chunk, "EOF"
            buf += chunk
    return out


def test_send_keeps_order_and_types(engine: Any) -> None:
    h, ours, peer = pair(engine)
    for i in range(100):
        assert engine.send(h, f"t{i}" if i % 2 else f"b{i}".encode())
    got = read_frames(peer, 100)
    assert got == [(1, f"t{i}".encode()) if i % 2 else (2, f"b{i}".encode()) for i in range(100)]
    big = os.urandom(200_000)
    assert engine.send(h, big)
    assert read_frames(peer, 1) == [(2, big)]


def test_inbound_messages_in_batches(engine: Any) -> None:
    h, ours, peer = pair(engine)
    peer.sendall(b"".join(frame(1, f"m{i}".encode()) for i in range(50)) + frame(2, b"\x00"))
    evs = events(engine, 51)
    assert [(k, p) for k, hh, p, n in evs if hh == h] == \
        [(_core.EV_TEXT, f"m{i}") for i in range(50)] + [(_core.EV_BINARY, b"\x00")]
    assert engine.stats()["messages_in"] >= 51


def test_fanout_one_frame_to_many(engine: Any) -> None:
    pairs = [pair(engine) for _ in range(200)]
    handles = [h for h, _, _ in pairs]
    assert engine.fanout(handles, "to all") == 200
    assert engine.fanout(handles[:10], b"\x01\x02") == 10
    for i, (h, ours, peer) in enumerate(pairs):
        want = [(1, b"to all")] + ([(2, b"\x01\x02")] if i < 10 else [])
        assert read_frames(peer, len(want)) == want
    assert engine.fanout([], "nobody") == 0


def test_fanout_accepts_targets(engine: Any) -> None:
    reg = _core.Registry()
    h, ours, peer = pair(engine)
    rh = reg.add("c1", "u1")
    reg.set_state(rh, _core.STATE_OPEN)
    reg.set_native(rh, h)
    targets = reg.resolve_all()
    assert targets.native_count == 1
    assert engine.fanout(targets, "via registry") == 1
    assert read_frames(peer, 1) == [(1, b"via registry")]


def test_close_handshake_and_stale_handle(engine: Any) -> None:
    h, ours, peer = pair(engine)
    assert engine.close(h, 4000, "done")
    assert not engine.send(h, "refused after close")
    assert read_frames(peer, 1) == [(8, struct.pack("!H", 4000) + b"done")]
    peer.sendall(frame(8, struct.pack("!H", 4000)))
    ev = events(engine)
    assert ev == [(_core.EV_DISCONNECT, h, (4000, "", "normal"), 0)]
    assert peer.recv(10) == b""  # the engine shut the socket down
    assert not engine.send(h, "gone")
    assert not engine.close(h)
    assert engine.fanout([h], "gone") == 0
    # once the engine let go of the fd (peer EOF ends its drain), the slot is reused with a new
    # generation: the old handle stays dead
    peer.close()
    time.sleep(0.2)
    h2, _, peer2 = pair(engine)
    assert h2 != h and (h2 & 0xFFFFFFFF) == (h & 0xFFFFFFFF)
    assert not engine.send(h, "still gone") and engine.send(h2, "new")
    assert read_frames(peer2, 1) == [(1, b"new")]


def test_peer_close_codes_1012_to_1014_accepted(engine: Any) -> None:
    for code in (1012, 1013, 1014):
        h, ours, peer = pair(engine)
        peer.sendall(frame(8, struct.pack("!H", code) + b"why"))
        assert read_frames(peer, 1) == [(8, struct.pack("!H", code) + b"why")]
        assert events(engine) == [(_core.EV_DISCONNECT, h, (code, "why", "normal"), 3)]


def test_read_backpressure(engine: Any) -> None:
    e = _core.Engine(ping_interval=0, read_limit=64 * 1024)
    try:
        h, ours, peer = pair(e)
        msg = frame(2, b"x" * 16384)
        peer.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # until the kernel buffers are full too
            try:
                peer.send(msg)
                sent += 1
            except BlockingIOError:
                time.sleep(0.005)
        evs = events(e, 1000, timeout=1)
        assert any(k == _core.EV_READ_PAUSED for k, *_ in evs)
        got = [n for k, hh, p, n in evs if k == _core.EV_BINARY]
        assert len(got) < sent  # reading stopped: the rest waits in the socket
        e.ack(h, sum(got))
        more = events(e, 1, timeout=2)
        assert any(k == _core.EV_BINARY for k, *_ in more)
    finally:
        e.shutdown()


def test_write_flow_control_events(engine: Any) -> None:
    e = _core.Engine(ping_interval=0, high_water=64 * 1024, max_queue_bytes=64 << 20, send_timeout=30)
    try:
        h, ours, peer = pair(e)
        for _ in range(100):
            e.send(h, b"y" * 65536)
        assert any(k == _core.EV_WRITE_PAUSED for k, *_ in events(e))
        assert e.stats()["queued_bytes"] > 0
        read_frames(peer, 100)
        assert any(k == _core.EV_WRITE_RESUMED for k, *_ in events(e))
    finally:
        e.shutdown()


def test_options_validation() -> None:
    with pytest.raises(ValueError):
        _core.Engine(max_message_size=0)
    with pytest.raises(TypeError):
        _core.Engine(bogus=1)
    e = _core.Engine(ping_interval=5, ping_timeout=2, max_message_size=1000)
    assert e.options["ping_interval"] == 5 and e.options["max_message_size"] == 1000
    e.shutdown()
    e.shutdown()  # idempotent
    with pytest.raises(RuntimeError):
        e.register(0)


def test_shutdown_sends_1012_and_joins(engine: Any) -> None:
    threads = len(os.listdir("/proc/self/task"))
    e = _core.Engine(ping_interval=0)
    assert len(os.listdir("/proc/self/task")) == threads + 1
    peers = []
    for _ in range(20):
        h, ours, peer = pair(e)
        peers.append((ours, peer))
    e.shutdown()
    assert len(os.listdir("/proc/self/task")) == threads
    for ours, peer in peers:
        assert read_frames(peer, 1) == [(8, struct.pack("!H", 1012))]
    assert not e.stats()["running"]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled_fds(timeout: float = 5.0) -> int:
    """The descriptor count once it has not changed for 0.3 s: a cleanly closed connection's fd
    lingers until the engine reads the peer's EOF, on the I/O thread, which a busy machine may
    not have run yet."""
    deadline = time.monotonic() + timeout
    last, since = _fds(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = _fds()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.3:
            break
    return last


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_no_fd_thread_or_memory_growth_over_10000_cycles() -> None:
    e = _core.Engine(ping_interval=0, close_timeout=1.0)
    try:
        def cycle(n: int) -> None:
            socks = [pair(e) for _ in range(n)]
            for i, (h, ours, peer) in enumerate(socks):
                if i % 2:
                    e.send(h, "x")
                    peer.close()  # abrupt
                else:
                    peer.sendall(frame(8, struct.pack("!H", 1000)))  # clean
            done = 0
            deadline = time.monotonic() + 20
            while done < n and time.monotonic() < deadline:
                select.select([e.fileno()], [], [], 0.2)
                done += sum(1 for k, *_ in e.drain() if k == _core.EV_DISCONNECT)
            assert done == n
            for h, ours, peer in socks:
                ours.close()
                peer.close()

        cycle(500)  # warm-up: slots, rings and buffers reach their working size
        gc.collect()
        fds, threads, rss = _settled_fds(), len(os.listdir("/proc/self/task")), _rss_kib()
        for _ in range(19):
            cycle(500)
        gc.collect()
        assert e.stats()["connections"] == 0
        assert _settled_fds() <= fds  # no growth (lingering fds of the last cycle drained)
        assert len(os.listdir("/proc/self/task")) == threads
        if "asan" not in os.environ.get("LD_PRELOAD", ""):  # ASan's quarantine holds freed memory
            assert _rss_kib() - rss < 8 * 1024, (rss, _rss_kib())
    finally:
        e.shutdown()


def test_engine_options_from_env_and_uvicorn_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from uvicorn.config import Config

    from wsmanager.uvicorn import engine_options

    cfg = Config(app="x:y", ws_ping_interval=7.0, ws_ping_timeout=3.0, ws_max_size=1000)
    assert engine_options(cfg) == {"ping_interval": 7.0, "ping_timeout": 3.0, "max_message_size": 1000}
    monkeypatch.setenv("WSMANAGER_PING_INTERVAL", "12.5")
    monkeypatch.setenv("WSMANAGER_MAX_QUEUE_BYTES", "4096")
    opts = engine_options(cfg, close_timeout=2.0)
    assert opts["ping_interval"] == 12.5 and opts["max_queue_bytes"] == 4096
    assert opts["close_timeout"] == 2.0 and opts["ping_timeout"] == 3.0
    monkeypatch.setenv("WSMANAGER_HIGH_WATER", "lots")
    with pytest.raises(ValueError, match="WSMANAGER_HIGH_WATER"):
        engine_options(cfg)


def _thread_sched() -> dict[str, int]:
    """The calling thread's scheduler fields from /proc (se.slice, policy, prio)."""
    fields = {}
    with open("/proc/thread-self/sched") as f:
        for line in f:
            name, sep, value = line.partition(":")
            if sep and name.strip() in ("se.slice", "policy", "prio"):
                fields[name.strip()] = int(float(value))
    return fields


def test_set_thread_slice_moves_only_the_calling_threads_slice() -> None:
    import threading

    main_before = _thread_sched()
    seen: dict[str, Any] = {}

    def worker() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)  # a nice value to keep
        default = _thread_sched()
        seen["got"] = _core.set_thread_slice(250_000)
        seen["short"] = _thread_sched()
        seen["clamped"] = _core.set_thread_slice(1)  # the kernel's floor is 0.1 ms
        seen["reset"] = _core.set_thread_slice(0)
        seen["default"], seen["after_reset"] = default, _thread_sched()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    if seen["got"]:  # Linux >= 6.12 (EEVDF custom slices)
        assert seen["got"] == 250_000 and seen["short"]["se.slice"] == 250_000
        assert seen["clamped"] == 100_000
        assert seen["after_reset"]["se.slice"] == seen["default"]["se.slice"] == seen["reset"]
    else:  # no per-thread slices: every call says so and nothing about the thread moves
        assert seen["clamped"] == seen["reset"] == 0
        assert seen["short"] == seen["after_reset"] == seen["default"]
    # policy and nice value written back unchanged; other threads untouched
    assert seen["short"]["policy"] == seen["default"]["policy"] == 0
    assert seen["short"]["prio"] == seen["default"]["prio"] and seen["nice"] == 5
    assert _thread_sched() == main_before


@pytest.mark.parametrize("bad, error", [(-1, ValueError), ("100", TypeError), (1.5, TypeError),
                                        (2**64, OverflowError)])
def test_set_thread_slice_rejects_bad_arguments(bad: Any, error: type) -> None:
    with pytest.raises(error):
        _core.set_thread_slice(bad)
