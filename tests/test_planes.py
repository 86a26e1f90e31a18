"""Manager behaviour, one test body per behaviour, run on every plane (TestClient in-process,
stock uvicorn, native uvicorn, hypercorn, granian, daphne) through the same small client API.

Every body runs on every plane and server: those whose outcome depends on the server (the
close codes a client gets -- daphne refuses 1001-2999 --, the disconnect reasons, the stale
close, unregistered *and* closed) as much as those about the manager's own bookkeeping
(resolving targets, counters, the JSON heartbeat, send order), which a server could still break
through its ASGI ``send`` and ``receive``.
"""
from __future__ import annotations

import contextlib
import socket
import struct
import time
from typing import Any, Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.conftest import (PEER_CODE_UNREPORTED, PORTABLE_PLANES, SyncClient,
                            close_as_seen)
from tests.wsapp import app

HEARTBEAT_ENV = {"WSMANAGER_PING_INTERVAL": "0.2", "WSMANAGER_PING_TIMEOUT": "0.3"}


class Harness:
    """Opens clients and reads server-side state, whatever the plane."""

    def __init__(self, plane: str, start_server: Callable, env: dict[str, str], manager: Any) -> None:
        self.plane = plane
        if plane == "testclient":
            opts = {"ping_interval": float(env.get("WSMANAGER_PING_INTERVAL", 30)),
                    "ping_timeout": float(env.get("WSMANAGER_PING_TIMEOUT", 10)),
                    "max_connections_per_user": int(env.get("WSMANAGER_MAX_CONNECTIONS_PER_USER", 5))}
            manager.configure(**opts)
            self.client = TestClient(app)
            self.client.__enter__()  # one portal: every session shares one event loop
        else:
            self.server = start_server("tests.wsapp:app", plane, env)

    @contextlib.contextmanager
    def connect(self, user: str | None = None, cid: str | None = None) -> Iterator[SyncClient]:
        query = "&".join(f"{k}={v}" for k, v in (("user", user), ("cid", cid)) if v)
        path = "/ws" + (f"?{query}" if query else "")
        if self.plane == "testclient":
            with self.client.websocket_connect(path) as ws:
                yield SyncClient(ws, "testclient")
        else:
            with ws_connect(self.server.ws_url(path), open_timeout=10, max_size=None) as ws:
                yield SyncClient(ws, "real")

    def stats(self) -> dict:
        if self.plane == "testclient":
            return self.client.get("/stats").json()
        return self.server.get("/stats")

    def wait_stats(self, pred: Callable[[dict], bool], timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if pred(s) or time.monotonic() > deadline:
                return s
            time.sleep(0.05)

    def close(self) -> None:
        if self.plane == "testclient":
            self.client.__exit__(None, None, None)


@pytest.fixture
def harness(plane, start_server, reset_ws_manager):
    made: list[Harness] = []

    def make(**env: str) -> Harness:
        h = Harness(plane, start_server, env, reset_ws_manager)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def expect_close(client: SyncClient, timeout: float = 10) -> tuple[int, str]:
    """Reads (skipping pings) until the server closes; returns (code, reason)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = client.receive_json(timeout=timeout)
            assert msg.get("type") == "ping", msg
    except WebSocketDisconnect as exc:
        return exc.code, exc.reason
    except ConnectionClosed as exc:
        return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
    raise AssertionError("the server did not close the connection")


def whoami(c: SyncClient) -> str:
    c.send_json({"type": "whoami"})
    return c.receive_until("whoami")["connection_id"]


def test_per_user_limit_closes_with_1008(harness):
    h = harness(WSMANAGER_MAX_CONNECTIONS_PER_USER="2")
    limits_before = h.stats()["disconnects"]["limit"]
    with h.connect("ann") as a, h.connect("ann") as b:
        whoami(a), whoami(b)
        with h.connect("ann") as c:
            assert expect_close(c) == close_as_seen(h.plane, 1008, "Connection limit reached")
        with h.connect("bob") as d:  # other users are unaffected
            whoami(d)
        s = h.stats()
        assert s["connections_by_user"] == {"ann": 2}
        assert s["disconnects"]["limit"] == limits_before + 1
    with h.connect("ann") as e:  # a slot freed up
        whoami(e)


def test_broadcast_with_exclude_reaches_exactly_the_others(harness):
    h = harness()
    with h.connect("u1") as a, h.connect("u2") as b, h.connect("u3") as c:
        for x in (a, b, c):
            whoami(x)
        a.send_json({"type": "broadcast", "content": "hi"})
        assert a.receive_until("broadcast_done")["count"] == 2
        for x in (b, c):
            assert x.receive_until("broadcast") == {"type": "broadcast", "content": "hi"}
        # the sender got nothing but its receipt: the next thing it sees is its own echo
        a.send_json({"type": "message", "content": "after"})
        assert a.receive_until("message")["content"] == "after"


def test_send_to_user_reaches_all_of_a_users_connections(harness):
    h = harness()
    with h.connect("amy") as a1, h.connect("amy") as a2, h.connect("ben") as b:
        for x in (a1, a2, b):
            whoami(x)
        b.send_json({"type": "to_user", "user": "amy", "content": "psst"})
        assert b.receive_until("to_user_done")["count"] == 2
        assert a1.receive_until("direct")["content"] == "psst"
        assert a2.receive_until("direct")["content"] == "psst"
        b.send_json({"type": "to_user", "user": "nobody", "content": "x"})
        assert b.receive_until("to_user_done")["count"] == 0


def test_channels(harness):
    h = harness()
    with h.connect("a") as a, h.connect("b") as b, h.connect("c") as c:
        for x, ch in ((a, "room"), (b, "room"), (c, "other")):
            x.send_json({"type": "join", "channel": ch})
            x.receive_until("joined")
        assert h.stats()["channels"] == {"room": 2, "other": 1}
        a.send_json({"type": "channel", "channel": "room", "content": "hello room"})
        assert a.receive_until("channel_done")["count"] == 1
        assert b.receive_until("channel")["content"] == "hello room"
        b.send_json({"type": "leave", "channel": "room"})
        b.receive_until("left")
        a.send_json({"type": "channel", "channel": "room", "content": "anyone?"})
        assert a.receive_until("channel_done")["count"] == 0
        c.send_json({"type": "message", "content": "c saw nothing"})
        assert c.receive_until("message")["content"] == "c saw nothing"
    s = h.wait_stats(lambda s: s["total_connections"] == 0)
    assert s["total_channels"] == 0 and s["channels"] == {}


def test_get_stats_values(harness):
    h = harness()
    before = h.stats()
    with h.connect("x") as a, h.connect("x") as b, h.connect(None) as c:
        for cl in (a, b, c):
            whoami(cl)
        a.send_json({"type": "message", "content": "1234"})
        a.receive_until("message")
        # the client may have the echo before the manager counted it (granian answers the ASGI
        # send after writing to the socket): counters are read once they settled
        s = h.wait_stats(lambda s: s["messages_sent"] > before["messages_sent"])
        assert s["total_connections"] == 3
        assert s["total_users"] == 1
        assert s["connections_by_user"] == {"x": 2}
        assert s["messages_received"] - before["messages_received"] == 4  # 3 whoamis + 1 message
        assert s["messages_sent"] - before["messages_sent"] == 1  # the echo (whoami answers are direct sends)
        assert s["bytes_sent"] - before["bytes_sent"] == len('{"type":"message","content":"1234"}')
        assert set(s["disconnects"]) == {"normal", "abrupt", "stale", "limit", "slow_consumer",
                                         "protocol_error", "shutdown"}
    s = h.wait_stats(lambda s: s["total_connections"] == 0)
    assert s["total_connections"] == 0 and s["connections_by_user"] == {}
    assert s["disconnects"]["normal"] - before["disconnects"]["normal"] == 3


@pytest.mark.parametrize("plane", PORTABLE_PLANES, indirect=True)
def test_silent_client_is_closed_as_stale(harness):
    """A client that never answers the JSON ping is closed (1011), not only forgotten, so it
    can reconnect -- on daphne too, which refuses 1011 (it gets 4011). (On the native plane
    liveness is the RFC 6455 ping, which every client answers by itself: see
    test_native_protocol's stale test.)"""
    h = harness(**HEARTBEAT_ENV)
    stale_before = h.stats()["disconnects"]["stale"]
    with h.connect("quiet") as q:
        started = time.monotonic()
        code, _ = expect_close(q, timeout=10)
        assert code == close_as_seen(h.plane, 1011, "")[0]
        assert time.monotonic() - started < 5
    s = h.wait_stats(lambda s: s["disconnects"]["stale"] > stale_before)
    assert s["disconnects"]["stale"] == stale_before + 1
    assert s["total_connections"] == 0


def test_client_answering_pings_stays_across_ten_intervals(harness):
    h = harness(**HEARTBEAT_ENV)
    stale_before = h.stats()["disconnects"]["stale"]
    with h.connect("alive") as a:
        pings = 0
        deadline = time.monotonic() + 10
        while pings < 10 and time.monotonic() < deadline:
            msg = a.receive_json()
            if msg["type"] == "ping":
                pings += 1
                a.send_json({"type": "pong"})
        assert pings == 10
        a.send_json({"type": "message", "content": "reachable"})
        assert a.receive_until("message")["content"] == "reachable"
        s = h.stats()
        assert s["connections_by_user"] == {"alive": 1}
        assert s["disconnects"]["stale"] == stale_before


def test_direct_sends_and_manager_sends_keep_their_order(harness):
    """``websocket.send_json()`` in the endpoint and ``ws_manager.send_message()`` to the same
    connection go out in the order they were called (on the native plane: one out-queue)."""
    h = harness()
    with h.connect("o") as c:
        c.send_json({"type": "interleave", "count": 200})
        got = [c.receive_until("seq")["seq"] for _ in range(200)]
        assert got == list(range(200))


def _drop_without_close(h: Harness, cid: str) -> None:
    """A client that completes the handshake, is registered, then vanishes: TCP reset, no
    close frame."""
    sock = socket.create_connection(("127.0.0.1", h.server.port), timeout=10)
    sock.sendall(f"GET /ws?user=gone&cid={cid} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    assert b" 101 " in sock.recv(4096)
    assert h.wait_stats(lambda s: "gone" in s["connections_by_user"])["connections_by_user"] == {"gone": 1}
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # linger 0: a reset


def test_who_closed_first_decides_the_disconnect_reason(harness):
    """A close by the peer counts as "normal" (hypercorn reports it as 1006), a close by the
    manager with any code reaches the client (daphne: 1001 as 4001) and counts as the
    manager's reason, and a peer that vanishes counts as "abrupt" -- except on hypercorn,
    whose 1006 cannot tell it from a clean close (``PEER_CODE_UNREPORTED``)."""
    h = harness()
    before = h.stats()["disconnects"]
    with h.connect("p", cid="peer-closes") as a:
        whoami(a)
    with h.connect("k", cid="kicked") as k, h.connect("o", cid="kicker") as o:
        whoami(k), whoami(o)
        o.send_json({"type": "kick", "target": "kicked", "code": 1001, "reason": "going away"})
        assert expect_close(k) == close_as_seen(h.plane, 1001, "going away")
        assert o.receive_until("kicked")["target"] == "kicked"
    dropped = h.plane != "testclient"
    if dropped:
        _drop_without_close(h, "vanishes")
    s = h.wait_stats(lambda s: s["total_connections"] == 0)
    assert s["total_connections"] == 0
    delta = {k: v - before[k] for k, v in s["disconnects"].items()}
    abrupt = int(dropped and h.plane not in PEER_CODE_UNREPORTED)
    assert delta == {"normal": 3 + int(dropped) - abrupt, "abrupt": abrupt, "stale": 0, "limit": 0,
                     "slow_consumer": 0, "protocol_error": 0, "shutdown": 0}, h.plane
