"""A hostile peer against the two newest features -- detached connections (``serve()``) and
lifecycle hooks -- on a real native server (``python -m wsmanager
tests.hostile_detached_app:app``, 127.0.0.1), in tests/test_hostile.py's house style: each test
is one attack, bounded in time and in what it sends, records its figures (``FIGURES {...}``,
and ``HOSTILE_FIGURES``) before it asserts a named bound.

The bounds, beside tests/test_hostile.py's (``RSS_BOUND_MIB``, ``INBOUND_BOUND``,
``HTTP_BOUND``, ``BYSTANDER_BOUND``, ``SHUTDOWN_BOUND``, with its limits and its fixtures):

* ``LEFTOVERS``: once the peers are gone (and a hung handler released), Python holds nothing of
  them -- no manager record (``_conns``, registry row, ``_Detached`` object), no dispatcher
  routing entry (``protocols``), no ``_DetachedGroup.handles`` entry (and no group left in
  uvicorn's connection set), no handler run, no background task, no lane, no hook event waiting.
* ``GONE_BACKLOG``: a connection the manager dropped holds no backlog: its messages would
  never reach the handler (``take()`` skips them), and the engine stopped charging them.
* ``LANE_BOUND``: a connection's pending backend calls (its lane) are at most one per channel
  it changed, however fast it joins and leaves.
* ``LOG_BOUND``: a handler failing on every message logs one traceback for the connection.
* ``hook_queue_limit``: events waiting for slow hooks never exceed it; the rest are counted.
"""
from __future__ import annotations

import json
import signal
import socket
import struct
import threading
import time
from typing import Any

import pytest
from fastapi import WebSocket

pytest.importorskip("wsmanager.uvicorn")

from tests.hostile_support import (  # noqa: E402
    KiB, MiB, HostileServer, HttpProbe, LiveClient, RssSampler, connect, flood, read_close,
    wait_for, zframe,
)
from tests.test_hostile import (  # noqa: E402,F401 - figures and serve: the fixtures
    BYSTANDER_BOUND, HTTP_BOUND, INBOUND_BOUND, RSS_BOUND_MIB, SHUTDOWN_BOUND, assert_rss,
    exited_cleanly, figures, serve,
)

APP_PATH = "tests.hostile_detached_app:app"
WARM = "/d/echo"
LOG_BOUND = 4 * KiB  # one traceback, whatever the number of failures
LANE_BOUND = 8  # the flood below changes 4 channels: one pending call each, and slack


# ---- helpers ----------------------------------------------------------------------------------

def text(payload: Any) -> bytes:
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return zframe(1, data.encode() if isinstance(data, str) else data)


def reset(c: Any) -> None:
    """The peer vanishes: a TCP reset, no Close frame."""
    sock = c.sock if hasattr(c, "sock") else c
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def bye(c: Any) -> None:
    """Leaves: a Close frame, then shutdown (which also wakes a LiveClient's reader thread:
    a bare close() under a thread blocked in recv() sends no FIN on Linux)."""
    try:
        c.sock.sendall(zframe(8, struct.pack("!H", 1000)))
        c.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    c.close()


def drain(c: Any, timeout: float) -> tuple[bytes, str]:
    """Reads a raw socket to its end, fast (no framing): its last bytes and how it ended,
    "eof", "reset" or "timeout"."""
    c.sock.settimeout(timeout)
    tail = c.buf
    try:
        while chunk := c.sock.recv(1 << 20):
            tail = (tail + chunk)[-256:]
        how = "eof"
    except socket.timeout:
        how = "timeout"
    except OSError:
        how = "reset"
    c.close()
    return tail, how


def closing_code(tail: bytes) -> int | None:
    """The code of the server's Close frame at the end of ``tail`` (unmasked, reason < 126)."""
    for i in range(len(tail) - 4, -1, -1):
        if tail[i] == 0x88 and tail[i + 1] < 126 and i + 2 + tail[i + 1] == len(tail):
            return struct.unpack("!H", tail[i + 2:i + 4])[0] if tail[i + 1] >= 2 else None
    return None


def look(s: HostileServer) -> dict[str, Any]:
    return s.get("/introspect")


def settled(s: HostileServer, timeout: float = 5.0, **expected: Any) -> dict[str, Any]:
    """/introspect once every ``expected`` figure has its value (or the last look at timeout)."""
    last: dict[str, Any] = {}

    def ok() -> bool:
        nonlocal last
        last = look(s)
        return all(last.get(k) == v for k, v in expected.items())

    wait_for(ok, timeout, every=0.1)
    return last


#: Nothing of the peers left in Python (``LEFTOVERS``), with ``n`` connections still open.
def leftovers(n: int = 0) -> dict[str, Any]:
    return {"conns": n, "registry": n, "records": n, "protocols": n, "group_handles": n,
            "groups_in_connections": int(n > 0), "running": 0, "tasks": 0, "lanes": 0,
            "lane_items": 0, "gone_backlog_items": 0}


def assert_no_leftovers(st: dict[str, Any], n: int = 0) -> None:
    want = leftovers(n)
    got = {k: st.get(k) for k in want}
    assert got == want, f"left over after the peers: {got}"
    assert st["hooks"]["waiting"] == 0, st["hooks"]


class Pinger:
    """A well-behaved detached client (``/d/raw``: its text comes back as sent) in a thread:
    one numbered message every ``every`` s, each echo's latency measured."""

    def __init__(self, port: int, every: float = 0.01) -> None:
        self.c = LiveClient(port, "/d/raw")
        self.every = every
        self.latencies: list[float] = []
        self.sent = 0
        self.out_of_order = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        expect = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.c.send(text(f"by:{self.sent}"))
            except OSError:
                return
            self.sent += 1
            got = self.c.next_data(BYSTANDER_BOUND * 2)
            if got is None:
                self.latencies.append(float("inf"))
                return
            n = int(got[1].decode().split(":")[1])
            self.out_of_order += n != expect
            expect = n + 1
            self.latencies.append(time.monotonic() - t0)
            self._stop.wait(self.every)

    def stop(self) -> float:
        self._stop.set()
        self._t.join(BYSTANDER_BOUND * 2 + 1)
        bye(self.c)
        return max(self.latencies) if self.latencies else float("inf")


# ---- a handler that never returns: the backlog --------------------------------------------------

@pytest.mark.parametrize("size", [0, 64 * KiB], ids=["empty", "64KiB"])
def test_a_peer_that_outruns_a_handler_that_never_returns(serve, figures, size: int) -> None:
    """The first message hangs the handler (``/d/hang``); the peer then floods binary messages
    for 2 s. They wait in the connection's backlog, unacknowledged, so the engine stops reading
    at read_limit: INBOUND_BOUND, RSS_BOUND_MIB(1), HTTP_BOUND, and a bystander's echoes within
    BYSTANDER_BOUND, in order. Then the peer resets mid-handler: the engine keeps the connection
    (parked: what it read is still owed to the handler) and still charges it; once the handler
    is released, the backlog is handled, the reset found (``abrupt``) and LEFTOVERS."""
    s = serve(APP_PATH, WARM)
    rss = RssSampler(s.pid)
    probe = HttpProbe(s.port)
    by = Pinger(s.port)
    c = connect(s.port, "/d/hang")
    c.send(text({"first": 1}))
    chunk = zframe(2, b"x" * size) * max(1, 60_000 // (size + 6))
    written = flood([c.sock], chunk, 2.0)
    during = rss.growth_mib()
    st = look(s)
    reset(c)
    time.sleep(0.5)
    parked = look(s)
    s.post("/release")
    end = settled(s, **leftovers(1))
    worst = by.stop()
    http = probe.stop()
    rss.stop()
    figures.update(wire_mib=round(written / MiB, 1), rss_growth_mib=round(during, 1),
                   http_worst_s=round(http, 3), bystander_worst_s=round(worst, 3),
                   bystander_sent=by.sent, inbound_bytes=st["engine"]["inbound_bytes"],
                   read_pauses=st["engine"]["read_pauses"], backlog_items=st["backlog_items"],
                   parked_inbound_bytes=parked["engine"]["inbound_bytes"],
                   bound_mib=RSS_BOUND_MIB(1))
    assert st["engine"]["inbound_bytes"] <= INBOUND_BOUND, st["engine"]
    assert st["engine"]["read_pauses"] >= 1
    assert st["running"] == 1 and st["backlog_items"] > 0
    assert_rss(during, 1, "during the flood")
    assert http <= HTTP_BOUND, f"HTTP took {http:.2f} s"
    assert worst <= BYSTANDER_BOUND and by.out_of_order == 0, (worst, by.out_of_order)
    assert parked["conns"] == 2 and parked["engine"]["inbound_bytes"] <= INBOUND_BOUND, parked
    assert_no_leftovers(end, 1)
    assert end["disconnects"].get("abrupt") == 1, end["disconnects"]


def test_churn_of_peers_that_fill_a_hung_handlers_backlog_and_vanish(serve, figures) -> None:
    """40 peers, one after the other, each hangs its handler and fills its backlog, then
    vanishes: 20 reset after 192 KiB (under read_limit: the engine sees the reset at once),
    20 after 1 MiB (reading paused: parked until the keepalive, 0.5 s + 0.5 s, ends them).
    With every handler still hung, GONE_BACKLOG -- without it each gone peer would keep up to
    read_limit held in Python that the engine no longer charges, 40 x that in all -- and the
    engine charges nothing; after the release, LEFTOVERS."""
    n = 40
    s = serve(APP_PATH, WARM, WSMANAGER_PING_INTERVAL="0.5", WSMANAGER_PING_TIMEOUT="0.5")
    rss = RssSampler(s.pid)
    message = zframe(2, b"y" * (64 * KiB))
    for i in range(n):
        c = connect(s.port, "/d/hang")
        c.send(text({"first": 1}))
        frames = message * (3 if i % 2 else 16)
        flood([c.sock], frames, 0.5, total=len(frames))
        reset(c)
    st = settled(s, timeout=6, conns=0, running=n, gone_backlog_items=0)
    growth = rss.growth_mib()
    s.post("/release")
    end = settled(s, **leftovers(0))
    rss.stop()
    figures.update(peers=n, rss_growth_mib=round(growth, 1), conns=st["conns"],
                   running=st["running"], gone_backlog_items=st["gone_backlog_items"],
                   gone_backlog_mib=round(st["gone_backlog_bytes"] / MiB, 1),
                   inbound_bytes=st["engine"]["inbound_bytes"], disconnects=end["disconnects"],
                   bound_mib=RSS_BOUND_MIB(1))
    assert st["conns"] == 0 and st["running"] == n, st
    assert st["gone_backlog_items"] == 0, \
        f"GONE_BACKLOG: {st['gone_backlog_bytes'] / MiB:.1f} MiB held for {n} gone peers"
    assert st["engine"]["inbound_bytes"] == 0, st["engine"]
    assert_rss(growth, 1, "after the churn")
    assert_no_leftovers(end)


# ---- what a peer sends that is not what the handler wants -------------------------------------

def test_invalid_json_deep_json_and_binary_frames(serve, figures) -> None:
    """Binary frames reach a JSON handler as bytes (no close); a text frame that is not JSON,
    and one nested deeper than the decoder recurses (``[`` x 100 000, within
    max_message_size), close with 1007 ``invalid JSON`` -- inline, and from the backlog of a
    hung handler -- never 1011 with a traceback; the others are untouched."""
    s = serve(APP_PATH, WARM)
    by = LiveClient(s.port, "/d/echo")
    results: dict[str, Any] = {}
    binary = LiveClient(s.port, "/d/echo")
    binary.send(zframe(2, b"\x00\xff\x01"))
    results["binary_echo"] = binary.next_data(5)
    for name, payload in (("not_json", "not json"), ("deep", "[" * 100_000),
                          ("deep_object", '{"a":' * 100_000)):
        c = connect(s.port, "/d/echo")
        c.send(text(payload))
        results[name] = read_close(c, 5)
        c.close()
    hung = connect(s.port, "/d/hang")
    hung.send(text({"first": 1}) + text("[" * 100_000) + text({"never": "handled"}))
    wait_for(lambda: look(s)["backlog_items"] >= 2, 5)
    s.post("/release")
    results["deep_in_backlog"] = read_close(hung, 5)
    hung.close()
    by.send(text({"still": "here"}))
    results["bystander"] = by.next_data(5)
    bye(binary)
    bye(by)
    end = settled(s, **leftovers(0))
    problems = s.log_problems()
    figures.update({k: (v[0], v[2]) if isinstance(v, tuple) and len(v) == 3 else repr(v)
                    for k, v in results.items()}, log_problems=len(problems))
    assert results["binary_echo"] == (2, b"\x00\xff\x01")
    for name in ("not_json", "deep", "deep_object", "deep_in_backlog"):
        code, reason, how = results[name]
        assert (code, reason, how) == (1007, b"invalid JSON", "close"), (name, results[name])
    assert results["bystander"] == (1, b'{"still":"here"}')
    assert not problems, problems[:5]
    assert end["disconnects"].get("protocol_error") == 4, end["disconnects"]
    assert_no_leftovers(end)


def test_a_handler_that_raises_on_every_message(serve, figures) -> None:
    """2 s of 8-byte JSON messages to a handler that raises on each (``/d/boom``): each failure
    is contained (the connection stays, its JSON ping is answered), HTTP_BOUND, a bystander
    within BYSTANDER_BOUND, RSS_BOUND_MIB(1), and LOG_BOUND: one traceback at ERROR for the
    connection, not one per message (that was ~370 bytes of log per 8 bytes on the wire, at
    the loop's full speed: 17 MB in a few seconds, the pong 10 s late)."""
    s = serve(APP_PATH, WARM)
    log_before = s.log_path.stat().st_size
    rss = RssSampler(s.pid)
    probe = HttpProbe(s.port)
    by = Pinger(s.port)
    c = connect(s.port, "/d/boom")
    msg = text({})
    written = flood([c.sock], msg * 4096, 2.0)
    c.send(text({"type": "ping"}))
    c.sock.settimeout(10)
    pong = None
    while pong is None:
        f = c.recv_frame()
        if f is None:
            break
        if f[0] == 1 and json.loads(f[1]) == {"type": "pong"}:
            pong = f[1]
    worst = by.stop()
    http = probe.stop()
    growth = rss.growth_mib()
    rss.stop()
    st = look(s)
    c.close()
    sent = written // len(msg)
    log_growth = s.log_path.stat().st_size - log_before
    with open(s.log_path, errors="replace") as f:
        f.seek(log_before)
        logged = f.read().count("message handler on_boom failed on connection")
    figures.update(messages=sent, log_bytes_per_message=round(log_growth / max(sent, 1), 1),
                   log_kib=round(log_growth / KiB, 1), failures_logged=logged,
                   http_worst_s=round(http, 3),
                   bystander_worst_s=round(worst, 3), rss_growth_mib=round(growth, 1))
    assert pong is not None, "the connection did not survive its handler's failures"
    assert logged == 1 and log_growth <= LOG_BOUND, f"LOG_BOUND: {logged} tracebacks, {log_growth} bytes"
    assert st["conns"] == 1  # it, the bystander gone
    assert http <= HTTP_BOUND, f"HTTP took {http:.2f} s"
    assert worst <= BYSTANDER_BOUND, worst
    assert_rss(growth, 1, "during the failures")


# ---- hooks: connection churn ----------------------------------------------------------------

def test_connect_disconnect_churn_with_slow_hooks(serve, figures) -> None:
    """400 detached connections come and go (half of them vanish with a reset) while every
    hook takes 50 ms: hook_queue_limit (50) bounds the events waiting, the rest are dropped and
    counted; after the churn, LEFTOVERS once the hooks caught up."""
    limit, n = 50, 400
    s = serve(APP_PATH, WARM, HOOK_DELAY="0.05", WSMANAGER_HOOK_QUEUE_LIMIT=str(limit))
    rss = RssSampler(s.pid)
    peak = 0
    for i in range(n):
        c = connect(s.port, "/d/echo")
        if i % 2:
            reset(c)
        else:
            c.send(zframe(8, struct.pack("!H", 1000)))
            c.close()
        if i % 50 == 0:
            peak = max(peak, look(s)["hooks"]["waiting"])
    mid = look(s)
    end = settled(s, timeout=8, **leftovers(0))
    rss.stop()
    figures.update(connections=n, waiting_peak=max(peak, mid["hooks"]["waiting"]),
                   dropped=end["hooks"]["dropped"], hook_calls=end["hook_calls"],
                   rss_growth_mib=round(rss.growth_mib(), 1))
    assert max(peak, mid["hooks"]["waiting"]) <= limit
    assert end["hooks"]["dropped"] > 0
    assert end["hook_calls"] + end["hooks"]["dropped"] == 2 * n + 2  # warm-up's connect+disconnect
    assert_no_leftovers(end)
    assert_rss(rss.growth_mib(), 1, "during the churn")


# ---- per-connection lanes: a peer that joins and leaves fast ---------------------------------

def test_join_leave_flood_through_per_connection_lanes(serve, figures) -> None:
    """A peer joins and leaves 4 channels in turn as fast as it can for 2 s (``/d/cmd``, a sync
    handler: nothing waits, every message is acknowledged at once) while the backend takes
    1 ms per call: LANE_BOUND (its pending backend calls stay one per channel) and
    RSS_BOUND_MIB(1); after it leaves, presence is empty and LEFTOVERS."""
    s = serve(APP_PATH, WARM, SLOW_BACKEND="0.001")
    rss = RssSampler(s.pid)
    c = connect(s.port, "/d/cmd?cid=joiner")
    burst = b"".join(text({"j": f"ch{i}"}) + text({"l": f"ch{i}"}) for i in range(4)) * 512
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(look(s)["lane_items"])
            stop.wait(0.25)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    written = flood([c.sock], burst, 2.0)
    stop.set()
    t.join(5)
    c.send(text({"j": "last"}))
    settled(s, presence={"last": ["joiner"]}, lane_items=0)
    c.send(zframe(8, struct.pack("!H", 1000)))
    c.close()
    end = settled(s, timeout=8, presence={}, **leftovers(0))
    rss.stop()
    figures.update(messages=written // len(text({"j": "ch0"})), lane_peak=max(samples, default=0),
                   lane_samples=samples[:12], backend_calls=end["backend_calls"],
                   rss_growth_mib=round(rss.growth_mib(), 1))
    assert max(samples, default=0) <= LANE_BOUND, f"LANE_BOUND: {max(samples)} pending"
    assert end["presence"] == {}, end["presence"]
    assert_no_leftovers(end)
    assert_rss(rss.growth_mib(), 1, "during the flood")


def test_join_from_a_thread_reaches_the_backend(serve, figures) -> None:
    """``join()`` from a plain ``def`` route (the hooks' docs name the case) with a backend that
    spans processes: the backend hears of it, in order with the connection's release."""
    s = serve(APP_PATH, WARM, SLOW_BACKEND="0.001")
    c = connect(s.port, "/d/cmd?cid=t1")
    answers = [s.post("/join", {"cid": "t1", "channel": ch}) for ch in ("a", "b")]
    present = settled(s, presence={"a": ["t1"], "b": ["t1"]})
    c.send(zframe(8, struct.pack("!H", 1000)))
    c.close()
    end = settled(s, presence={}, **leftovers(0))
    figures.update(answers=answers, presence=present["presence"])
    assert answers == [{"changed": True}] * 2
    assert present["presence"] == {"a": ["t1"], "b": ["t1"]}
    assert_no_leftovers(end)


# ---- the server's shutdown -------------------------------------------------------------------

def test_shutdown_with_many_detached_connections(serve, figures) -> None:
    """300 detached connections -- 100 with a hung handler and a backlog, 200 idle -- then
    SIGTERM: the server exits on its own within SHUTDOWN_BOUND, every peer gets a Close frame
    with the shutdown code (1012 from uvicorn's shutdown, or 1001 from the lifespan's stop()),
    and nothing is logged as uncontained."""
    s = serve(APP_PATH, WARM)
    clients = []
    for i in range(300):
        c = connect(s.port, "/d/hang" if i % 3 == 0 else "/d/echo")
        if i % 3 == 0:
            c.send(text({"first": 1}) + text({"second": 2}) * 3)
        clients.append(c)
    st = settled(s, conns=300)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    codes: dict[Any, int] = {}
    for c in clients:
        code, _, how = read_close(c, SHUTDOWN_BOUND + 2)
        codes[code if how == "close" else how] = codes.get(code if how == "close" else how, 0) + 1
        c.close()
    try:
        rc = s.proc.wait(SHUTDOWN_BOUND + 5)
    except Exception:  # noqa: BLE001 - recorded: it did not stop on its own
        rc = None
    secs = time.monotonic() - t0
    problems = s.log_problems()
    figures.update(connections=len(clients), running=st["running"], codes=codes,
                   stop_secs=round(secs, 2), rc=rc, log_problems=problems[:3])
    assert st["running"] == 100
    assert exited_cleanly(rc, signal.SIGTERM), rc
    assert secs <= SHUTDOWN_BOUND, secs
    assert set(codes) <= {1012, 1001} and sum(codes.values()) == 300, codes
    assert not problems, problems[:5]


# ---- the manager's own answers: a peer that sends pings and never reads ------------------------

def test_json_pings_from_a_peer_that_never_reads(serve, figures) -> None:
    """2 s of ``{"type": "ping"}`` to a detached connection whose peer never reads: each is
    answered by the manager (a pong, queued to the engine) with no backpressure from the
    handler, so the pongs pile up on the peer's side. Bounds: RSS_BOUND_MIB(1), HTTP_BOUND, a
    bystander within BYSTANDER_BOUND, the peer ended as a slow consumer, then LEFTOVERS."""
    s = serve(APP_PATH, WARM)
    rss = RssSampler(s.pid)
    probe = HttpProbe(s.port)
    by = Pinger(s.port)
    c = connect(s.port, "/d/echo")
    ping = text({"type": "ping"})
    written = flood([c.sock], ping * 4096, 2.0)
    during = rss.growth_mib()
    st = look(s)
    worst = by.stop()
    http = probe.stop()
    # Still not reading: the verdict must come from the server. A slow server (ASan) may not
    # have queued max_queue_bytes of pongs by the flood's end: the peer keeps flooding (and
    # never reads: reading would relieve it) until the server ends it, for at most 30 s.
    deadline = time.monotonic() + 30
    while not look(s)["disconnects"].get("slow_consumer") and time.monotonic() < deadline:
        written += flood([c.sock], ping * 4096, 1.0)
    end = settled(s, **leftovers(0))
    tail, how = drain(c, 5)
    code = closing_code(tail)
    rss.stop()
    figures.update(pings=written // len(ping), rss_growth_mib=round(during, 1),
                   http_worst_s=round(http, 3), bystander_worst_s=round(worst, 3),
                   close=(code, how), conns_during=st["conns"], disconnects=end["disconnects"])
    assert_rss(during, 1, "during the ping flood")
    assert http <= HTTP_BOUND, f"HTTP took {http:.2f} s"
    assert worst <= BYSTANDER_BOUND, worst
    # The engine ends a consumer that stopped reading: a Close frame when it still fits in
    # the socket, else the TCP connection alone (here cut mid-pong).
    assert how in ("eof", "reset") and code in (1008, None), (code, how, tail[-32:])
    assert end["disconnects"].get("slow_consumer") == 1, end["disconnects"]
    assert_no_leftovers(end)


# ---- the same paths without a server ----------------------------------------------------------

class _FakeWebSocket:
    """Enough of a Starlette WebSocket for ``connect()`` on the portable plane."""

    scope: dict = {}

    async def accept(self, subprotocol: Any = None, headers: Any = None) -> None:
        pass

    async def send(self, message: Any) -> None:
        pass

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass


def test_waiting_joins_and_leaves_coalesce_per_channel() -> None:
    """What LANE_BOUND rests on, call by call: changes of one channel that wait on the lane
    cancel out (a thousand join/leave pairs in one go: the backend and the other nodes hear of
    none of them), a redo revives the waiting change in its place, and a change made once the
    lane took the previous one is announced as before; the release still comes last."""
    import asyncio

    from wsmanager import WebSocketManager
    from wsmanager.backends import Backend

    class Recording(Backend):
        def __init__(self) -> None:
            self.calls: list[tuple[str, str]] = []

        async def joined(self, cid: str, user: Any, channel: str) -> None:
            self.calls.append(("joined", channel))

        async def left(self, cid: str, user: Any, channel: str) -> None:
            self.calls.append(("left", channel))

        async def release(self, cid: str, user: Any) -> None:
            self.calls.append(("release", cid))

        async def publish(self, envelope: Any) -> None:
            if envelope["kind"] in ("join", "leave"):
                self.calls.append((envelope["kind"], envelope["target"]))

    async def main() -> tuple[int, list, list]:
        backend = Recording()
        m = WebSocketManager(ping_interval=0, backend=backend)
        assert await m.connect(_FakeWebSocket(), "c")
        for _ in range(1000):
            assert m.join("c", "a") and m.leave("c", "a")
        m.join("c", "b")
        m.join("c", "a")
        m.leave("c", "b")
        waiting = m._announcements.pending("c")
        await asyncio.sleep(0.05)
        first = list(backend.calls)
        m.leave("c", "a")
        await asyncio.sleep(0.05)
        await m.disconnect("c")
        await m.stop()
        assert not m._changes and not m._announcements._lanes
        return waiting, first, backend.calls

    waiting, first, calls = asyncio.run(main())
    assert waiting == 2
    assert first == [("joined", "a"), ("join", "a")]
    assert calls == first + [("left", "a"), ("leave", "a"), ("release", "c")]


def test_deep_json_closes_with_1007_on_the_portable_plane() -> None:
    """The portable plane's ``serve()`` takes messages the same way: a text frame nested
    deeper than the decoder recurses is invalid JSON (1007), not a failed receive (1011)."""
    from fastapi import FastAPI, WebSocketDisconnect
    from fastapi.testclient import TestClient

    from wsmanager import WebSocketManager

    manager = WebSocketManager(ping_interval=0)
    app = FastAPI()
    got: list[Any] = []

    @app.websocket("/d")
    async def endpoint(websocket: WebSocket) -> None:
        await manager.serve(websocket, "p", None, lambda cid, message: got.append(message))

    with TestClient(app) as client, client.websocket_connect("/d") as ws:
        ws.send_text("[" * 100_000)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1007 and got == []
    assert manager.get_stats()["disconnects"]["protocol_error"] == 1
