"""Helpers for tests/test_hostile_handshake.py (not a test module): the app the server runs, and
clients that open half-open, trickling or idle connections and time their closing.

``manager_app`` (run in the server process): ``/ws`` registers each connection with a
``WebSocketManager`` (``?user=<id>``) and echoes text; ``/raw`` accepts without the manager and
records what ``accept()`` raised and what ``receive()`` gave next; ``/ws/stats`` is
``wsmanager.fastapi.router``'s; ``GET /handshake`` is ``wsmanager.uvicorn.handshake_stats()``,
``GET /outcomes`` what the endpoints saw, ``GET /fds`` the process's open descriptors.
"""
from __future__ import annotations

import os
import selectors
import socket
import time
import uuid
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from wsmanager import WebSocketManager
from wsmanager.fastapi import router

from tests.native_support import recv_head

OUTCOMES: dict[str, Any] = {"refused": 0, "accepted": 0, "raw": []}


def _manager_app() -> FastAPI:
    app = FastAPI()
    manager = WebSocketManager(ping_interval=0, max_connections_per_user=0)
    app.include_router(router(manager, debug_prefix=None, metrics_path=None, static_prefix=None))

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        cid = uuid.uuid4().hex
        if not await manager.connect(websocket, cid, websocket.query_params.get("user")):
            OUTCOMES["refused"] += 1
            return
        OUTCOMES["accepted"] += 1
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass
        finally:
            await manager.disconnect(cid)

    @app.websocket("/raw")
    async def raw(websocket: WebSocket) -> None:
        try:
            await websocket.accept()
        except Exception as exc:  # what the app sees when the hand-off fails
            seen: dict[str, Any] = {"accept": type(exc).__name__}
            try:
                await websocket.receive_text()
            except WebSocketDisconnect as disconnect:
                seen["receive"] = disconnect.code
            OUTCOMES["raw"].append(seen)
            raise
        await websocket.close()

    @app.get("/handshake")
    async def handshake() -> dict[str, int]:
        from wsmanager.uvicorn import handshake_stats
        return handshake_stats()

    @app.get("/outcomes")
    async def outcomes() -> dict[str, Any]:
        return OUTCOMES

    @app.get("/fds")
    async def fds() -> dict[str, int]:
        return {"open": len(os.listdir("/proc/self/fd"))}

    @app.get("/events")
    async def events() -> list[Any]:  # a plain 200 on a keep-alive connection
        return []

    return app


manager_app = _manager_app()


# ---- clients ------------------------------------------------------------------------------

UPGRADE_HEAD = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n")
HALF_HEAD = UPGRADE_HEAD[:60]


def open_half(port: int, n: int, payload: bytes = HALF_HEAD) -> list[tuple[socket.socket, float]]:
    """n connections that send ``payload`` (half an upgrade request) and stop; with the time
    each connected."""
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        opened = time.monotonic()
        if payload:
            s.sendall(payload)
        s.setblocking(False)
        out.append((s, opened))
    return out


def closed_times(conns: list[tuple[socket.socket, float]], timeout: float) -> list[float | None]:
    """For each connection, how long after it connected the server closed it (EOF or reset),
    or None if it was still open after ``timeout`` seconds from now."""
    sel = selectors.DefaultSelector()
    result: list[float | None] = [None] * len(conns)
    for i, (s, _) in enumerate(conns):
        sel.register(s, selectors.EVENT_READ, i)
    deadline = time.monotonic() + timeout
    left = len(conns)
    while left and (wait := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(wait):
            i = key.data
            s, opened = conns[i]
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # anything else (an error answer) is read on the way to EOF
                result[i] = time.monotonic() - opened
                sel.unregister(s)
                left -= 1
    sel.close()
    return result


def close_all(conns: list[tuple[socket.socket, float]]) -> None:
    for s, _ in conns:
        s.close()


def http_exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Sends a request and reads one response (status, lower-cased headers, body by
    Content-Length, else to EOF)."""
    sock.sendall(request)
    head, _, body = recv_head(sock).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1]) if lines and lines[0] else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    else:
        while chunk := sock.recv(65536):
            body += chunk
    return status, headers, body


def time_to_eof(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the peer closes ``sock`` (None: still open after ``limit``)."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except socket.timeout:
        return None
    except OSError:
        pass
    return time.monotonic() - start
