"""RFC 6455 behaviour of the native plane, checked with a raw-socket client (by the
categories of the Autobahn|Testsuite), plus real `websockets` and FastAPI clients."""
from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("wsmanager.uvicorn")

from tests.native_support import RawClient, close_frame, events_until, frame, serving  # noqa: E402
from tests.servers import AppServer  # noqa: E402

LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    log = tmp_path_factory.mktemp("native") / "server.log"
    env = {"WSMANAGER_PING_INTERVAL": "3600", "WSMANAGER_MAX_MESSAGE_SIZE": str(LIMIT),
           "WSMANAGER_MAX_QUEUE_BYTES": str(512 * 1024), "WSMANAGER_HIGH_WATER": str(128 * 1024),
           "WSMANAGER_SEND_TIMEOUT": "0.3", "WSMANAGER_CLOSE_TIMEOUT": "1"}
    with serving("echo_app", log, env=env) as s:
        yield s


@pytest.fixture
def client(server: AppServer) -> Iterator[RawClient]:
    c = RawClient(server.port)
    assert c.status == 101, c.head
    yield c
    c.close()


def last_event(server: AppServer, before: int) -> dict:
    events = events_until(server, before + 1)
    assert len(events) > before, events
    return events[-1]


def test_text_and_binary_echo(client: RawClient) -> None:
    client.send(frame(1, "héllo".encode()) + frame(2, b"\x00\xff" * 100))
    assert client.recv_data() == (1, "héllo".encode())
    assert client.recv_data() == (2, b"\x00\xff" * 100)
    big = bytes(range(256)) * 400  # 100 KiB: 64-bit... 16-bit length forms both used
    client.send(frame(2, big))
    assert client.recv_data() == (2, big)


def test_fragmented_messages(client: RawClient) -> None:
    client.send(frame(1, b"frag", fin=False) + frame(0, b"men", fin=False) + frame(0, b"ted"))
    assert client.recv_data() == (1, b"fragmented")
    client.send(frame(2, b"\x01", fin=False) + frame(0, b"\x02"))
    assert client.recv_data() == (2, b"\x01\x02")


def test_control_frames_between_fragments(client: RawClient) -> None:
    client.send(frame(1, b"ab", fin=False) + frame(9, b"mid") + frame(0, b"cd"))
    assert client.recv_frame() == (10, b"mid", True)
    assert client.recv_data() == (1, b"abcd")


def test_ping_pong_same_payload(client: RawClient) -> None:
    payload = bytes(range(125))
    client.send(frame(9, payload))
    assert client.recv_frame() == (10, payload, True)
    client.send(frame(9))
    assert client.recv_frame() == (10, b"", True)


@pytest.mark.parametrize("chunks", [
    [frame(1, b"\xce\xba\xe1\xbd\xb9\xed\xa0\x80")],                      # surrogate
    [frame(1, b"ok\xc3", fin=False), frame(0, b"\x28")],                  # split, then invalid
    [frame(1, b"\xf4\x90\x80\x80")],                                      # > U+10FFFF
])
def test_invalid_utf8_closes_1007(client: RawClient, chunks: list[bytes]) -> None:
    client.send(b"".join(chunks))
    assert client.expect_close()[0] == 1007
    assert client.at_eof()


@pytest.mark.parametrize("bad", [
    frame(1, b"unmasked", mask=False),
    frame(1, b"rsv", rsv=1),
    frame(1, b"rsv", rsv=4),
    frame(3, b"reserved opcode"),
    frame(0xB, b"reserved control"),
    frame(9, b"x" * 126),                       # control frame > 125 bytes
    frame(9, b"x", fin=False),                  # fragmented control frame
    frame(0, b"continuation without start"),
    frame(1, b"a", fin=False) + frame(1, b"b"),  # new message inside a fragmented one
])
def test_protocol_violations_close_1002(server: AppServer, client: RawClient, bad: bytes) -> None:
    n = len(server.get("/events"))
    client.send(bad)
    assert client.expect_close()[0] == 1002
    assert client.at_eof()
    ev = last_event(server, n)
    assert ev["code"] == 1002 and ev["wsmanager.reason"] == "protocol_error"


def test_message_over_limit_closes_1009(client: RawClient) -> None:
    client.send(frame(2, b"x" * (LIMIT + 1)))
    assert client.expect_close()[0] == 1009
    # also when the limit is crossed by fragments
    c2 = RawClient(client.sock.getpeername()[1])
    c2.send(frame(2, b"x" * (LIMIT // 2), fin=False) + frame(0, b"y" * (LIMIT // 2 + 1)))
    assert c2.expect_close()[0] == 1009
    c2.close()


@pytest.mark.parametrize("code", [None, 0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000])
def test_invalid_close_codes_close_1002(client: RawClient, code: int | None) -> None:
    if code is None:
        client.send(frame(8, b"\x03"))  # a one-byte close payload
    else:
        client.send(close_frame(code))
    assert client.expect_close()[0] == 1002


def test_close_reason_invalid_utf8_closes_1007(client: RawClient) -> None:
    client.send(close_frame(1000, b"\xff\xfe"))
    assert client.expect_close()[0] == 1007


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                  1012, 1013, 1014, 3000, 3999, 4000, 4999])
def test_valid_close_codes_echoed(server: AppServer, client: RawClient, code: int) -> None:
    n = len(server.get("/events"))
    client.send(close_frame(code, b"see you"))
    assert client.expect_close() == (code, b"see you")
    assert client.at_eof()
    ev = last_event(server, n)
    assert (ev["code"], ev["reason"], ev["wsmanager.reason"]) == (code, "see you", "normal")


def test_empty_close_answered(server: AppServer, client: RawClient) -> None:
    n = len(server.get("/events"))
    client.send(close_frame(None))
    assert client.expect_close()[0] in (None, 1000)
    assert last_event(server, n)["code"] == 1005


def test_abrupt_tcp_close(server: AppServer, client: RawClient) -> None:
    n = len(server.get("/events"))
    client.send(frame(1, b"hi"))
    assert client.recv_data() == (1, b"hi")
    client.sock.close()
    ev = last_event(server, n)
    assert ev["code"] == 1006 and ev["wsmanager.reason"] == "abrupt"


def test_half_sent_frame_then_close(server: AppServer, client: RawClient) -> None:
    n = len(server.get("/events"))
    client.send(frame(1, b"x" * 1000)[:500])
    time.sleep(0.05)
    client.sock.shutdown(socket.SHUT_WR)
    assert client.at_eof()
    ev = last_event(server, n)
    assert ev["code"] == 1006 and ev["wsmanager.reason"] == "abrupt"


def test_server_close_handshake(server: AppServer, client: RawClient) -> None:
    client.send(frame(1, b"cmd:close:4001"))
    assert client.expect_close() == (4001, b"bye")
    client.send(close_frame(4001))
    assert client.at_eof()


def test_slow_consumer_closed_others_unaffected(server: AppServer) -> None:
    slow = RawClient(server.port)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    fast = RawClient(server.port)
    n = len(server.get("/events"))
    slow.send(frame(1, b"cmd:flood:400"))  # 25 MiB: more than both kernel buffers hold
    t0 = time.monotonic()
    for i in range(20):
        fast.send(frame(1, b"ping %d" % i))
        assert fast.recv_data() == (1, b"ping %d" % i)
    assert time.monotonic() - t0 < 5  # nothing waits for the stalled peer
    ev = last_event(server, n)
    assert ev["code"] == 1008 and ev["wsmanager.reason"] == "slow_consumer"
    stats = server.get("/stats")
    assert stats["disconnects"]["slow_consumer"] >= 1
    slow.close()
    fast.close()


def test_stale_client_closed(tmp_path: Path) -> None:
    env = {"WSMANAGER_PING_INTERVAL": "0.3", "WSMANAGER_PING_TIMEOUT": "0.3"}
    with serving("echo_app", tmp_path / "stale.log", env=env) as s:
        silent = RawClient(s.port)
        alive = RawClient(s.port)
        t0 = time.monotonic()
        # the live client answers pings (as browsers do) and stays
        got_ping = False
        alive.sock.settimeout(0.2)
        while time.monotonic() - t0 < 1.2:
            try:
                f = alive.recv_frame()
            except socket.timeout:
                continue
            if f and f[0] == 9:
                got_ping = True
                alive.send(frame(10, f[1]))
        assert got_ping
        assert silent.expect_close()[0] == 1011
        ev = events_until(s, 1)
        assert ev and ev[0]["wsmanager.reason"] == "stale"
        alive.sock.settimeout(5)
        alive.send(frame(1, b"still here"))
        assert alive.recv_data() == (1, b"still here")
        silent.close()
        alive.close()


def test_websockets_client_echo(server: AppServer) -> None:
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{server.port}/ws", subprotocols=["chat"]) as ws:
        assert ws.subprotocol == "chat"
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        ws.send(b"\x00" * 70000)
        assert ws.recv(timeout=5) == b"\x00" * 70000
        ws.ping(b"abc").wait(5)
        for i in range(200):
            ws.send(f"m{i}")
        assert [ws.recv(timeout=5) for _ in range(200)] == [f"m{i}" for i in range(200)]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_fastapi_on_native_plane(tmp_path: Path, loop: str) -> None:
    from websockets.sync.client import connect

    with serving("fastapi_app", tmp_path / "fastapi.log", extra=["--loop", loop]) as s:
        s.proc.poll()
        with connect(f"ws://127.0.0.1:{s.port}/ws") as ws:
            for i in range(5):
                ws.send(json.dumps({"n": i}))
                assert json.loads(ws.recv(timeout=5)) == {"echo": {"n": i}}
        threads = [threading.Thread(target=_echo_many, args=(s.port, k)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)


def _echo_many(port: int, k: int) -> None:
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        for i in range(50):
            ws.send(json.dumps([k, i]))
            assert json.loads(ws.recv(timeout=5)) == {"echo": [k, i]}


def test_close_frame_in_pieces(client: RawClient) -> None:
    data = close_frame(1013, b"try later")
    for i in range(len(data)):
        client.send(data[i:i + 1])
        time.sleep(0.005)
    assert client.expect_close() == (1013, b"try later")


def test_engine_stats_count(server: AppServer) -> None:
    st = server.get("/stats")
    assert st["running"] and st["total_connections"] >= 1
    assert st["bytes_in"] > 0 and st["bytes_out"] > 0
    assert struct.calcsize("!H") == 2


def test_an_idle_connection_holds_no_wslay_context(tmp_path: Path) -> None:
    """A connection holds a wslay context (~8.5 KiB) only while bytes of a frame or a message are
    in flight: none after the handshake, none once a message, a fragmented message or a ping has
    been taken, one while a frame or a fragmented message is incomplete; the engine's pings and
    closes need none, and every answer is still right."""
    env = {"WSMANAGER_PING_INTERVAL": "0.3", "WSMANAGER_PING_TIMEOUT": "5"}
    with serving("echo_app", tmp_path / "dormant.log", env=env) as s:
        def contexts(want: int) -> int:
            deadline = time.monotonic() + 5
            while (got := s.get("/stats")["wslay_contexts"]) != want and time.monotonic() < deadline:
                time.sleep(0.02)
            return got

        clients = [RawClient(s.port) for _ in range(20)]
        assert contexts(0) == 0  # after the handshake
        c = clients[0]
        c.send(frame(1, b"hello"))
        assert c.recv_data() == (1, b"hello")
        assert contexts(0) == 0
        c.send(frame(1, b"frag", fin=False))  # a message in progress keeps it
        assert contexts(1) == 1
        c.send(frame(9, b"mid"))  # a ping between fragments: answered, the message goes on
        assert c.recv_frame() == (10, b"mid", True)
        c.send(frame(0, b"mented"))
        assert c.recv_data() == (1, b"fragmented")
        assert contexts(0) == 0
        whole = frame(2, b"\x01" * 1000)
        c.send(whole[:7])  # an incomplete frame keeps it too
        assert contexts(1) == 1
        c.send(whole[7:])
        assert c.recv_data() == (2, b"\x01" * 1000)
        assert contexts(0) == 0
        # the engine's own pings go to dozing connections; their pongs wake and doze them
        c.sock.settimeout(2)
        f = c.recv_frame()
        while f[0] != 9:
            f = c.recv_frame()
        c.send(frame(10, f[1]))
        assert contexts(0) == 0
        # and a server close needs a context only while it is closing
        c.send(frame(1, b"cmd:close:4001"))
        assert c.expect_close()[0] == 4001
        c.close()
        assert contexts(0) == 0
        for other in clients[1:]:
            other.close()


@pytest.mark.parametrize("freeze", ["1", "0"])
def test_the_first_native_connection_freezes_the_app_for_the_collector(tmp_path: Path, freeze: str) -> None:
    """WSMANAGER_GC_FREEZE (on by default): what the app made before its first native connection
    is frozen (gc.freeze()), so full collections walk only what came after; 0 leaves it."""
    with serving("echo_app", tmp_path / "gc.log", env={"WSMANAGER_GC_FREEZE": freeze}) as s:
        assert s.get("/gc")["frozen"] == 0  # HTTP requests freeze nothing
        c = RawClient(s.port)
        c.send(frame(1, b"x"))
        assert c.recv_data() == (1, b"x")
        gc_state = s.get("/gc")
        c.close()
    if freeze == "1":
        assert gc_state["frozen"] > 10_000  # the interpreter's, uvicorn's and the app's objects
        assert gc_state["tracked"] < gc_state["frozen"] / 4
    else:
        assert gc_state["frozen"] == 0


def test_a_native_connection_holds_one_descriptor(server: AppServer) -> None:
    """After the hand-off only the engine's duplicate of the socket stays open (10 000
    connections must fit a 20 000 descriptor limit), and every one goes with its connection."""
    import os
    import time

    def fds() -> int:
        return len(os.listdir(f"/proc/{server.proc.pid}/fd"))

    warm = RawClient(server.port)  # the engine (epoll, eventfds) is running from here on
    time.sleep(0.2)
    before = fds()
    clients = [RawClient(server.port) for _ in range(40)]
    time.sleep(0.3)
    # 40 more, not 80 (the transport's own fd is closed at hand-off); a connection of an earlier
    # test still closing may make it a little less
    assert 30 <= fds() - before <= 42, fds() - before
    for c in clients + [warm]:
        c.close()
    deadline = time.monotonic() + 10
    while fds() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds() <= before


def test_sends_resume_after_the_peer_drains_the_backlog(tmp_path: Path) -> None:
    """A backlog over high_water pauses the app's sends (EV_WRITE_PAUSED); once the peer reads
    it all they resume (EV_WRITE_RESUMED) and the app's next send goes out."""
    env = {"WSMANAGER_PING_INTERVAL": "3600", "WSMANAGER_HIGH_WATER": str(128 * 1024),
           "WSMANAGER_MAX_QUEUE_BYTES": str(64 << 20), "WSMANAGER_SEND_TIMEOUT": "30"}
    with serving("echo_app", tmp_path / "server.log", env=env) as s:
        c = RawClient(s.port, timeout=10)
        c.send(frame(1, b"cmd:flood:200"))  # 12.5 MiB: more than the kernel buffers hold
        time.sleep(0.5)  # the engine is over high_water now: the app's sends wait
        c.send(frame(1, b"after the backlog"))
        for _ in range(200):
            op, payload = c.recv_data()
            assert op == 2 and len(payload) == 65536
        assert c.recv_data() == (1, b"after the backlog")
        c.close()
    assert "Traceback" not in s.log(), s.log()


def _loop_thread_slice(pid: int) -> int | None:
    """se.slice of the server's main thread (uvicorn's event loop runs there); None on kernels
    before EEVDF, which do not show one."""
    with open(f"/proc/{pid}/task/{pid}/sched") as f:
        for line in f:
            if line.startswith("se.slice"):
                return int(line.split(":")[1])
    return None


def _kernel_has_thread_slices() -> bool:
    from wsmanager import _core
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(_core.set_thread_slice(100_000)))
    t.start()
    t.join()
    return got[0] == 100_000


def test_the_event_loop_thread_gets_a_short_slice(server: AppServer, tmp_path: Path) -> None:
    """WSMANAGER_LOOP_SLICE_US (default 100 µs) is set on the loop thread at the first native
    connection (kernels without per-thread slices keep theirs, and the server still serves); 0
    leaves the kernel's default; a bad value stops the server naming the variable."""
    default = _loop_thread_slice(os.getpid())
    warm = RawClient(server.port)
    assert warm.status == 101
    assert _loop_thread_slice(server.proc.pid) == (100_000 if _kernel_has_thread_slices() else default)
    warm.close()

    with serving("echo_app", tmp_path / "off.log", env={"WSMANAGER_LOOP_SLICE_US": "0"}) as off:
        c = RawClient(off.port)
        assert c.status == 101
        assert _loop_thread_slice(off.proc.pid) == default
        c.close()

    with pytest.raises(RuntimeError, match=r"WSMANAGER_LOOP_SLICE_US='-3': must be >= 0"):
        AppServer("tests.native_support:echo_app", "native", env={"WSMANAGER_LOOP_SLICE_US": "-3"},
                  log_path=tmp_path / "bad.log")
