"""The engine's budgets and protocol floor on their own (``_core.Engine`` with socket pairs and
loopback TCP pairs): what a peer can make the engine hold, the Close frames and frame lengths
wslay 1.1.1 gets wrong, and liveness while reading is paused. The same attacks against a whole
server are in test_hostile.py."""
from __future__ import annotations

import socket
import struct
import time
from typing import Any, Iterator

import pytest

from wsmanager import _core

pytestmark = pytest.mark.skipif(not hasattr(_core, "Engine"), reason="no native engine")

from tests.native_support import frame  # noqa: E402
from tests.test_native_engine import events, pair, read_frames  # noqa: E402

KIB = 1024
MIB = 1024 * 1024


@pytest.fixture
def engines() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for e in made:
        e.shutdown()


def new_engine(engines: list[Any], **options: Any) -> Any:
    e = _core.Engine(**{"ping_interval": 0, "close_timeout": 1.0, **options})
    engines.append(e)
    return e


def tcp_pair(engine: Any) -> tuple[int, socket.socket, socket.socket]:
    """A loopback TCP connection: TCP_INFO (the liveness rule while paused) needs a real one."""
    lst = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(lst.getsockname())
    ours, _ = lst.accept()
    lst.close()
    ours.setblocking(False)
    h = engine.register(ours.fileno())
    ours.close()  # the engine holds its own duplicate
    peer.settimeout(5)
    return h, ours, peer


def flood(peer: socket.socket, data: bytes, seconds: float) -> int:
    """Writes data over and over for `seconds` (as much as the kernel takes); bytes sent."""
    peer.setblocking(False)
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sent += peer.send(data)
        except BlockingIOError:
            time.sleep(0.005)
    peer.settimeout(5)
    return sent


def close_of(peer: socket.socket, timeout: float = 5) -> tuple[int | None, bytes]:
    """The server's Close frame (skipping anything before it)."""
    peer.settimeout(timeout)
    buf = b""
    while True:
        chunk = peer.recv(65536)
        assert chunk, f"EOF before a Close frame; got {buf[-40:]!r}"
        buf += chunk
        i = buf.find(b"\x88")
        while i >= 0 and i + 2 <= len(buf):
            n = buf[i + 1] & 0x7F
            if n < 126 and len(buf) >= i + 2 + n:
                payload = buf[i + 2:i + 2 + n]
                return (struct.unpack("!H", payload[:2])[0] if n >= 2 else None), payload[2:]
            i = buf.find(b"\x88", i + 1)


# -- the inbound budget -------------------------------------------------------------------

def test_empty_messages_are_charged_and_reading_pauses(engines: list[Any]) -> None:
    """Zero-byte messages cost WSM_MSG_CHARGE each: an app that never reads stops the reading
    after about read_limit / charge of them, however many the peer sends."""
    limit = 64 * KIB
    e = new_engine(engines, read_limit=limit)
    h, ours, peer = pair(e)
    sent = flood(peer, frame(2, b"") * 4096, 1.0)
    evs = events(e, 10**9, timeout=0.5)  # drained, never acknowledged
    msgs = [ev for ev in evs if ev[0] == _core.EV_BINARY]
    charge = e.stats()["message_charge"]
    assert charge >= 64 and all(n == charge for _, _, _, n in msgs)
    assert any(ev[0] == _core.EV_READ_PAUSED for ev in evs)
    assert sent // 6 > 10 * len(msgs)  # most of the flood waits in the kernel, unread
    # the pause comes at the limit, plus at most what wslay's own 4 KiB buffer still held
    assert len(msgs) * charge <= limit + (4096 // 6 + 2) * charge
    st = e.stats()
    assert st["inbound_bytes"] <= st["inbound_bound"] and st["read_pauses"] == 1
    # acknowledging them resumes reading
    e.ack(h, sum(n for *_, n in msgs))
    assert any(ev[0] == _core.EV_BINARY for ev in events(e, 1, timeout=2))


def test_fragmented_message_costs_what_it_weighs(engines: list[Any]) -> None:
    """100 000 one-byte continuation frames: one buffer growing with the bytes (wslay buffered
    each fragment in three allocations before), max_message_size checked as they arrive."""
    e = new_engine(engines, max_message_size=256 * KIB)
    h, ours, peer = pair(e)
    n = 100_000
    peer.sendall(frame(2, b"a", fin=False) + b"".join(frame(0, b"b", fin=False) for _ in range(n)))
    time.sleep(0.3)
    held = e.stats()["inbound_bytes"]
    assert n < held <= 1.5 * n + 4 * KIB  # the reassembly buffer's capacity, nothing per fragment
    peer.sendall(frame(0, b"c"))
    (kind, hh, payload, nbytes), = events(e, 1)
    assert kind == _core.EV_BINARY and payload == b"a" + b"b" * n + b"c"
    assert nbytes == len(payload) + e.stats()["message_charge"]
    # the next message crosses max_message_size in its 3rd fragment: 1009 before it is whole
    chunk = b"x" * (100 * KIB)
    peer.sendall(frame(2, chunk, fin=False) + frame(0, chunk, fin=False) + frame(0, chunk))
    assert close_of(peer) == (1009, b"message too big")
    assert [ev[2] for ev in events(e, 1) if ev[0] == _core.EV_DISCONNECT] == [(1009, "", "protocol_error")]


def test_single_frame_just_under_and_over_the_limit(engines: list[Any]) -> None:
    e = new_engine(engines, max_message_size=100_000)
    h, ours, peer = pair(e)
    peer.sendall(frame(2, b"y" * 100_000))
    assert events(e, 1)[0][2] == b"y" * 100_000
    peer.sendall(frame(2, b"y" * 100_001))
    assert close_of(peer)[0] == 1009


def test_a_claimed_length_allocates_nothing(engines: list[Any]) -> None:
    """A header may claim 16 MiB and send one byte: the buffer grows with what arrives."""
    e = new_engine(engines)
    conns = [pair(e) for _ in range(50)]
    for h, ours, peer in conns:
        peer.sendall(struct.pack("!BBQ", 0x82, 0xFF, 16 * MIB - 1) + b"\x00" * 4 + b"z")
    time.sleep(0.3)
    assert e.stats()["inbound_bytes"] <= 50 * 2 * KIB


def test_event_queue_is_bounded_for_the_process(engines: list[Any]) -> None:
    """Many connections at once, a loop that does not drain: the I/O thread stops reading
    everybody at event_queue_limit and starts again once the loop drained."""
    limit = 256 * KIB
    e = new_engine(engines, event_queue_limit=limit, read_limit=4 * MIB)
    conns = [tcp_pair(e) for _ in range(20)]
    msg = frame(2, b"q" * 1000) * 64
    rounds = 2  # 20 x 128 KiB: fits the socket buffers, 10x the limit
    for _ in range(rounds):
        for h, ours, peer in conns:
            peer.sendall(msg)
    time.sleep(0.5)
    st = e.stats()
    assert st["event_queue_pauses"] >= 1
    assert limit < st["event_queue_bytes"] <= limit + 64 * KIB  # one more read's worth at most
    got = 0
    deadline = time.monotonic() + 10
    while got < rounds * 20 * 64 and time.monotonic() < deadline:
        evs = e.drain()
        got += sum(1 for ev in evs if ev[0] == _core.EV_BINARY)
        for h, *_ in conns:  # the app keeps up
            e.ack(h, 1 << 40)
        time.sleep(0.01)
    assert got == rounds * 20 * 64  # nothing lost while reading was stopped
    assert e.stats()["event_queue_bytes"] == 0


# -- Close frames and lengths: the floor wslay 1.1.1 misses ---------------------------------

@pytest.mark.parametrize("payload, code", [
    (struct.pack("!H", 1000) + b"ab\xff\xfe", 1007),        # invalid UTF-8 reason
    (struct.pack("!H", 1000) + b"\xed\xa0\x80", 1007),      # a surrogate
    (struct.pack("!H", 1000) + b"\xc3", 1007),              # truncated sequence
    (struct.pack("!H", 999), 1002), (struct.pack("!H", 1005), 1002),
    (struct.pack("!H", 1015), 1002), (struct.pack("!H", 2999), 1002), (struct.pack("!H", 5000), 1002),
    (b"\x03", 1002),                                         # one byte: half a code
])
def test_bad_close_frames(engines: list[Any], payload: bytes, code: int) -> None:
    e = new_engine(engines)
    h, ours, peer = pair(e)
    peer.sendall(frame(8, payload))
    assert close_of(peer)[0] == code
    (ev,) = [ev for ev in events(e, 1) if ev[0] == _core.EV_DISCONNECT]
    assert ev[2][0] == code and ev[2][2] == "protocol_error"


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 5, 8, 11])
def test_close_reason_straddling_wslays_buffer(engines: list[Any], cut: int) -> None:
    """A binary frame of 4 078 bytes then a Close whose reason is invalid, one write: the Close
    straddles wslay's 4 096-byte read buffer. Sent whole and split at every point."""
    e = new_engine(engines)
    h, ours, peer = pair(e)
    close = frame(8, struct.pack("!H", 1000) + b"ab\xff\xfe")
    data = frame(2, b"x" * 4078) + close
    split = len(data) - len(close) + cut
    peer.sendall(data[:split])
    time.sleep(0.05)
    peer.sendall(data[split:])
    assert close_of(peer)[0] == 1007
    evs = events(e, 2)
    assert [ev[0] for ev in evs] == [_core.EV_BINARY, _core.EV_DISCONNECT]
    assert evs[1][2] == (1007, "", "protocol_error")


def test_valid_close_with_reason_straddling_is_echoed(engines: list[Any]) -> None:
    e = new_engine(engines)
    h, ours, peer = pair(e)
    reason = "fermé ✓".encode()
    peer.sendall(frame(2, b"x" * 4078) + frame(8, struct.pack("!H", 4001) + reason))
    assert close_of(peer) == (4001, reason)
    evs = events(e, 2)
    assert evs[-1][2] == (4001, "fermé ✓", "normal")


def test_close_without_code_is_answered_without_code(engines: list[Any]) -> None:
    e = new_engine(engines)
    h, ours, peer = pair(e)
    peer.sendall(frame(8, b""))
    assert close_of(peer) == (None, b"")
    assert events(e, 1)[0][2] == (1005, "", "normal")


@pytest.mark.parametrize("header", [
    struct.pack("!BBQ", 0x82, 0xFF, 1 << 63),          # top bit of a 64-bit length
    struct.pack("!BBQ", 0x82, 0xFF, 65535),            # 64-bit encoding of a 16-bit length
    struct.pack("!BBQ", 0x82, 0xFF, 5),
    struct.pack("!BBH", 0x82, 0xFE, 125),              # 16-bit encoding of a 7-bit length
    struct.pack("!BB", 0x89, 0xFE) + b"\x00\x7e",      # a ping longer than 125
    struct.pack("!BB", 0x09, 0x80),                    # a fragmented ping
])
def test_bad_lengths_close_with_1002(engines: list[Any], header: bytes) -> None:
    e = new_engine(engines)
    h, ours, peer = pair(e)
    peer.sendall(header)
    assert close_of(peer) == (1002, b"protocol error")


def test_disconnect_reason_can_never_break_drain(engines: list[Any]) -> None:
    """Many connections close at once, some with invalid reasons: every event of the batch is
    delivered and decodes (the batch used to fail whole with UnicodeDecodeError)."""
    e = new_engine(engines)
    conns = [pair(e) for _ in range(40)]
    for i, (h, ours, peer) in enumerate(conns):
        reason = b"\xff\xfe" if i % 2 else "ok ✓".encode()
        peer.sendall(frame(2, f"m{i}".encode()) + frame(8, struct.pack("!H", 1000) + reason))
    evs = events(e, 80)
    assert sum(1 for ev in evs if ev[0] == _core.EV_BINARY) == 40
    codes = sorted(ev[2][0] for ev in evs if ev[0] == _core.EV_DISCONNECT)
    assert codes == [1000] * 20 + [1007] * 20


# -- liveness while reading is paused --------------------------------------------------------

def test_paused_reader_with_live_peer_is_not_stale(engines: list[Any]) -> None:
    """The app is behind, reading paused, the peer's pongs wait unread in the socket: the peer's
    kernel acknowledging the pings keeps it alive past ping_interval + ping_timeout."""
    e = new_engine(engines, ping_interval=0.3, ping_timeout=0.3, read_limit=16 * KIB)
    h, ours, peer = tcp_pair(e)
    peer.sendall(frame(2, b"p" * 4000) * 20)
    evs = events(e, 10**9, timeout=0.3)
    assert any(ev[0] == _core.EV_READ_PAUSED for ev in evs)
    time.sleep(2.0)  # > 3 x (ping_interval + ping_timeout), never acknowledged
    assert not [ev for ev in events(e, 1, timeout=0.2) if ev[0] == _core.EV_DISCONNECT]
    assert e.stats()["pings_sent"] >= 2 and e.stats()["disconnects"]["stale"] == 0
    # once the app catches up, every message arrives
    got = sum(1 for ev in evs if ev[0] == _core.EV_BINARY)
    e.ack(h, 1 << 40)
    deadline = time.monotonic() + 5
    while got < 20 and time.monotonic() < deadline:
        evs = events(e, 1, timeout=0.2)
        got += sum(1 for ev in evs if ev[0] == _core.EV_BINARY)
        e.ack(h, 1 << 40)
    assert got == 20


def test_silent_peer_is_still_stale(engines: list[Any]) -> None:
    """Not paused, the peer reads nothing and answers no ping: stale as before."""
    e = new_engine(engines, ping_interval=0.2, ping_timeout=0.2)
    h, ours, peer = tcp_pair(e)
    (ev,) = [ev for ev in events(e, 1, timeout=3) if ev[0] == _core.EV_DISCONNECT]
    assert ev[2] == (1011, "", "stale")


def test_ping_flood_without_reading_is_a_slow_consumer(engines: list[Any]) -> None:
    """Pings whose pongs are never read: the pongs count against max_queue_bytes."""
    e = new_engine(engines, max_queue_bytes=64 * KIB, high_water=16 * KIB, send_timeout=0.5)
    h, ours, peer = tcp_pair(e)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ping = frame(9, b"P" * 125)
    deadline = time.monotonic() + 10
    gone = False
    peer.setblocking(False)
    while time.monotonic() < deadline and not gone:
        try:
            peer.send(ping * 64)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            time.sleep(0.01)
        gone = any(ev[0] == _core.EV_DISCONNECT for ev in e.drain())
    assert gone
    assert e.stats()["disconnects"]["slow_consumer"] == 1
    assert e.stats()["queued_bytes"] == 0


# -- containment ---------------------------------------------------------------------------

def test_a_failing_event_closes_only_its_own_connection(engines: list[Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatcher delivers the rest of the batch, closes the connection whose event failed
    (1011) and tells its app it is gone, so the manager unregisters it."""
    import asyncio
    import logging

    from wsmanager import uvicorn as native

    monkeypatch.setattr(native, "LOOP_SLICE_US", 0)  # leave this thread's scheduler slice alone
    e = new_engine(engines)
    (hb, _, peer_b), (hg, _, peer_g) = pair(e), pair(e)
    seen: dict[str, list[Any]] = {"good": [], "released": []}

    class Good:
        def engine_event(self, kind: int, payload: Any, nbytes: int) -> None:
            seen["good"].append(payload)

    class Bad(Good):
        def engine_event(self, kind: int, payload: Any, nbytes: int) -> None:
            raise RuntimeError("boom")

        def released_by_engine(self, code: int, reason: str, why: str) -> None:
            seen["released"].append((code, why))

    loop = asyncio.new_event_loop()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("wsmanager").addHandler(handler)
    try:
        d = native._Dispatcher(e, loop)
        d.protocols = {hb: Bad(), hg: Good()}  # type: ignore[dict-item]
        for i in range(5):
            peer_b.sendall(frame(1, f"b{i}".encode()))
            peer_g.sendall(frame(1, f"g{i}".encode()))
        deadline = time.monotonic() + 5
        while len(seen["good"]) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
            d.on_events()
        d.close()
    finally:
        loop.close()
        logging.getLogger("wsmanager").removeHandler(handler)
    assert seen["good"] == [f"g{i}" for i in range(5)]
    assert seen["released"] == [(1011, "abrupt")]
    assert close_of(peer_b) == (1011, b"internal error")
    assert [r.levelname for r in records].count("ERROR") >= 1
