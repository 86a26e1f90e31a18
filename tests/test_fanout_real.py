"""Fan-out under real load on real servers with real clients.

A dead peer mid-broadcast runs on every server (each fails a send to a vanished peer its own
way); a stalled reader on every server that lets a send wait (not daphne: Twisted buffers
every write without bound, so an ASGI send never blocks and no server-side signal of a stalled
reader exists); the thousand clients on uvicorn's planes (the load is the manager's fan-out,
not the server's).
"""
from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from websockets.asyncio.client import connect

from tests.conftest import SERVER_PLANES, UVICORN_SERVER_PLANES

pytestmark = pytest.mark.timeout(180)


async def _open(server, n: int, user_prefix: str = "u", batch: int = 100) -> list:
    clients = []
    for start in range(0, n, batch):
        clients += await asyncio.gather(*(
            connect(server.ws_url(f"/ws?user={user_prefix}{i}&cid=c{i}"), open_timeout=30, max_queue=None)
            for i in range(start, min(n, start + batch))))
    return clients


async def _next(ws, kind: str, timeout: float = 30) -> dict:
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if msg.get("type") == kind:
            return msg


async def _wait_count(server, n: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = await asyncio.to_thread(server.get, "/stats")
        if s["total_connections"] == n or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.05)


async def test_abrupt_disconnect_mid_broadcast_loses_nothing_for_the_others(server_plane, start_server):
    server = start_server("tests.wsapp:app", server_plane, {"WSMANAGER_MAX_CONNECTIONS_PER_USER": "0"})
    clients = await _open(server, 500)
    assert (await _wait_count(server, 500))["total_connections"] == 500
    victim = clients[250]
    rounds = 20

    async def fire():
        for seq in range(rounds):
            await asyncio.to_thread(server.post, "/broadcast", params={"content": "x" * 64, "seq": seq})
            if seq == rounds // 2:
                victim.transport.abort()  # TCP gone, no close frame

    async def collect(ws):
        got = []
        while len(got) < rounds:
            msg = await _next(ws, "broadcast")
            got.append(msg["seq"])
        return got

    others = [c for c in clients if c is not victim]
    results = await asyncio.gather(fire(), *(collect(c) for c in others))
    for got in results[1:]:
        assert got == list(range(rounds))  # every message, in order, once
    stats = await _wait_count(server, 499)
    assert stats["total_connections"] == 499
    ids = await asyncio.to_thread(server.get, "/ids")
    assert "c250" not in ids and len(ids) == 499
    assert "u250" not in stats["connections_by_user"]
    await asyncio.gather(*(c.close() for c in others))
    stats = await _wait_count(server, 0)
    assert stats["total_connections"] == 0 and stats["total_users"] == 0
    # the vanished peer is a normal event: nothing at WARNING or above from wsmanager
    assert "send error" not in server.log() and "Traceback" not in server.log()


@pytest.mark.parametrize("server_plane", UVICORN_SERVER_PLANES, indirect=True)
async def test_thousand_clients_connect_broadcast_disconnect(server_plane, start_server):
    server = start_server("tests.wsapp:app", server_plane, {"WSMANAGER_MAX_CONNECTIONS_PER_USER": "0"})
    clients = await _open(server, 1000)
    assert (await _wait_count(server, 1000))["total_connections"] == 1000
    count = (await asyncio.to_thread(server.post, "/broadcast", params={"content": "all"}))["count"]
    assert count == 1000
    msgs = await asyncio.gather(*(_next(c, "broadcast") for c in clients))
    assert all(m["content"] == "all" for m in msgs)
    await asyncio.gather(*(c.close() for c in clients))
    stats = await _wait_count(server, 0)
    assert stats["total_connections"] == 0
    assert stats["connections_by_user"] == {} and stats["total_users"] == 0


@pytest.mark.parametrize("server_plane", [p for p in SERVER_PLANES if p != "daphne"], indirect=True)
async def test_one_stalled_receiver_does_not_delay_the_others(server_plane, start_server):
    """A client that stops reading holds up a broadcast by at most the per-send timeout, and is
    dropped as a slow consumer; the others get every message at once."""
    server = start_server("tests.wsapp:app", server_plane,
                          {"WSMANAGER_SEND_TIMEOUT": "1.0", "WSMANAGER_MAX_CONNECTIONS_PER_USER": "0"})
    readers = await _open(server, 5, user_prefix="r")
    # The stalled client: a raw socket that completes the handshake and never reads again.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(b"GET /ws?user=stalled&cid=stalled HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert b"101" in stalled.recv(4096)
    assert (await _wait_count(server, 6))["total_connections"] == 6
    latencies = []
    for seq in range(120):  # ~7 MB: far more than the kernel buffers of the stalled socket hold
        t0 = time.monotonic()
        await asyncio.to_thread(server.post, "/broadcast", params={"size": 60_000, "seq": seq})
        msgs = await asyncio.gather(*(_next(c, "broadcast") for c in readers))
        assert all(m["seq"] == seq for m in msgs)
        latencies.append(time.monotonic() - t0)
    # The stall costs one broadcast one send timeout (1 s) at most, once: then the stalled
    # client is dropped and every later broadcast is as fast as before.
    slow = [x for x in latencies if x > 0.9]
    assert len(slow) <= 1, latencies
    assert max(latencies) < 1.0 + 2.0, latencies
    stats = await _wait_count(server, 5)
    assert stats["total_connections"] == 5
    assert stats["disconnects"]["slow_consumer"] == 1
    stalled.close()
    await asyncio.gather(*(c.close() for c in readers))
