"""Lifecycle hooks (``on_connect``, ``on_disconnect``, ``on_join``, ``on_leave``): what each hook
receives and when it runs, on every plane and across nodes.

Part 1 runs managers of this process under Starlette's TestClient (registration errors, the
order and contents of the events, failing hooks, the paths that fire without the endpoint: a
sync route's ``join()``, ``stop()``, the stale sweep). Part 2 serves tests/hooks_app.py with
real uvicorn, stock (portable plane) and with wsmanager's protocol (native plane), whose hooks
write what they received and found to a file: closes by the peer, by the manager, a vanished
peer, a stale one, a shutdown. Part 3 runs two such nodes on one real redis-server: joins and
leaves are seen by the other node's hooks, with presence already up to date.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.testclient import TestClient

from tests import ws_commands
from tests.conftest import UVICORN_SERVER_PLANES
from tests.redis_helpers import REDIS_SERVER, RedisServer, WsClient, start_all
from tests.servers import AppServer, native_available
from wsmanager import (ConnectEvent, DisconnectEvent, JoinEvent, LeaveEvent, WebSocketManager,
                       _core)

# ================================================================== part 1: TestClient


class Recorder:
    """Hooks for every event (connect and join sync, disconnect and leave async), recording
    each event with what the manager said when the hook ran."""

    def __init__(self, manager: WebSocketManager) -> None:
        self.m = manager
        self.events: list[tuple[Any, dict]] = []
        manager.on_connect(self.sync_hook)
        manager.on_join(self.sync_hook)
        manager.on_disconnect(self.async_hook)
        manager.on_leave(self.async_hook)

    def seen(self, event: Any) -> dict:
        cid = event.connection_id
        channels = getattr(event, "channels", None) or (getattr(event, "channel", None),)
        return {"registered": cid in self.m.active_connections,
                "total": self.m.get_stats()["total_connections"],
                "members": {ch: cid in self.m.channel_members(ch) for ch in channels if ch}}

    def sync_hook(self, event: Any) -> None:
        self.events.append((event, self.seen(event)))

    async def async_hook(self, event: Any) -> None:
        await asyncio.sleep(0)  # a real await: the hook is a coroutine, not only declared one
        self.events.append((event, self.seen(event)))

    def of(self, cid: str) -> list[tuple[Any, dict]]:
        return [(e, s) for e, s in self.events if e.connection_id == cid]

    def wait(self, predicate: Callable[[], bool], timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"hooks did not fire: {self.events}"
            time.sleep(0.01)

    def disconnects(self) -> list[DisconnectEvent]:
        return [e for e, _ in self.events if isinstance(e, DisconnectEvent)]


def hooked_app(manager: WebSocketManager) -> FastAPI:
    """The seed's endpoint with tests/ws_commands.py's commands, plus a plain ``def`` route
    that joins (FastAPI runs it in a thread pool) and one that stops the manager."""
    app = FastAPI(lifespan=manager.lifespan)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        cid, user = websocket.query_params["cid"], websocket.query_params.get("user")
        if not await manager.connect(websocket, cid, user):
            return
        try:
            while True:
                n = await ws_commands.run(manager, cid, await websocket.receive_json())
                await websocket.send_json({"type": "ack", "n": None if n is ws_commands.UNKNOWN else n})
        except WebSocketDisconnect:
            pass
        finally:
            await manager.disconnect(cid)

    @app.post("/join")
    def join_from_a_thread(cid: str, channel: str) -> dict:
        return {"changed": manager.join(cid, channel)}

    @app.post("/stop")
    async def stop() -> dict:
        await manager.stop()
        return {}

    return app


def command(session: Any, **msg: Any) -> Any:
    session.send_json(msg)
    reply = session.receive_json()
    assert reply["type"] == "ack", reply
    return reply["n"]


def test_registration_errors_name_the_argument():
    manager = WebSocketManager(ping_interval=0)
    with pytest.raises(TypeError, match=r"on_connect: hook must be callable, not int"):
        manager.on_connect(42)
    with pytest.raises(TypeError, match=r"on_leave: hook .* must take one argument"):
        manager.on_leave(lambda: None)
    with pytest.raises(TypeError, match=r"on_join: hook .* must take one argument"):
        manager.on_join(lambda event, extra: None)

    @manager.on_disconnect()  # with parentheses too, as FastAPI users may write it
    async def gone(event: DisconnectEvent) -> None:
        pass

    with pytest.raises(ValueError, match=r"on_disconnect: hook .*gone is registered already"):
        manager.on_disconnect(gone)
    assert manager.on_connect(gone) is gone  # a decorator returns the function
    assert manager.remove_hook(gone) is True and manager.remove_hook(gone) is False
    manager.on_disconnect(gone)  # may be registered again once removed


def test_each_event_carries_what_happened_and_runs_after_it():
    manager = WebSocketManager(ping_interval=0)
    rec = Recorder(manager)
    with TestClient(hooked_app(manager)) as client:
        with client.websocket_connect("/ws?cid=a&user=ann") as a, \
                client.websocket_connect("/ws?cid=b&user=bob") as b:
            assert command(a, type="join", channel="room") is True
            assert command(a, type="join", channel="room") is False  # no change: no event
            assert command(a, type="join", channel="side") is True
            assert command(a, type="leave", channel="side") is True
            assert command(b, type="join", channel="room") is True
            command(b, type="kick", cid="a")  # the manager closes a: 4000 "kicked"
            with pytest.raises(WebSocketDisconnect) as closed:
                a.receive_json()
            assert closed.value.code == 4000
            rec.wait(lambda: len(rec.disconnects()) == 1)
            b.close(code=4001)  # the peer closes, with an application code
        rec.wait(lambda: len(rec.disconnects()) == 2)

    connect, join_room, join_side, leave_side, leave_room, disconnect = rec.of("a")
    assert connect == (ConnectEvent("a", "ann"), {"registered": True, "total": 1, "members": {}})
    node = manager.node_id
    assert join_room == (JoinEvent("a", "ann", "room", node, True),
                         {"registered": True, "total": 2, "members": {"room": True}})
    assert join_side[0] == JoinEvent("a", "ann", "side", node, True)
    # leave(): reason None; the room it was still in when kicked: the disconnect's reason.
    assert leave_side == (LeaveEvent("a", "ann", "side", None, node, True),
                          {"registered": True, "total": 2, "members": {"side": False}})
    assert leave_room == (LeaveEvent("a", "ann", "room", "normal", node, True),
                          {"registered": False, "total": 1, "members": {"room": False}})
    # The disconnect hook finds a gone from the registry, its channels and the stats already.
    assert disconnect == (DisconnectEvent("a", "ann", ("room",), "normal", 4000),
                          {"registered": False, "total": 1, "members": {"room": False}})
    assert rec.of("b")[-1] == (DisconnectEvent("b", "bob", ("room",), "normal", 4001),
                               {"registered": False, "total": 0, "members": {"room": False}})
    assert manager.get_stats()["disconnects"]["normal"] == 2


def test_a_failing_hook_is_logged_and_changes_nothing(caplog):
    manager = WebSocketManager(ping_interval=0)

    @manager.on_connect
    def broken(event: ConnectEvent) -> None:
        raise RuntimeError("connect hook broke")

    @manager.on_disconnect
    async def broken_too(event: DisconnectEvent) -> None:
        await asyncio.sleep(0)
        raise KeyError("disconnect hook broke")

    rec = Recorder(manager)  # registered after the broken ones: still called
    with caplog.at_level(logging.ERROR, logger="wsmanager"):
        with TestClient(hooked_app(manager)) as client:
            with client.websocket_connect("/ws?cid=a&user=ann") as a, \
                    client.websocket_connect("/ws?cid=b&user=bob") as b:
                assert command(a, type="broadcast", content="still delivered", exclude_self=True) == 1
                assert b.receive_json()["content"] == "still delivered"
            rec.wait(lambda: len(rec.disconnects()) == 2)
    assert [type(e).__name__ for e, _ in rec.of("a")] == ["ConnectEvent", "DisconnectEvent"]
    failures = [r for r in caplog.records if r.name == "wsmanager" and r.levelno == logging.ERROR]
    assert sorted(r.getMessage() for r in failures) == sorted(
        [f"ConnectEvent hook {broken.__qualname__} failed on connection {c}" for c in "ab"]
        + [f"DisconnectEvent hook {broken_too.__qualname__} failed on connection {c}" for c in "ab"])
    assert all(r.exc_info and r.exc_info[0] in (RuntimeError, KeyError) for r in failures)
    stats = manager.get_stats()
    assert stats["total_connections"] == 0 and stats["disconnects"]["normal"] == 2


def test_a_stuck_hook_holds_at_most_hook_queue_limit_events(caplog):
    """Connection churn while a hook is stuck: at most ``hook_queue_limit`` events wait, the rest
    are dropped, counted and announced by one WARNING; connections, delivery and stats are not
    affected, and once the hook returns the events after the burst are delivered again."""
    manager = WebSocketManager(ping_interval=0, max_connections_per_user=0, hook_queue_limit=3)
    release = asyncio.Event()
    seen: list[Any] = []

    @manager.on_connect
    async def stuck(event: ConnectEvent) -> None:
        seen.append(event)
        if event.connection_id == "c0":
            await release.wait()

    app = hooked_app(manager)

    @app.post("/unstick")
    async def unstick() -> dict:
        release.set()
        return {}

    with caplog.at_level(logging.WARNING, logger="wsmanager"):
        with TestClient(app) as client:
            for i in range(10):  # c0 runs and hangs, c1-c3 wait, c4-c9 are dropped
                with client.websocket_connect(f"/ws?cid=c{i}") as c:
                    assert command(c, type="noop") is None
            assert manager.get_stats()["hooks"] == {"waiting": 3, "dropped": 6}
            client.post("/unstick")
            deadline = time.monotonic() + 5
            while manager.get_stats()["hooks"]["waiting"] and time.monotonic() < deadline:
                time.sleep(0.01)
            with client.websocket_connect("/ws?cid=after") as c:
                command(c, type="noop")
            deadline = time.monotonic() + 5
            while not any(e.connection_id == "after" for e in seen) and time.monotonic() < deadline:
                time.sleep(0.01)
    assert [e.connection_id for e in seen] == ["c0", "c1", "c2", "c3", "after"]
    assert manager.get_stats()["hooks"] == {"waiting": 0, "dropped": 6}
    warnings = [r.getMessage() for r in caplog.records if r.name == "wsmanager"
                and r.levelno == logging.WARNING and "hook_queue_limit" in r.getMessage()]
    assert warnings == ["lifecycle hooks are 3 events behind (hook_queue_limit): new events are "
                        "dropped until they catch up, the first ConnectEvent of connection c4"]
    assert manager.get_stats()["total_connects"] == 11


def test_hooks_fire_from_the_managers_own_paths():
    """A ``join()`` from a thread-pool route, a stale sweep and ``stop()`` fire their events
    although no endpoint asked for them; ``stop()`` returns after its disconnect hooks ran."""
    manager = WebSocketManager(ping_interval=0, stale_timeout=0.2)
    rec = Recorder(manager)
    with TestClient(hooked_app(manager)) as client:
        with client.websocket_connect("/ws?cid=a&user=ann") as a, \
                client.websocket_connect("/ws?cid=b") as b:
            assert client.post("/join?cid=a&channel=lobby").json() == {"changed": True}
            rec.wait(lambda: any(isinstance(e, JoinEvent) for e, _ in rec.events))
            command(b, type="noop")  # b shows life; a stays silent past stale_timeout
            time.sleep(0.3)
            command(b, type="noop")
            assert client.portal.call(manager.cleanup_stale_connections) == 1
            rec.wait(lambda: len(rec.disconnects()) == 1)
            assert client.post("/stop").json() == {}
            assert len(rec.disconnects()) == 2  # before stop() returned
            with pytest.raises(WebSocketDisconnect):
                a.receive_json()
            with pytest.raises(WebSocketDisconnect) as closed:
                b.receive_json()
            assert closed.value.code == 1001
    stale, shutdown = rec.disconnects()
    assert stale == DisconnectEvent("a", "ann", ("lobby",), "stale", 1011)
    assert shutdown == DisconnectEvent("b", None, (), "shutdown", 1001)
    assert [e for e, _ in rec.of("a") if isinstance(e, LeaveEvent)] == [
        LeaveEvent("a", "ann", "lobby", "stale", manager.node_id, True)]


def test_a_connection_refused_by_the_limit_fires_nothing():
    manager = WebSocketManager(ping_interval=0, max_connections_per_user=1)
    rec = Recorder(manager)
    with TestClient(hooked_app(manager)) as client:
        with client.websocket_connect("/ws?cid=a&user=ann") as a:
            with client.websocket_connect("/ws?cid=a2&user=ann") as refused:
                with pytest.raises(WebSocketDisconnect) as closed:
                    refused.receive_json()
                assert closed.value.code == 1008
            command(a, type="noop")
    rec.wait(lambda: len(rec.disconnects()) == 1)
    assert {e.connection_id for e, _ in rec.events} == {"a"}
    assert manager.get_stats()["disconnects"]["limit"] == 1


# ================================================================== part 2: real uvicorn

APP = "tests.hooks_app:app"


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def events_until(path: Path, predicate: Callable[[list[dict]], bool],
                       timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not predicate(events := read_events(path)):
        assert time.monotonic() < deadline, f"hooks did not fire: {events}"
        await asyncio.sleep(0.05)
    return events


def of(events: list[dict], cid: str, hook: str | None = None) -> list[dict]:
    return [e for e in events if e["connection_id"] == cid and hook in (None, e["hook"])]


def raw_upgrade(port: int, query: str, path: str = "/ws") -> socket.socket:
    """A client that completes the handshake and then never reads, writes or answers a ping."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path}?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    assert b" 101 " in sock.recv(4096)
    return sock


def send_text(sock: socket.socket, text: str) -> None:
    """One masked text frame (a client's), payload under 126 bytes."""
    payload, mask = text.encode(), os.urandom(4)
    assert len(payload) < 126
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)


def reset(sock: socket.socket) -> None:
    """Vanish: a TCP reset, no close frame."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def hooks_server(plane: str, tmp_path: Path, name: str = "node", **env: str) -> tuple[AppServer, Path]:
    events = tmp_path / f"{name}-events.jsonl"
    server = AppServer(APP, plane, env={"HOOKS_EVENTS": str(events), **env}, lifespan="on",
                       log_path=tmp_path / f"{name}.log", own_session=True, start=False)
    return server, events


def assert_gone(event: dict, total: int) -> None:
    """What a disconnect hook found: the connection unregistered, in none of its channels."""
    assert event["seen"]["registered"] is False and event["seen"]["total"] == total, event
    assert event["seen"]["members"] == {ch: False for ch in event["channels"]}, event


@pytest.mark.parametrize("plane", UVICORN_SERVER_PLANES)
async def test_hooks_on_a_real_server(plane, tmp_path):
    server, path = hooks_server(plane, tmp_path)
    with server.start():
        keep = await WsClient.open(server.ws_url(), user="keep", cid="keep")
        ann = await WsClient.open(server.ws_url(), user="ann", cid="ann")
        for channel in ("room", "side"):
            await ann.command(type="join", channel=channel)
        await ann.command(type="leave", channel="side")
        await ann.close()  # a clean close by the peer
        await events_until(path, lambda ev: of(ev, "ann", "disconnect"))
        await keep.command(type="join", channel="room")
        kicked = await WsClient.open(server.ws_url(), user="bob", cid="kicked")
        await kicked.command(type="join", channel="room")
        await keep.command(type="kick", cid="kicked")
        await kicked.wait(lambda: kicked.closed is not None)
        vanishes = raw_upgrade(server.port, "user=gone&cid=gone")
        await events_until(path, lambda ev: of(ev, "gone", "connect"))
        reset(vanishes)
        await events_until(path, lambda ev: of(ev, "gone", "disconnect"))
        boom = await WsClient.open(server.ws_url(), user="boom", cid="boom")
        assert (await boom.command(type="broadcast", content="x", exclude_self=True))["n"] == 1
        await boom.close()
        events = await events_until(path, lambda ev: all(of(ev, c, "disconnect")
                                                         for c in ("ann", "kicked", "gone", "boom")))
        await keep.close()
    log = server.log()

    assert [(e["hook"], e.get("channel")) for e in of(events, "ann")] == [
        ("connect", None), ("join", "room"), ("join", "side"), ("leave", "side"),
        ("leave", "room"), ("disconnect", None)]
    connect, *_, leave_side, leave_room, gone = of(events, "ann")
    assert connect["user_id"] == "ann" and connect["seen"] == {"registered": True, "total": 2}
    assert (leave_side["reason"], leave_side["local"], leave_side["seen"]["member"]) == (None, True, False)
    assert (leave_room["reason"], leave_room["seen"]["member"]) == ("normal", False)
    assert (gone["user_id"], gone["channels"], gone["reason"], gone["code"]) == ("ann", ["room"], "normal", 1000)
    assert_gone(gone, total=1)
    assert gone["seen"]["online"] == ["keep"] and gone["seen"]["presence"] == {"room": []}

    (kick,) = of(events, "kicked", "disconnect")
    assert (kick["channels"], kick["reason"], kick["code"]) == (["room"], "normal", 4000)
    assert_gone(kick, total=1)
    assert kick["seen"]["presence"] == {"room": ["keep"]}
    (vanished,) = of(events, "gone", "disconnect")
    # The code is the server's: 1006 from the engine, 1005 (no status) from stock uvicorn.
    assert (vanished["user_id"], vanished["reason"]) == ("gone", "abrupt")
    assert vanished["code"] == (1006 if plane == "native" else 1005)
    assert_gone(vanished, total=1)
    # The failing hooks (user "boom") were logged with their tracebacks; the next ones ran.
    assert [e["hook"] for e in of(events, "boom")] == ["connect", "disconnect"]
    assert "ConnectEvent hook boom_on_connect failed on connection boom" in log
    assert "DisconnectEvent hook boom_on_disconnect failed on connection boom" in log
    assert "RuntimeError: connect hook-boom" in log and "RuntimeError: disconnect hook-boom" in log
    # Every connection announced was announced gone, once (keep's at the latest by the stop).
    events = read_events(path)
    assert sorted(e["connection_id"] for e in events if e["hook"] == "disconnect") == \
        sorted(e["connection_id"] for e in events if e["hook"] == "connect")


@pytest.mark.parametrize("plane", UVICORN_SERVER_PLANES)
async def test_stale_and_shutdown_reach_the_disconnect_hook(plane, tmp_path):
    server, path = hooks_server(plane, tmp_path, WSMANAGER_PING_INTERVAL="0.2",
                                WSMANAGER_PING_TIMEOUT="0.3")
    with server.start():
        silent = raw_upgrade(server.port, "user=quiet&cid=quiet")
        stale = (await events_until(path, lambda ev: of(ev, "quiet", "disconnect")))[-1]
        silent.close()
        stays = await WsClient.open(server.ws_url(), user="stays", cid="stays")
        await stays.command(type="join", channel="room")
        await events_until(path, lambda ev: of(ev, "stays", "join"))
        assert server.stop() == 0  # SIGINT: uvicorn closes the connection, the lifespan stop()s
    assert (stale["reason"], stale["code"], stale["channels"]) == ("stale", 1011, [])
    assert_gone(stale, total=0)
    (shutdown,) = of(read_events(path), "stays", "disconnect")
    # uvicorn closes with 1012 (the peer's websocket.disconnect), or stop() first with 1001.
    assert shutdown["reason"] == "shutdown" and shutdown["code"] in (1001, 1012), shutdown
    assert shutdown["channels"] == ["room"]
    assert_gone(shutdown, total=0)
    assert [e["reason"] for e in of(read_events(path), "stays", "leave")] == ["shutdown"]
    assert set(_core.REASONS) >= {stale["reason"], shutdown["reason"]}
    await stays.close()


# ================================================================== part 3: Redis


@pytest.fixture(scope="module")
def redis_server():
    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server is not installed (make test installs it)")
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


async def test_joins_and_leaves_are_seen_by_every_node(redis_server, tmp_path):
    """Node A on the native plane (when built), node B on stock uvicorn, one Redis: B's join
    and leave hooks hear of A's connections -- a leave(), a clean close, a vanished peer -- in
    order, after the change is recorded cluster-wide; connect and disconnect stay with the node
    that holds the connection. Each step waits for B's hook, so presence is exact."""
    env = {"WSMANAGER_REDIS_URL": redis_server.url,
           "WSMANAGER_REDIS_PREFIX": "hk" + uuid.uuid4().hex[:8],
           "WSMANAGER_REDIS_NODE_TTL": "2", "WSMANAGER_REDIS_HEARTBEAT": "0.25"}
    a, a_path = hooks_server("native" if native_available() else "uvicorn", tmp_path, "a", **env)
    b, b_path = hooks_server("uvicorn", tmp_path, "b", **env)

    async def on_b(cid: str, n: int) -> list[dict]:
        return await events_until(b_path, lambda ev: len(of(ev, cid)) >= n)

    start_all([a, b])
    try:
        ann = await WsClient.open(a.ws_url(), user="ann", cid="ann")
        bob = await WsClient.open(b.ws_url(), user="bob", cid="bob")
        a_node, b_node = ann.hello["node"], bob.hello["node"]
        await ann.command(type="join", channel="room")
        await on_b("ann", 1)
        await bob.command(type="join", channel="room")
        await on_b("bob", 2)  # its connect, its join
        for n, kind in ((2, "leave"), (3, "join")):
            await ann.command(type=kind, channel="room")
            await on_b("ann", n)
        await ann.close()
        await on_b("ann", 4)
        vanishes = raw_upgrade(a.port, "user=gone&cid=gone")
        send_text(vanishes, json.dumps({"type": "join", "channel": "room"}))
        await on_b("gone", 1)
        reset(vanishes)
        b_events = await on_b("gone", 2)
        a_events = await events_until(a_path, lambda ev: of(ev, "gone", "disconnect"))
        await bob.close()
    finally:
        a.stop()
        b.stop()

    remote = of(b_events, "ann") + of(b_events, "gone")
    assert [(e["connection_id"], e["hook"], e.get("reason")) for e in remote] == [
        ("ann", "join", None), ("ann", "leave", None), ("ann", "join", None),
        ("ann", "leave", "normal"), ("gone", "join", None), ("gone", "leave", "abrupt")]
    for e in remote:
        assert (e["channel"], e["node_id"], e["local"], e["node"]) == ("room", a_node, False, b_node)
    assert [e["user_id"] for e in remote] == ["ann"] * 4 + ["gone"] * 2
    # B's hooks ran after the change was recorded in Redis: presence already says it.
    assert [e["seen"]["presence"] for e in remote] == [
        ["ann"], ["bob"], ["ann", "bob"], ["bob"], ["bob", "gone"], ["bob"]]
    assert [e["seen"]["member"] for e in remote] == [False] * 6  # not B's connections
    # On A the same changes are local, and only A heard of its connections coming and going.
    assert [(e["hook"], e.get("local")) for e in of(a_events, "ann")] == [
        ("connect", None), ("join", True), ("leave", True), ("join", True), ("leave", True),
        ("disconnect", None)]
    assert [e["hook"] for e in b_events if e["connection_id"] in ("ann", "gone")] == [
        "join", "leave", "join", "leave", "join", "leave"]
    (gone,) = of(a_events, "gone", "disconnect")
    assert (gone["reason"], gone["channels"]) == ("abrupt", ["room"])
    assert gone["seen"]["presence"] == {"room": ["bob"]} and gone["seen"]["online"] == ["bob"]
    (bob_joined,) = of(a_events, "bob", "join")  # B's connection, seen by A's hook
    assert (bob_joined["local"], bob_joined["node_id"]) == (False, b_node)
