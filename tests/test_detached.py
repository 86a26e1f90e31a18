"""The detached shape (``WebSocketManager.serve()``): an endpoint that hands its connection to
the manager and returns, side by side with the seed's shape in one app, on every plane.

Part 1 runs a manager of this process under Starlette's TestClient (portable plane: ``serve()``
keeps the receive loop): handlers of every kind, the heartbeat, bad JSON, both shapes counted
by one limit, reached by one broadcast, closed by one ``stop()``, announced by the same hooks.
Part 2 serves tests/detached_app.py with real uvicorn, stock (portable) and with wsmanager's
protocol (native: the endpoint returns at once and the engine's events reach the handler from
the dispatcher), with its recording hooks: the same checks over real sockets, the peer's close
and loss, stale connections, ``stop()`` and the server's shutdown, and what a detached
connection leaves in Python on the native plane.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import WebSocket, WebSocketDisconnect
from fastapi.testclient import TestClient

from tests import ws_commands
from tests.conftest import UVICORN_SERVER_PLANES
from tests.redis_helpers import Rejected, WsClient
from tests.servers import AppServer
from tests.test_hooks import (Recorder, command, events_until, hooked_app, of, raw_upgrade,
                              read_events, reset)
from wsmanager import ConnectEvent, DisconnectEvent, JoinEvent, LeaveEvent, WebSocketManager

# ================================================================== part 1: TestClient


class Handlers:
    """``serve()`` handlers of every kind, each performing tests/ws_commands.py's command and
    answering an ack; every message they get is kept in ``got``."""

    def __init__(self, manager: WebSocketManager) -> None:
        self.m = manager
        self.got: list[tuple[str, Any]] = []

    async def reply(self, cid: str, data: Any) -> None:
        n = await ws_commands.run(self.m, cid, json.loads(data) if isinstance(data, str) else data)
        await self.m.send_message(cid, {"type": "ack", "n": None if n is ws_commands.UNKNOWN else n})

    def check(self, cid: str, data: Any) -> None:
        self.got.append((cid, data))
        if (json.loads(data) if isinstance(data, str) else data) == {"type": "boom"}:
            raise RuntimeError("handler-boom")

    async def task(self, cid: str, data: Any) -> None:
        self.check(cid, data)
        await asyncio.sleep(0.01)
        await self.reply(cid, data)

    async def eager(self, cid: str, data: Any) -> None:
        self.check(cid, data)
        await self.reply(cid, data)

    def sync(self, cid: str, data: Any) -> None:
        self.check(cid, data)
        asyncio.get_running_loop().create_task(self.reply(cid, data))

    async def raw(self, cid: str, data: Any) -> None:
        self.check(cid, data)
        if isinstance(data, bytes):
            await self.m.send_message(cid, {"type": "binary", "len": len(data)})
        else:
            await self.reply(cid, data)


def both_shapes_app(manager: WebSocketManager, handlers: Handlers) -> Any:
    """tests/test_hooks.py's app (the seed's endpoint at /ws, /join, /stop) plus /detached."""
    app = hooked_app(manager)

    @app.websocket("/detached")
    async def detached(websocket: WebSocket) -> None:
        cid, user = websocket.query_params["cid"], websocket.query_params.get("user")
        mode = websocket.query_params.get("mode", "task")
        await manager.serve(websocket, cid, user, getattr(handlers, mode), raw=mode == "raw")

    return app


def test_serve_checks_its_handler():
    manager = WebSocketManager(ping_interval=0)

    async def call(handler: Any) -> None:
        await manager.serve(object(), "a", None, handler)

    with pytest.raises(TypeError, match="handler must be callable, not int"):
        asyncio.run(call(42))
    with pytest.raises(TypeError, match=r"handler .* must take two arguments"):
        asyncio.run(call(lambda message: None))
    assert len(manager._registry) == 0


@pytest.mark.parametrize("mode", ["task", "eager", "sync", "raw"])
def test_every_kind_of_handler_gets_the_messages_in_order(mode, caplog):
    manager = WebSocketManager(ping_interval=0)
    handlers = Handlers(manager)
    with caplog.at_level(logging.ERROR, logger="wsmanager"):
        with TestClient(both_shapes_app(manager, handlers)) as client:
            with client.websocket_connect(f"/detached?cid=d&user=ann&mode={mode}") as d:
                for i in range(5):
                    d.send_json({"type": "noop", "i": i})
                for _ in range(5):
                    assert d.receive_json() == {"type": "ack", "n": None}
                d.send_json({"type": "boom"})  # logged, contained: the next message is handled
                d.send_json({"type": "ping"})  # the manager's: answered, not the handler's
                assert d.receive_json() == {"type": "pong"}
                d.send_json({"type": "pong"})
                d.send_json({"type": "join", "channel": "room"})
                assert d.receive_json() == {"type": "ack", "n": True}
                if mode == "raw":
                    d.send_bytes(b"\x00\x01\x02")
                    assert d.receive_json() == {"type": "binary", "len": 3}
    expected: list[Any] = [{"type": "noop", "i": i} for i in range(5)]
    expected += [{"type": "boom"}, {"type": "join", "channel": "room"}]
    if mode == "raw":  # the text frames as sent (TestClient's send_json: compact JSON)
        expected = [json.dumps(m, separators=(",", ":")) for m in expected] + [b"\x00\x01\x02"]
    assert [m for _, m in handlers.got] == expected
    failures = [r for r in caplog.records if r.name == "wsmanager" and r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failures] == [
        f"message handler {getattr(handlers, mode).__qualname__} failed on connection d"]
    assert failures[0].exc_info[0] is RuntimeError
    stats = manager.get_stats()
    assert stats["total_connections"] == 0 and stats["disconnects"]["normal"] == 1
    assert stats["messages_received"] >= 9


def test_a_text_that_is_not_json_closes_with_1007():
    manager = WebSocketManager(ping_interval=0)
    handlers = Handlers(manager)
    with TestClient(both_shapes_app(manager, handlers)) as client:
        with client.websocket_connect("/detached?cid=d&mode=eager") as d:
            d.send_text("not json")
            with pytest.raises(WebSocketDisconnect) as closed:
                d.receive_json()
            assert closed.value.code == 1007
    assert handlers.got == []
    assert manager.get_stats()["disconnects"]["protocol_error"] == 1


def test_both_shapes_in_one_app_share_limits_delivery_hooks_and_stop():
    manager = WebSocketManager(ping_interval=0, max_connections_per_user=2)
    rec = Recorder(manager)
    handlers = Handlers(manager)
    with TestClient(both_shapes_app(manager, handlers)) as client:
        with client.websocket_connect("/ws?cid=s&user=ann") as s, \
                client.websocket_connect("/detached?cid=d&user=ann") as d:
            # One per-user limit for both shapes: a third connection of ann is refused.
            for path in ("/ws?cid=s2&user=ann", "/detached?cid=d2&user=ann"):
                with client.websocket_connect(path) as refused:
                    with pytest.raises(WebSocketDisconnect) as closed:
                        refused.receive_json()
                    assert closed.value.code == 1008
            assert command(d, type="join", channel="room") is True
            assert command(s, type="join", channel="room") is True
            # A broadcast reaches both shapes, whichever sends it.
            d.send_json({"type": "broadcast", "content": "from d"})
            assert d.receive_json()["content"] == "from d"
            assert d.receive_json() == {"type": "ack", "n": 2}
            assert s.receive_json()["content"] == "from d"
            s.send_json({"type": "to_channel", "channel": "room", "content": "from s"})
            assert s.receive_json()["content"] == "from s"
            assert s.receive_json() == {"type": "ack", "n": 2}
            assert d.receive_json()["content"] == "from s"
            assert command(d, type="leave", channel="room") is True
            assert manager.get_stats()["total_connections"] == 2
            assert client.post("/stop").json() == {}  # closes both, with the shutdown code
            for ws in (s, d):
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
                assert closed.value.code == 1001
    assert [type(e).__name__ for e, _ in rec.of("d")] == [
        "ConnectEvent", "JoinEvent", "LeaveEvent", "DisconnectEvent"]
    node = manager.node_id
    connect, join, leave, gone = (e for e, _ in rec.of("d"))
    assert connect == ConnectEvent("d", "ann")
    assert join == JoinEvent("d", "ann", "room", node, True)
    assert leave == LeaveEvent("d", "ann", "room", None, node, True)
    assert gone == DisconnectEvent("d", "ann", (), "shutdown", 1001)
    assert rec.of("s")[-1][0] == DisconnectEvent("s", "ann", ("room",), "shutdown", 1001)
    assert {e.connection_id for e, _ in rec.events} == {"s", "d"}  # the refused fired nothing
    stats = manager.get_stats()
    assert stats["total_connections"] == 0
    assert stats["disconnects"]["shutdown"] == 2 and stats["disconnects"]["limit"] == 2


def test_the_peers_close_of_a_detached_connection_reaches_the_hooks():
    manager = WebSocketManager(ping_interval=0)
    rec = Recorder(manager)
    with TestClient(both_shapes_app(manager, Handlers(manager))) as client:
        with client.websocket_connect("/detached?cid=d&user=ann") as d:
            assert command(d, type="join", channel="room") is True
            d.close(code=4001)
        rec.wait(lambda: len(rec.disconnects()) == 1)
    assert rec.disconnects() == [DisconnectEvent("d", "ann", ("room",), "normal", 4001)]
    assert rec.of("d")[-1][1] == {"registered": False, "total": 0, "members": {"room": False}}


# ================================================================== part 2: real servers

APP = "tests.detached_app:app"


def detached_server(plane: str, tmp_path: Path, **env: str) -> tuple[AppServer, Path]:
    events = tmp_path / "events.jsonl"
    server = AppServer(APP, plane, env={"HOOKS_EVENTS": str(events), **env}, lifespan="on",
                       log_path=tmp_path / "server.log", own_session=True, start=False)
    return server, events


async def open_detached(server: AppServer, cid: str, user: str | None = None,
                        mode: str = "task") -> WsClient:
    """A client of /detached/{mode}/ws (its hello comes from the app's connect hook)."""
    return await WsClient.open(server.ws_url(f"/detached/{mode}"), user=user, cid=cid)


def _eager_in_task(plane: str) -> bool:
    """Whether an async handler that never suspends replies from inside a task: on the native
    plane it runs inside the dispatch, in an eager task on 3.12+ and in none before; on the
    portable plane in ``serve()``'s own (the endpoint's) task."""
    return plane != "native" or sys.version_info >= (3, 12)


@pytest.mark.parametrize("plane", UVICORN_SERVER_PLANES)
async def test_both_shapes_on_a_real_server(plane, tmp_path):
    server, path = detached_server(plane, tmp_path, WSMANAGER_MAX_CONNECTIONS_PER_USER="2")
    with server.start():
        seed = await WsClient.open(server.ws_url(), user="sam", cid="seed")
        clients = {mode: await open_detached(server, f"d-{mode}", f"u-{mode}", mode)
                   for mode in ("task", "eager", "sync", "raw")}
        for mode, client in clients.items():
            ack = await client.command(type="join", channel="room")
            assert ack is not None and ack["n"] is True, (mode, ack)
            assert ack["got"] == ("str" if mode == "raw" else "dict")
            eager = mode in ("eager", "raw")  # these two never suspend before replying
            assert ack["in_task"] is (_eager_in_task(plane) if eager else True), (mode, ack)
        # One connection's messages are handled in order, even when its handler suspends
        # longer for the earlier ones.
        task = clients["task"]
        seqs = [await task.send(type="noop", delay=0.04 * (4 - i)) for i in range(5)]
        await task.wait(lambda: all(s in task.acks for s in seqs))
        assert [s for s in task.acks if s in seqs] == seqs
        # A raising handler is logged; the connection and its next message go on.
        await clients["eager"].send(type="boom")
        assert (await clients["eager"].command(type="noop"))["n"] is None
        # A broadcast reaches both shapes, whichever sends it; a channel only its members.
        assert (await seed.command(type="broadcast", content="from seed"))["n"] == 5
        assert (await clients["sync"].command(type="to_channel", channel="room", content="in room"))["n"] == 4
        assert (await clients["raw"].command(type="broadcast", content="from raw"))["n"] == 5
        for client in (seed, *clients.values()):
            await client.wait(lambda c=client: "from raw" in c.contents("broadcast"))
            assert "from seed" in client.contents("broadcast")
            assert ("in room" in client.contents("to_channel")) is (client is not seed)
        # One per-user limit counts both shapes.
        lim = [await WsClient.open(server.ws_url(), user="lim", cid="lim-seed"),
               await open_detached(server, "lim-detached", "lim")]
        for refused in (open_detached(server, "lim-3", "lim"),
                        WsClient.open(server.ws_url(), user="lim", cid="lim-4")):
            with pytest.raises(Rejected) as closed:
                await refused
            assert closed.value.code == 1008
        # The JSON heartbeat is the manager's: a ping is answered, a pong recorded, and
        # neither reaches the handler (it would have acked).
        before = server.get("/detached/info?cid=d-task")
        await task.ws.send(json.dumps({"type": "ping"}))
        await task.wait(lambda: {"type": "pong"} in task.messages)
        await task.ws.send(json.dumps({"type": "pong"}))
        deadline = time.monotonic() + 5
        while server.get("/detached/info?cid=d-task")["last_ping"] == before["last_ping"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # On the native plane no WebSocket object remains for a detached connection.
        assert before["websocket"] is (plane != "native")
        await clients["raw"].ws.send(b"\x01\x02")
        await clients["raw"].wait(lambda: {"type": "binary", "len": 2} in clients["raw"].messages)
        # The peer's close, the peer's loss, the manager's close.
        await task.close()
        await events_until(path, lambda ev: of(ev, "d-task", "disconnect"))
        vanishes = raw_upgrade(server.port, "user=gone&cid=gone", "/detached/eager/ws")
        await events_until(path, lambda ev: of(ev, "gone", "connect"))
        reset(vanishes)
        await events_until(path, lambda ev: of(ev, "gone", "disconnect"))
        await seed.command(type="kick", cid="d-sync")
        await clients["sync"].wait(lambda: clients["sync"].closed is not None)
        assert clients["sync"].closed[0] == 4000
        await events_until(path, lambda ev: of(ev, "d-sync", "disconnect"))
        for client in (seed, clients["eager"], clients["raw"], *lim):
            await client.close()
        events = await events_until(path, lambda ev: all(
            of(ev, c, "disconnect") for c in ("seed", "d-eager", "d-raw", "lim-seed", "lim-detached")))
    log = server.log()

    assert [(e["hook"], e.get("channel")) for e in of(events, "d-task")] == [
        ("connect", None), ("join", "room"), ("leave", "room"), ("disconnect", None)]
    gone = of(events, "d-task", "disconnect")[0]
    assert (gone["user_id"], gone["channels"], gone["reason"], gone["code"]) == ("u-task", ["room"], "normal", 1000)
    assert gone["seen"]["registered"] is False and gone["seen"]["members"] == {"room": False}
    (vanished,) = of(events, "gone", "disconnect")
    assert vanished["reason"] == "abrupt" and vanished["code"] == (1006 if plane == "native" else 1005)
    (kicked,) = of(events, "d-sync", "disconnect")
    assert (kicked["reason"], kicked["code"], kicked["channels"]) == ("normal", 4000, ["room"])
    assert "message handler on_eager failed on connection d-eager" in log
    assert "RuntimeError: handler-boom" in log
    assert not [e for e in events if e["connection_id"] in ("lim-3", "lim-4")]
    # Every connection announced was announced gone, once.
    events = read_events(path)
    assert sorted(e["connection_id"] for e in events if e["hook"] == "disconnect") == \
        sorted(e["connection_id"] for e in events if e["hook"] == "connect")


@pytest.mark.parametrize("plane", UVICORN_SERVER_PLANES)
async def test_stop_and_the_servers_shutdown_close_both_shapes(plane, tmp_path):
    server, path = detached_server(plane, tmp_path)
    with server.start():
        seed = await WsClient.open(server.ws_url(), user="sam", cid="seed")
        det = await open_detached(server, "det", "dan", "eager")
        await det.command(type="join", channel="room")
        assert server.post("/stop") == {}
        for client in (seed, det):
            await client.wait(lambda c=client: c.closed is not None)
            assert client.closed[0] == 1001
        await events_until(path, lambda ev: of(ev, "seed", "disconnect") and of(ev, "det", "disconnect"))
        seed2 = await WsClient.open(server.ws_url(), user="sam", cid="seed2")
        det2 = await open_detached(server, "det2", "dan", "task")
        await det2.command(type="join", channel="room")
        assert server.stop() == 0  # SIGINT: uvicorn closes every connection, then the lifespan
    events = read_events(path)
    for cid in ("seed", "det"):
        (gone,) = of(events, cid, "disconnect")
        assert (gone["reason"], gone["code"]) == ("shutdown", 1001), gone
    for cid in ("seed2", "det2"):
        (gone,) = of(events, cid, "disconnect")
        # uvicorn closes with 1012 (native: the protocol, or the detached group), or the
        # lifespan's stop() first with 1001.
        assert gone["reason"] == "shutdown" and gone["code"] in (1001, 1012), gone
    assert of(events, "det2", "leave")[0]["reason"] == "shutdown"
    for client in (seed, det, seed2, det2):
        await client.close()


@pytest.mark.parametrize("plane", UVICORN_SERVER_PLANES)
async def test_the_heartbeat_and_the_stale_sweep_cover_detached_connections(plane, tmp_path):
    server, path = detached_server(plane, tmp_path, WSMANAGER_PING_INTERVAL="0.2",
                                   WSMANAGER_PING_TIMEOUT="0.3")
    with server.start():
        silent = raw_upgrade(server.port, "user=quiet&cid=quiet", "/detached/task/ws")
        live = await open_detached(server, "live", "liv", "eager")
        await live.wait(lambda: any(m.get("type") == "ping" for m in live.messages))
        stale = (await events_until(path, lambda ev: of(ev, "quiet", "disconnect")))[-1]
        silent.close()
        await live.close()
    assert (stale["reason"], stale["code"]) == ("stale", 1011)
    assert stale["seen"]["registered"] is False


@pytest.mark.skipif("native" not in UVICORN_SERVER_PLANES, reason="the native plane is not built")
def test_a_detached_connection_leaves_next_to_nothing_in_python(tmp_path):
    """GC-tracked objects per idle connection on the native plane: the detached shape's one
    record against the seed shape's suspended stack (issue 14's target: at most 2)."""
    server, _ = detached_server("native", tmp_path, WSMANAGER_PING_INTERVAL="3600")
    n = 200

    def per_connection(path: str, prefix: str) -> float:
        warm = [raw_upgrade(server.port, f"cid={prefix}w{i}", path) for i in range(10)]
        for sock in warm:
            sock.close()
        wait_for(lambda: server.get("/detached/objects")["connections"] == 0)
        before = server.get("/detached/objects")["objects"]
        socks = [raw_upgrade(server.port, f"cid={prefix}{i}", path) for i in range(n)]
        wait_for(lambda: server.get("/detached/objects")["connections"] == n)
        time.sleep(0.3)  # the connect hooks' lane has finished
        after = server.get("/detached/objects")["objects"]
        for sock in socks:
            sock.close()
        wait_for(lambda: server.get("/detached/objects")["connections"] == 0)
        return (after - before) / n

    with server.start():
        detached_cost = per_connection("/detached/eager/ws", "d")
        seed_cost = per_connection("/ws", "s")
    assert detached_cost <= 2, detached_cost
    assert seed_cost > 20 * max(detached_cost, 1), (seed_cost, detached_cost)


def wait_for(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)
