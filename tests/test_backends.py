"""The backend contract (``wsmanager.backends``): what the manager does with ``LocalBackend``, the
backend every manager has unless given another, and with a custom backend written only against
``Backend`` and ``BackendHost`` (tests/memory_backend.py): two managers in one process sharing
deliveries, the per-user limit, presence and stats, through TestClient."""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.testclient import TestClient

from tests import ws_commands
from tests.memory_backend import MemoryBackend, MemoryHub
from wsmanager import WebSocketManager
from wsmanager.backends import Backend, BackendHost, LocalBackend


class FakeHost:
    node_id = "n-local"

    def __init__(self) -> None:
        self.delivered: list[dict] = []

    async def deliver(self, envelope: dict) -> int:
        self.delivered.append(envelope)
        return 0

    def local_stats(self) -> dict[str, Any]:
        return {"total_connections": 2, "backend": {"type": "local"}}

    def local_users(self) -> set[str]:
        return {"ann", "bob"}

    def local_channel_users(self, channel: str) -> set[str]:
        return {"ann"} if channel == "room" else set()


# ---- LocalBackend --------------------------------------------------------------------------

async def test_local_backend_answers_for_this_process_alone():
    host = FakeHost()
    assert isinstance(host, BackendHost)
    backend = LocalBackend()
    assert backend.spans_processes is False and Backend.spans_processes is True
    # Before it has a host: nobody, no figures; its stats are fixed.
    assert await backend.online_users() == set() and backend.cluster_stats() == {}
    assert backend.stats() == {"type": "local"}
    await backend.start(host)
    # Admission: the manager has checked the local limits; there is no one else to count.
    assert await backend.reserve("c1", "ann", 1) and await backend.reserve("c2", "ann", 1)
    assert await backend.reserve("c3", None, 0)
    for call in (backend.release("c1", "ann"), backend.joined("c2", "ann", "room"),
                 backend.left("c2", "ann", "room"),
                 backend.publish({"kind": "all", "node": "n-local", "text": "x"})):
        assert await call is None
    assert host.delivered == []  # publish goes nowhere, least of all back home
    assert await backend.online_users() == {"ann", "bob"}
    assert await backend.channel_members("room") == {"ann"}
    assert backend.cluster_stats() == host.local_stats()  # a cluster of one
    await backend.stop()
    assert backend.stats() == {"type": "local"}


class RecordingLocal(LocalBackend):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def start(self, host: BackendHost) -> None:
        self.calls.append("start")
        assert isinstance(host, BackendHost)
        await super().start(host)

    async def stop(self) -> None:
        self.calls.append("stop")

    async def reserve(self, connection_id: str, user_id: str | None, max_per_user: int | None) -> bool:
        self.calls.append("reserve")
        return True

    async def release(self, connection_id: str, user_id: str | None) -> None:
        self.calls.append("release")

    async def joined(self, connection_id: str, user_id: str | None, channel: str) -> None:
        self.calls.append("joined")

    async def publish(self, envelope: dict) -> None:
        self.calls.append("publish")


async def serve(manager: WebSocketManager, websocket: WebSocket,
                session: Callable[[str], Awaitable[None]]) -> None:
    """Registers ``websocket`` with ``manager`` (``?cid=&user=``), runs ``session(cid)`` until the
    client leaves, then unregisters it."""
    cid, user = websocket.query_params["cid"], websocket.query_params.get("user")
    if not await manager.connect(websocket, cid, user):
        return
    try:
        await session(cid)
    except WebSocketDisconnect:
        pass
    finally:
        await manager.disconnect(cid)


def one_endpoint(manager: WebSocketManager, results: dict) -> FastAPI:
    app = FastAPI(lifespan=manager.lifespan)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        async def session(cid: str) -> None:
            while True:
                command = await websocket.receive_text()
                if command == "join":
                    manager.join(cid, "room")
                elif command == "broadcast":
                    await manager.broadcast({"type": "b"})
                elif command == "probe":
                    results["unknown"] = await manager.send_message("nobody", "x")
                    await manager.disconnect("nobody")
                    results["online"] = await manager.online_users()
                    results["room"] = await manager.channel_presence("room")
                    results["stats"] = manager.get_stats()
                    results["cluster"] = manager.get_stats(scope="cluster")
                await websocket.send_text("ok")

        await serve(manager, websocket, session)

    return app


def test_the_default_backend_is_local_and_changes_nothing():
    manager = WebSocketManager(ping_interval=0)
    assert type(manager._backend) is LocalBackend
    assert manager.get_stats()["backend"] == {"type": "local"}
    results: dict = {}
    with TestClient(one_endpoint(manager, results)) as client:
        with client.websocket_connect("/ws?cid=a&user=ann") as a, \
                client.websocket_connect("/ws?cid=b") as b:
            for command in ("join", "probe"):
                a.send_text(command)
                assert a.receive_text() == "ok"
            b.send_text("ping")
            assert b.receive_text() == "ok"
    assert results["unknown"] is False  # nothing elsewhere to send it to
    assert results["online"] == ["ann"] and results["room"] == ["ann"]
    assert results["stats"]["backend"] == {"type": "local"}
    cluster, local = results["cluster"], results["stats"]
    assert set(cluster) == set(local) and cluster["backend"] == {"type": "local"}
    assert cluster["total_connections"] == local["total_connections"] == 2
    assert cluster["channels"] == local["channels"] == {"room": 1}


def test_a_backend_that_spans_no_processes_hears_of_no_message():
    backend = RecordingLocal()
    manager = WebSocketManager(ping_interval=0, backend=backend)
    with TestClient(one_endpoint(manager, {})) as client:
        with client.websocket_connect("/ws?cid=a&user=ann") as a:
            for command, replies in (("join", ["ok"]), ("broadcast", ['{"type":"b"}', "ok"]),
                                     ("probe", ["ok"])):
                a.send_text(command)
                assert [a.receive_text() for _ in replies] == replies
    # start, one reserve per connection, stop: no envelope, no bookkeeping task.
    assert backend.calls == ["start", "reserve", "stop"]


def test_a_backend_must_be_a_backend():
    with pytest.raises(TypeError, match="wsmanager.backends.Backend"):
        WebSocketManager(backend=object())


# ---- a custom backend: two managers, one in-memory bus --------------------------------------

def two_nodes(max_per_user: int = 2) -> tuple[FastAPI, dict[str, WebSocketManager]]:
    hub = MemoryHub()
    managers = {name: WebSocketManager(ping_interval=0, max_connections_per_user=max_per_user,
                                       backend=MemoryBackend(hub)) for name in ("a", "b")}

    async def lifespan(app: FastAPI):
        for m in managers.values():
            await m.start()
        yield
        for m in managers.values():
            await m.stop()

    app = FastAPI(lifespan=lifespan)

    @app.websocket("/{node}/ws")
    async def ws(websocket: WebSocket, node: str):
        manager = managers[node]

        async def session(cid: str) -> None:
            while True:
                data = await websocket.receive_json()
                n: Any = None
                if data["type"] == "noop":  # (not "ping": the manager answers that one itself)
                    pass
                elif data["type"] == "view":
                    await asyncio.sleep(0)  # the join/release tasks spawned before run first
                    n = {"online": await manager.online_users(),
                         "room": await manager.channel_presence("room"),
                         "cluster": manager.get_stats(scope="cluster"),
                         "backend": manager.get_stats()["backend"]}
                else:
                    n = await ws_commands.run(manager, cid, data)
                    assert n is not ws_commands.UNKNOWN, data
                await websocket.send_json({"type": "ack", "n": n})

        await serve(manager, websocket, session)

    return app, managers


def command(session: Any, **msg: Any) -> Any:
    """Send a command; return its ack's value. Whatever arrived before the ack is an error."""
    session.send_json(msg)
    reply = session.receive_json()
    assert reply["type"] == "ack", reply
    return reply["n"]


def contents(session: Any, n: int) -> list[tuple[str, Any]]:
    return [(m["type"], m["content"]) for m in (session.receive_json() for _ in range(n))]


def test_two_managers_share_deliveries_through_a_custom_backend():
    app, managers = two_nodes()
    with TestClient(app) as client:
        with client.websocket_connect("/a/ws?cid=a1&user=ann") as a1, \
                client.websocket_connect("/a/ws?cid=a2&user=bob") as a2, \
                client.websocket_connect("/b/ws?cid=b1&user=bob") as b1, \
                client.websocket_connect("/b/ws?cid=b2") as b2:
            # A broadcast: local receivers counted, the other manager's delivered too, once.
            assert command(a1, type="broadcast", content="hi", exclude_self=True) == 1
            for other in (a2, b1, b2):
                assert contents(other, 1) == [("broadcast", "hi")]
            assert command(b2, type="to_user", user="bob", content="for-bob") == 1
            assert contents(a2, 1) == [("to_user", "for-bob")]
            assert contents(b1, 1) == [("to_user", "for-bob")]
            # A connection held by the other manager: reached, and True.
            assert command(a1, type="to_conn", cid="b2", content="direct") is True
            assert contents(b2, 1) == [("to_conn", "direct")]
            assert command(b2, type="join", channel="room") is True
            assert command(a2, type="join", channel="room") is True
            assert command(a2, type="to_channel", channel="room", content="c",
                           exclude_self=True) == 0
            assert contents(b2, 1) == [("to_channel", "c")]
            # Presence and stats are the cluster's.
            view = command(b1, type="view")
            assert view["online"] == ["ann", "bob"] and view["room"] == ["bob"]
            assert view["cluster"]["total_connections"] == 4 and view["cluster"]["nodes"] == 2
            assert view["cluster"]["connections_by_user"] == {"ann": 1, "bob": 2}
            assert view["backend"]["type"] == "memory"
            assert view["backend"]["node"] == managers["b"].node_id
            # Nothing arrived twice: each client's next message is its own ack.
            for session in (a1, a2, b1, b2):
                assert command(session, type="noop") is None
            # disconnect() of a connection the other manager holds closes it there.
            command(a1, type="kick", cid="b2")
            with pytest.raises(WebSocketDisconnect) as closed:
                b2.receive_json()
            assert closed.value.code == 4000
    for manager in managers.values():
        stats = manager.get_stats()["backend"]
        assert stats["delivery_errors"] == 0 and stats["received"] >= stats["delivered"] > 0


def test_the_per_user_limit_spans_both_managers():
    app, managers = two_nodes(max_per_user=1)
    with TestClient(app) as client:
        with client.websocket_connect("/a/ws?cid=a1&user=ann") as a1:
            with client.websocket_connect("/b/ws?cid=b1&user=ann") as b1:
                with pytest.raises(WebSocketDisconnect) as closed:
                    b1.receive_json()
                assert closed.value.code == 1008
            assert managers["b"].get_stats()["backend"]["reserve_rejected"] == 1
            assert command(a1, type="noop") is None
        # Released when a1 went away: the user's one slot is free on the other manager.
        with client.websocket_connect("/b/ws?cid=b2&user=ann") as b2:
            assert command(b2, type="view")["online"] == ["ann"]
