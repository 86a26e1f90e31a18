"""The manager against ASGI servers' quirks, in-process: a fake server that refuses close codes
as daphne does, one that reports 1006 for every close by the peer as hypercorn does, and the
code a server reports after the application closed first (the same behaviours run on the real
servers in test_planes.py)."""
from __future__ import annotations

import asyncio
import logging
import sys
import types

import pytest
from starlette.websockets import WebSocket

from wsmanager import WebSocketManager
from wsmanager import manager as manager_module


class FakeServer:
    """The ASGI side of one WebSocket: records what the app sends, refuses what ``refuse``
    says, and hands the app the events queued with ``push``."""

    def __init__(self, refuse=lambda event: None) -> None:
        self.sent: list[dict] = []
        self.refuse = refuse
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.inbox.put_nowait({"type": "websocket.connect"})

    async def send(self, event: dict) -> None:
        error = self.refuse(event)
        if error is not None:
            raise error
        self.sent.append(event)

    async def receive(self) -> dict:
        return await self.inbox.get()

    def push(self, event: dict) -> None:
        self.inbox.put_nowait(event)

    def websocket(self) -> WebSocket:
        scope = {"type": "websocket", "path": "/ws", "headers": [], "query_string": b"",
                 "subprotocols": []}
        return WebSocket(scope, self.receive, self.send)

    def closes(self) -> list[dict]:
        return [e for e in self.sent if e["type"] == "websocket.close"]


def autobahn_like(event: dict) -> Exception | None:
    """daphne's autobahn: sendClose refuses every code but 1000 and 3000-4999."""
    code = event.get("code")
    if event["type"] == "websocket.close" and code is not None and code != 1000 and not 3000 <= code <= 4999:
        return Exception(f"invalid close code {code} (must be 1000 or from [3000, 4999])")
    return None


@pytest.mark.parametrize("code, seen", [(1001, 4001), (1008, 4008), (1011, 4011), (1012, 4012),
                                        (1000, 1000), (4321, 4321)])
async def test_a_refused_close_code_falls_back_and_the_connection_still_ends(code, seen):
    manager = WebSocketManager(ping_interval=0)
    server = FakeServer(autobahn_like)
    ws = server.websocket()
    assert await manager.connect(ws, "c1")
    await manager.disconnect("c1", code, "bye")
    assert server.closes() == [{"type": "websocket.close", "code": seen, "reason": "bye"}]
    assert "c1" not in manager.active_connections


async def test_the_per_user_limit_is_closed_on_a_strict_server():
    manager = WebSocketManager(ping_interval=0, max_connections_per_user=1)
    first, second = FakeServer(autobahn_like), FakeServer(autobahn_like)
    assert await manager.connect(first.websocket(), "a", "ann")
    assert not await manager.connect(second.websocket(), "b", "ann")
    assert second.closes() == [{"type": "websocket.close", "code": 4008, "reason": "Connection limit reached"}]
    assert manager.get_stats()["disconnects"]["limit"] == 1


async def test_stale_and_shutdown_closes_reach_a_strict_server():
    manager = WebSocketManager(ping_interval=0, stale_timeout=0.01)
    stale, other = FakeServer(autobahn_like), FakeServer(autobahn_like)
    assert await manager.connect(stale.websocket(), "stale")
    await asyncio.sleep(0.05)
    assert await manager.connect(other.websocket(), "other")
    assert await manager.cleanup_stale_connections() == 1
    assert stale.closes() == [{"type": "websocket.close", "code": 4011, "reason": "stale connection"}]
    await manager.stop()
    assert other.closes() == [{"type": "websocket.close", "code": 4001, "reason": "server shutdown"}]


async def test_a_server_that_takes_no_code_gets_a_bare_close_and_one_that_takes_nothing_a_warning(caplog):
    manager = WebSocketManager(ping_interval=0)
    picky = FakeServer(lambda e: Exception("no codes") if e["type"] == "websocket.close" and "code" in e else None)
    assert await manager.connect(picky.websocket(), "p")
    await manager.disconnect("p", 1008, "x")
    assert picky.closes() == [{"type": "websocket.close"}]

    hopeless = FakeServer(lambda e: Exception("never") if e["type"] == "websocket.close" else None)
    assert await manager.connect(hopeless.websocket(), "h")
    with caplog.at_level(logging.WARNING, logger="wsmanager"):
        await manager.disconnect("h", 1008, "x")
    assert "could not close connection h" in caplog.text


async def test_a_close_that_finds_the_peer_gone_is_not_retried():
    manager = WebSocketManager(ping_interval=0)
    gone = FakeServer(lambda e: ConnectionResetError() if e["type"] == "websocket.close" else None)
    assert await manager.connect(gone.websocket(), "g")
    await manager.disconnect("g", 1011, "x")
    assert gone.closes() == []


async def _reason_after(manager: WebSocketManager, server: FakeServer, event: dict,
                        app_closes_first: bool = False) -> str:
    ws = server.websocket()
    assert await manager.connect(ws, "r")
    if app_closes_first:
        await ws.close(1000)
    before = manager.get_stats()["disconnects"]
    server.push(event)
    assert (await ws._receive())["type"] == "websocket.disconnect"
    after = manager.get_stats()["disconnects"]
    (reason,) = [k for k in after if after[k] != before[k]]
    return reason


async def test_the_peer_close_code_decides_the_reason():
    manager = WebSocketManager(ping_interval=0)
    assert await _reason_after(manager, FakeServer(), {"type": "websocket.disconnect", "code": 1001}) == "normal"
    assert await _reason_after(manager, FakeServer(), {"type": "websocket.disconnect", "code": 1006}) == "abrupt"
    assert await _reason_after(manager, FakeServer(), {"type": "websocket.disconnect", "code": 1002}) == "protocol_error"


async def test_after_the_app_closed_first_the_servers_code_is_not_the_peers():
    """granian reports 1005 once the app has closed (hypercorn 1000): still a normal close."""
    manager = WebSocketManager(ping_interval=0)
    reason = await _reason_after(manager, FakeServer(), {"type": "websocket.disconnect", "code": 1005},
                                 app_closes_first=True)
    assert reason == "normal"


async def test_on_hypercorn_a_1006_is_only_the_peer_closing(monkeypatch):
    manager = WebSocketManager(ping_interval=0)
    monkeypatch.setitem(sys.modules, "hypercorn.protocol.ws_stream", types.ModuleType("ws_stream"))
    assert manager_module._peer_codes_unreported()
    assert await _reason_after(manager, FakeServer(), {"type": "websocket.disconnect", "code": 1006}) == "normal"
    # codes it does report keep their meaning
    assert await _reason_after(manager, FakeServer(), {"type": "websocket.disconnect", "code": 1002}) == "protocol_error"
