"""A hostile client against a real native server (``python -m wsmanager``, 127.0.0.1): each
test is one attack, bounded in time and in what it sends, and asserts a named bound.

The bounds (issue 10, "a native plane fit for the open internet"):

* ``RSS_BOUND_MIB(n)``: the server's RSS (``/proc/<pid>/status`` VmRSS, sampled every 20 ms
  during the attack and once after it) grows by at most ``SLACK_MIB`` + n x ``MULT`` x
  (read_limit + max_message_size) for n attacking connections: per-connection memory within a
  small multiple of its budget. The limits are set small by environment for speed.
* ``INBOUND_BOUND``: the engine's ``inbound_bytes`` (inbound payload plus ``WSM_MSG_CHARGE`` per
  message, charged until the app takes it) never exceeds read_limit by more than one message
  (up to max_message_size) plus ``READ_SLACK``, what was already read when reading paused.
* ``HTTP_BOUND``: an HTTP route of the attacked server answers within this many seconds.
* ``BYSTANDER_BOUND``: a well-behaved client's every message is echoed, in order, each within
  this many seconds, whatever the attacker does.
* ``SHUTDOWN_BOUND``: SIGTERM or SIGINT stops the server within this many seconds, on its own
  (exit code 0, or the signal uvicorn re-raises after its graceful shutdown).
* Close codes: 1002 for protocol errors (bad lengths included), 1007 for invalid UTF-8 (text or
  close reason, wherever the frame falls in wslay's 4 096-byte read buffer), 1008 for a slow
  consumer, 1009 above max_message_size (checked as bytes arrive).

Every test records its figures (``FIGURES {...}`` on stdout, and one JSON line per test in the
file named by ``HOSTILE_FIGURES`` when set) before it asserts, so a failing run still says how
far off it was. Under ASan (``make test-asan``) the RSS bounds are not asserted (its quarantine
holds freed memory) and the time bounds are tripled.
"""
from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

pytest.importorskip("wsmanager.uvicorn")

from tests.hostile_support import (  # noqa: E402
    APP, ASAN, KiB, MiB, Bystander, HostileServer, HttpProbe, LiveClient, RssSampler, close_frame,
    connect, dump, flood, frame, header, read_close, straddling_close, timed_get, wait_for,
    zframe,
)
from tests.native_support import RawClient  # noqa: E402

# ---- limits and bounds ------------------------------------------------------------------------

READ_LIMIT = 256 * KiB          # WSMANAGER_READ_LIMIT
MAX_MESSAGE = 4 * MiB           # WSMANAGER_MAX_MESSAGE_SIZE
MAX_QUEUE = 1 * MiB             # WSMANAGER_MAX_QUEUE_BYTES
HIGH_WATER = 256 * KiB          # WSMANAGER_HIGH_WATER
SEND_TIMEOUT = 1.0              # WSMANAGER_SEND_TIMEOUT
WSM_MSG_CHARGE = 256            # csrc: the fixed charge per inbound message

CONN_BUDGET = READ_LIMIT + MAX_MESSAGE
MULT = 4                        # "a small multiple" of a connection's budget
SLACK_MIB = 16                  # the process's own noise: Python objects, malloc arenas, stacks
RSS_ABORT_MIB = 1024            # an attack stops once the server grew this much (the old engine)

SLOW = 3 if ASAN else 1
HTTP_BOUND = 2.0 * SLOW
BYSTANDER_BOUND = 2.0 * SLOW
SHUTDOWN_BOUND = 5.0 * SLOW
# What the engine had already taken from the socket when reading paused: up to one 256 KiB
# read (reassembled with 1.5x growth) and wslay's 4 KiB buffer, whose 6-byte frames are charged
# 256 bytes each (683 x 256 = 171 KiB).
READ_SLACK = 1 * MiB
INBOUND_BOUND = READ_LIMIT + (MAX_MESSAGE + WSM_MSG_CHARGE) + READ_SLACK

BASE_ENV = {
    "WSMANAGER_READ_LIMIT": str(READ_LIMIT),
    "WSMANAGER_MAX_MESSAGE_SIZE": str(MAX_MESSAGE),
    "WSMANAGER_MAX_QUEUE_BYTES": str(MAX_QUEUE),
    "WSMANAGER_HIGH_WATER": str(HIGH_WATER),
    "WSMANAGER_SEND_TIMEOUT": str(SEND_TIMEOUT),
    "WSMANAGER_CLOSE_TIMEOUT": "1",
    "WSMANAGER_PING_INTERVAL": "3600",
}


def RSS_BOUND_MIB(n: int = 1) -> float:  # noqa: N802 - a named bound
    return SLACK_MIB + n * MULT * CONN_BUDGET / MiB


def assert_rss(growth_mib: float, n: int = 1, what: str = "") -> None:
    if ASAN:
        return
    assert growth_mib <= RSS_BOUND_MIB(n), \
        f"{what}: server RSS grew {growth_mib:.1f} MiB, bound {RSS_BOUND_MIB(n):.1f} MiB"


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    fig: dict[str, Any] = {}
    yield fig
    line = {"test": request.node.name, **fig}
    print("FIGURES " + dump(line))
    path = os.environ.get("HOSTILE_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(dump(line) + "\n")


@pytest.fixture
def serve(tmp_path: Path, figures: dict[str, Any]) -> Iterator[Callable[..., HostileServer]]:
    """Starts servers (BASE_ENV plus overrides); each is stopped (SIGTERM, killed after 8 s) at
    the end, its stop time recorded."""
    servers: list[HostileServer] = []

    def start(app_path: str = APP, warm: str | None = "/echo",
              **env: str) -> HostileServer:
        d = tmp_path / f"s{len(servers)}"
        d.mkdir()
        s = HostileServer(d, env={**BASE_ENV, **env}, app_path=app_path)
        servers.append(s)
        if warm:
            s.warm_up(warm)
        return s

    yield start
    for s in servers:
        if s.proc.poll() is None:
            rc, secs = s.stop_timed(signal.SIGTERM, 8)
            figures.setdefault("teardown_stop", []).append({"rc": rc, "secs": round(secs, 2)})


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileServer]:
    """One server for the attacks on a single frame (close frames, headers, UTF-8)."""
    s = HostileServer(tmp_path_factory.mktemp("hostile"), env=BASE_ENV)
    s.warm_up()
    yield s
    s.stop_timed(signal.SIGTERM, 8)


def safe_stats(s: HostileServer) -> dict[str, Any]:
    try:
        return s.stats()
    except (OSError, ValueError):
        return {}


def exited_cleanly(rc: int | None, sig: int) -> bool:
    """The server stopped on its own after ``sig``: exit code 0, or death by that very signal
    (uvicorn re-raises the signal it caught once its graceful shutdown is over)."""
    return rc is not None and rc in (0, -sig)


# ---- floods of small messages --------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 64 * KiB, MAX_MESSAGE],
                         ids=["empty", "one-byte", "64KiB", "max-size"])
def test_messages_to_an_app_that_never_reads(serve, figures, size: int) -> None:
    """0-byte (6 bytes on the wire), 1-byte, 64 KiB or max_message_size binary messages, as fast
    as the socket takes them, for 3 s, to an endpoint that does not read: every message is
    charged its payload + WSM_MSG_CHARGE, so reading pauses after ~read_limit / 256 empty ones,
    or after the one big message that crosses read_limit. Bounds: RSS_BOUND_MIB(1) during and
    after, INBOUND_BOUND, HTTP_BOUND; the engine counts a read pause."""
    payload = b"x" * size
    s = serve()
    rss = RssSampler(s.pid)
    probe = HttpProbe(s.port)
    c = connect(s.port, "/never?hold=6")
    chunk = zframe(2, payload) * max(1, 60_000 // (size + 6))
    t0 = time.monotonic()
    written = flood([c.sock], chunk, 3.0, stop=lambda: rss.growth_mib() > RSS_ABORT_MIB)
    during = rss.growth_mib()
    st = safe_stats(s)
    c.close()
    time.sleep(1.0)
    after = rss.now_growth_mib()
    http = probe.stop()
    rss.stop()
    figures.update(attack_secs=round(time.monotonic() - t0 - 1, 2), wire_mib=round(written / MiB, 1),
                   messages_sent=round(written / len(zframe(2, payload)), 1),
                   rss_growth_mib=round(during, 1), rss_after_mib=round(after, 1),
                   http_worst_s=round(http, 3), inbound_bytes=st.get("inbound_bytes"),
                   read_pauses=st.get("read_pauses"), messages_in=st.get("messages_in"),
                   bound_mib=RSS_BOUND_MIB(1))
    assert_rss(during, 1, "during the flood")
    assert_rss(after, 1, "after the client left")
    assert http <= HTTP_BOUND, f"HTTP took {http:.2f} s under attack"
    assert st, "stats unanswered under attack"
    assert st["read_pauses"] >= 1
    assert st["inbound_bytes"] <= INBOUND_BOUND, st["inbound_bytes"]


def test_many_attackers_and_one_bystander(serve, figures) -> None:
    """16 connections flood empty messages to endpoints that never read, for 3 s, while a
    bystander echoes a message every 5 ms. Bounds: every bystander message echoed in order
    within BYSTANDER_BOUND, HTTP_BOUND, RSS_BOUND_MIB(16); every attacker's reading paused."""
    n = 16
    s = serve()
    rss = RssSampler(s.pid)
    by = Bystander(s.port, every=0.005)
    probe = HttpProbe(s.port)
    attackers = [connect(s.port, "/never?hold=6") for _ in range(n)]
    written = flood([a.sock for a in attackers], zframe(2) * 10_000, 3.0,
                    stop=lambda: rss.growth_mib() > RSS_ABORT_MIB)
    during = rss.growth_mib()
    st = safe_stats(s)
    http = probe.stop()
    by.stop(wait=5)
    for a in attackers:
        a.close()
    rss.stop()
    figures.update(wire_mib=round(written / MiB, 1), rss_growth_mib=round(during, 1),
                   http_worst_s=round(http, 3), bystander_sent=by.sent,
                   bystander_received=by.received, bystander_worst_s=round(by.worst, 3),
                   read_pauses=st.get("read_pauses"), inbound_bytes=st.get("inbound_bytes"),
                   bound_mib=RSS_BOUND_MIB(n))
    assert by.received == by.sent and by.out_of_order == 0, (by.sent, by.received)
    assert by.worst <= BYSTANDER_BOUND, by.worst
    assert http <= HTTP_BOUND, http
    assert_rss(during, n, "16 attackers")
    assert st and st["read_pauses"] >= n, st.get("read_pauses")
    assert st["inbound_bytes"] <= n * INBOUND_BOUND


def test_event_queue_bounded_while_the_loop_is_blocked(serve, figures) -> None:
    """The event loop is blocked 2 s (an HTTP route that sleeps in it) while 8 connections send
    2 000 x 1 KiB each: with WSMANAGER_EVENT_QUEUE_LIMIT=1 MiB the I/O thread stops reading
    every socket above it (event_queue_pauses counts it) and resumes when the loop drains;
    nothing is lost (each connection's app counts exactly 2 000 messages). Bound:
    SLACK_MIB + MULT x (limit + 8 x read_limit)."""
    limit = 1 * MiB
    n, count, size = 8, 2000, 1024
    s = serve(WSMANAGER_EVENT_QUEUE_LIMIT=str(limit))
    rss = RssSampler(s.pid)
    clients = [connect(s.port, "/sink", timeout=15) for _ in range(n)]
    blocked: list[float] = []
    t = threading.Thread(target=lambda: blocked.append(timed_get(s.port, "/block?secs=2", 10)))
    t.start()
    time.sleep(0.3)
    data = zframe(2, b"m" * size) * count
    written = flood([c.sock for c in clients], [data], 10.0)
    t.join(10)
    reports = []
    for c in clients:
        c.sock.settimeout(10)
        c.send(frame(1, b"report"))
        try:
            reports.append(c.recv_data()[1].decode())
        except (AssertionError, OSError) as exc:
            reports.append(f"error {exc!r}")
        c.close()
    st = safe_stats(s)
    growth = rss.growth_mib()
    rss.stop()
    bound = SLACK_MIB + MULT * (limit + n * READ_LIMIT) / MiB
    figures.update(wire_mib=round(written / MiB, 1), blocked_s=blocked, reports=reports,
                   event_queue_pauses=st.get("event_queue_pauses"),
                   event_queue_bytes=st.get("event_queue_bytes"), rss_growth_mib=round(growth, 1),
                   bound_mib=bound)
    assert reports == [f"{count}:{count * size}"] * n
    if not ASAN:
        assert growth <= bound, growth
    assert st.get("event_queue_pauses", 0) >= 1, st
    assert st["event_queue_bytes"] <= limit


# ---- fragments ------------------------------------------------------------------------------

def one_byte_fragments(m: int) -> bytes:
    return zframe(2, b"x", fin=False) + zframe(0, b"x", fin=False) * (m - 2) + zframe(0, b"x")


def digest_of(m: int) -> str:
    import hashlib
    return f"b:{m}:{hashlib.sha256(b'x' * m).hexdigest()}"


@pytest.mark.parametrize("n", [1, 3], ids=["one-client", "three-clients"])
def test_message_of_one_byte_fragments(serve, figures, n: int) -> None:
    """A 2 MiB message sent as 1-byte continuation frames (14 MiB on the wire), by one client
    or three at once: reassembly holds ~1.5 x M, not three allocations per fragment. Each
    message arrives whole (its digest). Bound: RSS_BOUND_MIB(n) at the peak and after."""
    m = 2 * MiB
    s = serve(warm="/digest")
    rss = RssSampler(s.pid)
    clients = [connect(s.port, "/digest", timeout=30) for _ in range(n)]
    t0 = time.monotonic()
    written = flood([c.sock for c in clients], [one_byte_fragments(m)], 60.0,
                    stop=lambda: rss.growth_mib() > RSS_ABORT_MIB * 2)
    sent_s = time.monotonic() - t0
    answers = []
    for c in clients:
        try:
            answers.append(c.recv_data()[1].decode())
        except (AssertionError, OSError) as exc:
            answers.append(f"error {exc!r}")
    delivered_s = time.monotonic() - t0
    peak = rss.growth_mib()
    for c in clients:
        c.send(close_frame(1000))
        c.close()
    time.sleep(1.0)
    after = rss.now_growth_mib()
    rss.stop()
    figures.update(clients=n, wire_mib=round(written / MiB, 1), send_s=round(sent_s, 2),
                   delivered_s=round(delivered_s, 2), rss_peak_mib=round(peak, 1),
                   rss_after_mib=round(after, 1), bound_mib=RSS_BOUND_MIB(n))
    assert answers == [digest_of(m)] * n
    assert_rss(peak, n, "peak")
    assert_rss(after, n, "after")


def test_endless_message_of_empty_fragments(serve, figures) -> None:
    """A text message that never ends: one byte, then empty continuation frames (6 bytes each)
    for 3 s. Its size never grows, so max_message_size never trips: what a fragment costs is
    what is at stake. The server may close it (1008 or 1009) but must not grow. Bounds:
    RSS_BOUND_MIB(1), HTTP_BOUND."""
    s = serve()
    rss = RssSampler(s.pid)
    probe = HttpProbe(s.port)
    c = connect(s.port, "/echo")
    c.send(zframe(1, b"a", fin=False))
    written = flood([c.sock], zframe(0, b"", fin=False) * 10_000, 3.0,
                    stop=lambda: rss.growth_mib() > RSS_ABORT_MIB)
    growth = rss.growth_mib()
    http = probe.stop()
    code, _, how = read_close(c, timeout=0.5)
    c.close()
    rss.stop()
    figures.update(fragments=written // 6, wire_mib=round(written / MiB, 1),
                   rss_growth_mib=round(growth, 1), http_worst_s=round(http, 3),
                   close=[code, how], bound_mib=RSS_BOUND_MIB(1))
    assert_rss(growth, 1, "endless fragments")
    assert http <= HTTP_BOUND, http
    assert how != "close" or code in (1008, 1009), code


def test_tiny_fragments_interleaved_with_pings(serve, figures) -> None:
    """A 128 KiB message as 1-byte fragments with a ping after every fragment but the last
    (131 071 pings): every ping is answered, the message arrives whole. Bound:
    RSS_BOUND_MIB(1)."""
    m = 128 * KiB
    s = serve(warm="/digest")
    rss = RssSampler(s.pid)
    c = LiveClient(s.port, "/digest", timeout=30)
    ping = zframe(9, b"p")
    data = (zframe(2, b"x", fin=False) + ping + (zframe(0, b"x", fin=False) + ping) * (m - 2)
            + zframe(0, b"x"))
    t0 = time.monotonic()
    c.send(data)
    answer = c.next_data(30)
    pings = m - 1  # one after each fragment but the last
    wait_for(lambda: c.pongs >= pings, 10)
    took = time.monotonic() - t0
    growth = rss.growth_mib()
    c.send(close_frame(1000))
    c.join()
    c.close()
    rss.stop()
    figures.update(pings=pings, pongs=c.pongs, secs=round(took, 2), rss_growth_mib=round(growth, 1),
                   close=c.close_code, bound_mib=RSS_BOUND_MIB(1))
    assert answer is not None and answer[1].decode() == digest_of(m)
    assert c.pongs == pings
    assert_rss(growth, 1, "fragments and pings")


@pytest.mark.parametrize("how", ["one-header", "fragments"])
def test_message_over_max_size_closes_1009(serve, figures, how: str) -> None:
    """max_message_size + 1: announced by one frame header (closed 1009 after 64 KiB of its
    payload, not after 4 MiB: the check is made as bytes arrive), or reached by 64 KiB fragments (after a message of
    exactly max_message_size in the same fragments was delivered whole). Bounds: 1009 within
    2 s of the last byte that crosses the limit, RSS_BOUND_MIB(1)."""
    s = serve(warm="/digest")
    rss = RssSampler(s.pid)
    c = connect(s.port, "/digest", timeout=10)
    frag = 64 * KiB
    exact = None
    if how == "one-header":
        c.send(header(2, MAX_MESSAGE + 1, 64) + b"x" * frag)
    else:
        n = MAX_MESSAGE // frag
        whole = (zframe(2, b"x" * frag, fin=False) + zframe(0, b"x" * frag, fin=False) * (n - 2)
                 + zframe(0, b"x" * frag))
        flood([c.sock], [whole], 20)
        exact = c.recv_data()[1].decode()
        over = (zframe(2, b"x" * frag, fin=False) + zframe(0, b"x" * frag, fin=False) * (n - 1)
                + zframe(0, b"x"))
        flood([c.sock], [over], 20)
    t0 = time.monotonic()
    code, _, how_closed = read_close(c, timeout=5)
    took = time.monotonic() - t0
    growth = rss.growth_mib()
    c.close()
    rss.stop()
    figures.update(close=[code, how_closed], secs=round(took, 3), exact=exact,
                   rss_growth_mib=round(growth, 1))
    if exact is not None:
        assert exact == digest_of(MAX_MESSAGE)
    assert code == 1009, (code, how_closed)
    assert took <= 2 * SLOW
    assert_rss(growth, 1, how)


# ---- close frames -----------------------------------------------------------------------------

STRADDLES = [(4078, b"ok\xff\xfe"), (4080, b"\xff\xfe"), (4076, b"okok\xff\xfe"),
             (4077, b"ok\xff\xfe"), (4079, b"ok\xff\xfe"), (4081, b"\xff\xfe"),
             (4082, b"\xff\xfe"), (4078, b"ok\xc3"), (4080, b"\xed\xa0\x80")]


@pytest.mark.parametrize("pad,reason", STRADDLES,
                         ids=[f"{p}-{r.hex()}" for p, r in STRADDLES])
def test_close_reason_straddling_the_read_buffer_closes_1007(shared, figures, pad: int,
                                                            reason: bytes) -> None:
    """A binary frame, then a Close 1000 with an invalid UTF-8 reason, in one write, the cut of
    wslay's 4 096-byte read buffer falling in or just before the reason: 1007, never an echo of
    the invalid reason; the app sees the disconnect (no poisoned batch)."""
    s = shared
    before = len(s.events())
    c = connect(s.port, "/never?hold=0")
    c.send(straddling_close(pad, reason=reason))
    code, echoed, how = read_close(c, timeout=5)
    try:
        c.send(close_frame(code or 1000))
    except OSError:
        pass
    c.close()
    evs = wait_for(lambda: s.events()[before:], 3) or []
    figures.update(close=[code, echoed.hex(), how], app_events=evs)
    assert code == 1007, (code, echoed)
    assert evs and evs[-1]["code"] == 1007, evs
    assert not s.log_problems(), s.log_problems()[:5]


CLOSES = [
    ("reason-ff-fe", struct.pack("!H", 1000) + b"\xff\xfe", 1007),
    ("reason-truncated", struct.pack("!H", 1000) + b"ok\xc3", 1007),
    ("reason-surrogate", struct.pack("!H", 1001) + b"\xed\xa0\x80", 1007),
    ("reason-overlong", struct.pack("!H", 1000) + b"\xc0\xaf", 1007),
    ("one-byte", b"\x03", 1002),
] + [(f"code-{c}", struct.pack("!H", c), 1002)
     for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)] + [
    (f"code-{c}", struct.pack("!H", c) + b"bye", c) for c in (1012, 1013, 1014)
]


@pytest.mark.parametrize("payload,expect", [(p, e) for _, p, e in CLOSES],
                         ids=[i for i, _, _ in CLOSES])
def test_close_frames_validated_by_the_engine(shared, figures, payload: bytes, expect: int) -> None:
    """Close frames: invalid UTF-8 reasons 1007, invalid codes and a 1-byte payload 1002,
    1012-1014 accepted (echoed with their reason)."""
    c = connect(shared.port, "/echo")
    c.send(frame(8, payload))
    code, reason, how = read_close(c, timeout=5)
    eof = c.at_eof(3)
    c.close()
    figures.update(close=[code, reason.hex(), how], eof=eof)
    assert code == expect, (code, reason, how)
    if expect in (1012, 1013, 1014):
        assert reason == b"bye"
    assert eof


# ---- frame headers ------------------------------------------------------------------------------

HEADERS = [
    ("len-2^63", header(2, 1 << 63, 64), 1002),
    ("len-2^64-1", header(2, (1 << 64) - 1, 64), 1002),
    ("16bit-5", header(2, 5, 16) + b"x" * 5, 1002),
    ("16bit-125", header(2, 125, 16) + b"x" * 125, 1002),
    ("64bit-5", header(2, 5, 64) + b"x" * 5, 1002),
    ("64bit-1000", header(2, 1000, 64) + b"x" * 1000, 1002),
    ("64bit-65535", header(2, 65535, 64) + b"x" * 65535, 1002),
    ("text-64bit-3", header(1, 3, 64) + b"abc", 1002),
    ("continuation-16bit-1", zframe(2, b"a", fin=False) + header(0, 1, 16) + b"b", 1002),
    ("ping-16bit-5", header(9, 5, 16) + b"x" * 5, 1002),
    ("len-2^63-1", header(2, (1 << 63) - 1, 64) + b"x", 1009),
    ("len-2^63-1-header-only", header(2, (1 << 63) - 1, 64), 1009),
]


@pytest.mark.parametrize("data,expect", [(d, e) for _, d, e in HEADERS],
                         ids=[i for i, _, _ in HEADERS])
def test_bad_length_encodings_close_1002(shared, figures, data: bytes, expect: int) -> None:
    """Frame headers with a 2^63 length (the top bit is reserved) or a length in a longer form
    than it needs: Close 1002 (a Close frame with a status code, not an empty one). A valid
    but too large 63-bit length: 1009."""
    c = connect(shared.port, "/echo")
    c.send(data)
    code, reason, how = read_close(c, timeout=5)
    c.close()
    figures.update(close=[code, reason.hex(), how])
    assert code == expect, (code, how)


def test_minimal_lengths_still_accepted(shared) -> None:
    """The control of the test above: the same payloads in their minimal forms are echoed."""
    c = connect(shared.port, "/echo")
    for n in (0, 125, 126, 65535, 65536):
        c.send(zframe(2, b"y" * n))
        assert c.recv_data() == (2, b"y" * n)
    c.send(close_frame(1000))
    assert c.expect_close()[0] == 1000
    c.close()


@pytest.mark.parametrize("data", [
    frame(1, b"\xce\xba\xe1\xbd\xb9\xed\xa0\x80"),
    frame(1, b"ok\xc3", fin=False) + frame(0, b"\x28"),
    frame(1, b"a" * 4090, fin=False) + frame(9, b"p") + frame(0, b"\xff"),
    frame(1, b"a" * 4088 + b"\xe2\x82") + b"",
    frame(1, b"a" * 4087 + b"\xf0\x9f\x98\x80" + b"\xff"),
], ids=["surrogate", "split-fragments", "after-ping", "truncated-at-4096", "after-4096"])
def test_invalid_utf8_text_closes_1007(shared, figures, data: bytes) -> None:
    """Invalid UTF-8 in text, whole or in fragments, before or across wslay's 4 096-byte read
    buffer: 1007 (what held, kept)."""
    c = connect(shared.port, "/echo")
    c.send(data)
    code, _, how = read_close(c, timeout=5)
    c.close()
    figures.update(close=[code, how])
    assert code == 1007, (code, how)


# ---- poisoning --------------------------------------------------------------------------------

BAD_CLOSES = [(4078, b"ok\xff\xfe"), (4080, b"\xff\xfe"), (4079, b"o\xff\xfe")]


def test_bad_closes_do_not_poison_a_bystander(serve, figures) -> None:
    """100 attackers, in 5 bursts of 20 connections that write at the same moment, each a
    binary frame and a Close whose invalid reason straddles wslay's read buffer, while a
    bystander echoes a message every 1 ms (so its messages share the engine's event batches
    with the attackers' disconnects). Every attacker gets 1007 and its app sees its disconnect;
    every bystander message is echoed in order within BYSTANDER_BOUND; nothing escapes into the
    log; SIGTERM stops the server within SHUTDOWN_BOUND."""
    s = serve()
    by = Bystander(s.port, every=0.001)
    codes: dict[str, int] = {}
    t0 = time.monotonic()
    for burst in range(5):
        attackers = [connect(s.port, "/echo") for _ in range(20)]
        writes = [straddling_close(pad, reason=reason)
                  for pad, reason in (BAD_CLOSES[i % len(BAD_CLOSES)] for i in range(20))]
        time.sleep(0.05)  # the bystander's messages keep flowing between the bursts
        for c, data in zip(attackers, writes):
            c.send(data)
        for c in attackers:
            code, _, how = read_close(c, timeout=2)
            key = str(code) if how == "close" else how
            codes[key] = codes.get(key, 0) + 1
            try:
                c.send(close_frame(1000))
            except OSError:
                pass
            c.close()
        if time.monotonic() - t0 > 30:
            break
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
    attack_s = time.monotonic() - t0
    by.stop(wait=5)
    attacker_events = wait_for(
        lambda: [e for e in s.events() if e["path"] == "/echo" and e["code"] == 1007], 3) or []
    problems = s.log_problems()
    rc, stop_s = s.stop_timed(signal.SIGTERM, 10)
    figures.update(attack_s=round(attack_s, 2), codes=codes, bystander_sent=by.sent,
                   bystander_received=by.received, bystander_worst_s=round(by.worst, 3),
                   app_saw_1007=len(attacker_events), log_problems=len(problems),
                   stop=[rc, round(stop_s, 2)])
    assert codes == {"1007": 100}, codes
    assert by.received == by.sent and by.out_of_order == 0, (by.sent, by.received)
    assert by.worst <= BYSTANDER_BOUND, by.worst
    assert len(attacker_events) == 100
    assert not problems, problems[:5]
    assert exited_cleanly(rc, signal.SIGTERM) and stop_s <= SHUTDOWN_BOUND, (rc, stop_s)


def test_seed_endpoint_survives_200_straddling_bad_closes(serve, figures) -> None:
    """The seed's own endpoint (examples/seed_endpoint, receive_json), WSMANAGER_MAX_CONNECTIONS
    =10: 200 connections each write a 4 078-byte JSON text frame and a Close whose reason's
    invalid bytes straddle wslay's read buffer. Bounds: each is closed 1007; afterwards no
    registered ghost (/api/v1/ws/stats total_connections == 0 within 3 s); a legitimate client
    connects and gets its echo; SIGINT stops the server within SHUTDOWN_BOUND."""
    s = serve(app_path="examples.seed_endpoint.app:app", warm=None,
              WSMANAGER_MAX_CONNECTIONS="10")
    from websockets.sync.client import connect as ws_connect

    def legit() -> Any:
        with ws_connect(f"ws://127.0.0.1:{s.port}/api/v1/ws", open_timeout=5) as ws:
            ws.send(json.dumps({"type": "message", "content": "hello"}))
            return json.loads(ws.recv(timeout=5))

    assert legit() == {"type": "message", "content": "hello"}
    pad = '{"type":"noop","pad":"' + "x" * 4054 + '"}'
    assert len(pad) == 4078
    codes: dict[str, int] = {}
    t0 = time.monotonic()
    done = 0
    for _ in range(200):
        c = RawClient(s.port, "/api/v1/ws", timeout=5)
        if c.status == 101:
            c.send(frame(1, pad.encode()) + frame(8, struct.pack("!H", 1000) + b"ok\xff\xfe"))
            code, _, how = read_close(c, timeout=1)
            key = str(code) if how == "close" else how
            try:
                c.send(close_frame(1000))
            except OSError:
                pass
        else:
            key = f"http-{c.status}"
        codes[key] = codes.get(key, 0) + 1
        c.close()
        done += 1
        if time.monotonic() - t0 > 40:
            break
    attack_s = time.monotonic() - t0

    def registered() -> int | None:
        try:
            return s.get("/api/v1/ws/stats")["total_connections"]
        except (OSError, ValueError, KeyError):
            return None

    left = wait_for(lambda: registered() == 0, 3)
    ghosts = registered()
    try:
        echo = legit()
    except Exception as exc:  # noqa: BLE001 - recorded, then asserted
        echo = f"error {exc!r}"
    problems = s.log_problems()
    rc, stop_s = s.stop_timed(signal.SIGINT, 10)
    figures.update(done=done, attack_s=round(attack_s, 2), codes=codes, ghosts=ghosts,
                   legit=echo, log_problems=len(problems), stop=[rc, round(stop_s, 2)])
    assert codes == {"1007": 200}, codes
    assert left and ghosts == 0, ghosts
    assert echo == {"type": "message", "content": "hello"}, echo
    assert exited_cleanly(rc, signal.SIGINT) and stop_s <= SHUTDOWN_BOUND, (rc, stop_s)


# ---- liveness, slow consumers -------------------------------------------------------------------

def test_live_client_of_a_slow_app_is_not_stale(serve, figures) -> None:
    """ping_interval 1 s, ping_timeout 1 s; the app waits 3.5 s after the accept, then reads a
    message every 20 ms. The client sends 1 MiB (32 x 32 KiB) at once, so the engine pauses
    reading for longer than interval + timeout, and answers every ping from a reader thread.
    Bounds: not closed (no 1011 "stale"); all 32 messages delivered, in order, within 10 s; at
    least one ping seen; the engine counts a read pause."""
    s = serve(WSMANAGER_PING_INTERVAL="1", WSMANAGER_PING_TIMEOUT="1")
    n, size = 32, 32 * KiB
    c = LiveClient(s.port, "/slow?first=3.5&delay=0.02", timeout=15)
    t0 = time.monotonic()
    c.send(b"".join(zframe(2, bytes([i]) * size) for i in range(n)))
    got: list[str] = []
    deadline = t0 + 10
    while len(got) < n and time.monotonic() < deadline and c.close_code is None:
        f = c.next_data(0.2)
        if f is not None:
            got.append(f[1].decode())
    took = time.monotonic() - t0
    st = safe_stats(s)
    closed = c.close_code, (round(c.closed_at - t0, 2) if c.closed_at else None)
    if c.close_code is None:
        c.send(close_frame(1000))
    c.join()
    c.close()
    figures.update(delivered=len(got), secs=round(took, 2), closed=closed, pings=c.pings,
                   read_pauses=st.get("read_pauses"), stale=st.get("disconnects", {}).get("stale"))
    assert closed[0] is None, f"closed {closed[0]} after {closed[1]} s"
    assert got == [f"got:{i}:b:{size}" for i in range(n)], got[-3:]
    assert c.pings >= 1
    assert st.get("read_pauses", 0) >= 1


def test_pings_without_reading_the_pongs(serve, figures) -> None:
    """A client sends pings (125-byte payloads) as fast as it can and never reads: the pongs
    pile up, so it is a slow consumer. Bounds: closed 1008 (slow_consumer) within SEND_TIMEOUT
    + 4 s of the start; RSS_BOUND_MIB(1)."""
    s = serve()
    rss = RssSampler(s.pid)
    seen = len(s.events())
    c = connect(s.port, "/echo")
    closed: list[dict] = []

    def gone() -> bool:
        if rss.growth_mib() > RSS_ABORT_MIB:
            return True
        closed[:] = s.events()[seen:]
        return bool(closed)

    t0 = time.monotonic()
    ping = zframe(9, b"p" * 125)
    written = flood([c.sock], ping * 500, SEND_TIMEOUT + 4, stop=gone)
    took = time.monotonic() - t0
    wait_for(gone, 1)
    growth = rss.growth_mib()
    c.close()
    rss.stop()
    ev = closed[0] if closed else {}
    figures.update(pings=written // len(ping), secs=round(took, 2), event=ev,
                   rss_growth_mib=round(growth, 1), bound_mib=RSS_BOUND_MIB(1))
    assert ev.get("code") == 1008 and ev.get("why") == "slow_consumer", ev
    assert took <= SEND_TIMEOUT + 4
    assert_rss(growth, 1, "ping flood")


def test_slow_consumer_dropped_while_others_continue(serve, figures) -> None:
    """A client makes the app queue 4 MiB (64 x 64 KiB, through the engine) and never reads.
    Bounds: it is closed 1008 within SEND_TIMEOUT + 2 s; a bystander is served throughout
    (BYSTANDER_BOUND); RSS_BOUND_MIB(1) (what held, kept)."""
    s = serve()
    rss = RssSampler(s.pid)
    seen = len(s.events())
    by = Bystander(s.port, every=0.005)
    c = connect(s.port, "/echo")
    c.send(frame(1, b"cmd:flood:64"))
    t0 = time.monotonic()
    evs = wait_for(lambda: s.events()[seen:], SEND_TIMEOUT + 4) or []
    took = time.monotonic() - t0
    time.sleep(0.5)
    by.stop(wait=5)
    growth = rss.growth_mib()
    c.close()
    rss.stop()
    ev = evs[0] if evs else {}
    figures.update(event=ev, secs=round(took, 2), bystander_sent=by.sent,
                   bystander_received=by.received, bystander_worst_s=round(by.worst, 3),
                   rss_growth_mib=round(growth, 1))
    assert ev.get("code") == 1008 and ev.get("why") == "slow_consumer", ev
    assert took <= SEND_TIMEOUT + 2
    assert by.received == by.sent and by.worst <= BYSTANDER_BOUND, (by.sent, by.received, by.worst)
    assert_rss(growth, 1, "slow consumer")


# ---- shutdown under attack ------------------------------------------------------------------------

def test_sigterm_during_a_flood(serve, figures) -> None:
    """4 connections flood empty messages to an app that reads them all, 2 more flood 1 KiB
    messages to an echo they never read; SIGTERM 2 s in. Bound: the server exits 0 within
    SHUTDOWN_BOUND."""
    s = serve()
    rss = RssSampler(s.pid)
    sinks = [connect(s.port, "/sink") for _ in range(4)]
    echoes = [connect(s.port, "/echo") for _ in range(2)]
    result: list[tuple[int | None, float]] = []

    def stopper() -> None:
        time.sleep(2)
        result.append(s.stop_timed(signal.SIGTERM, 12))

    t = threading.Thread(target=stopper)
    t.start()
    written = flood([a.sock for a in sinks + echoes], zframe(2) * 5_000 + zframe(2, b"e" * 1024) * 30,
                    20, stop=lambda: bool(result) or rss.growth_mib() > RSS_ABORT_MIB)
    t.join(20)
    growth = rss.growth_mib()
    rss.stop()
    for a in sinks + echoes:
        a.close()
    rc, secs = result[0] if result else (None, float("inf"))
    figures.update(wire_mib=round(written / MiB, 1), stop=[rc, round(secs, 2)],
                   rss_growth_mib=round(growth, 1))
    assert exited_cleanly(rc, signal.SIGTERM) and secs <= SHUTDOWN_BOUND, (rc, secs)
