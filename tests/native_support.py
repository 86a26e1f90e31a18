"""Helpers for the native-plane tests: tiny ASGI apps (served by tests/servers.py's AppServer)
and a raw RFC 6455 client. Not a test module (no ``test_`` prefix).

The apps (run in the server process):
- ``echo_app``: accepts (choosing "chat" when offered) and echoes every message. A text message
  ``"cmd:<name>:<arg>"`` drives the server: ``flood:<n>`` queues n 64 KiB frames through the
  engine directly (the manager's path, which does not wait), ``close:<code>`` closes.
  ``GET /events`` returns the disconnect events the app has seen (JSON), ``GET /stats`` the
  engine's stats, ``GET /gc`` how many objects are frozen (``gc.get_freeze_count()``) and tracked.
- ``deny_app``: the path picks a denial before accept: /close (403), /raise (500),
  /http (a websocket.http.response with status 418), /return (returns without accepting).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Iterator

from fastapi import FastAPI, WebSocket, WebSocketDisconnect


EVENTS: list[dict[str, Any]] = []


async def http_json(send: Any, obj: Any) -> None:
    """Answer an HTTP request of a raw ASGI app with ``obj`` as JSON."""
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Any, send: Any) -> None:
    """Run a raw ASGI app's lifespan scope: nothing to start or stop."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def echo_app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["type"] == "http":
        if scope["path"] == "/stats":
            from wsmanager.uvicorn import get_engine
            return await http_json(send, get_engine().stats())
        if scope["path"] == "/gc":
            import gc
            return await http_json(send, {"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())})
        return await http_json(send, EVENTS)
    native = scope["extensions"].get("wsmanager.native")
    assert (await receive())["type"] == "websocket.connect"
    sub = "chat" if "chat" in scope["subprotocols"] else None
    await send({"type": "websocket.accept", "subprotocol": sub})
    assert native is not None and native.handle is not None
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            EVENTS.append({k: v for k, v in msg.items()})
            return
        text = msg.get("text")
        if text and text.startswith("cmd:"):
            _, name, arg = text.split(":", 2)
            if name == "flood":
                chunk = b"x" * 65536
                for _ in range(int(arg)):
                    native.engine.send(native.handle, chunk)
            elif name == "close":
                await send({"type": "websocket.close", "code": int(arg), "reason": "bye"})
            continue
        if text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": msg["bytes"]})


async def deny_app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "websocket":
        return
    await receive()
    path = scope["path"]
    if path == "/close":
        await send({"type": "websocket.close"})
    elif path == "/raise":
        raise RuntimeError("boom before accept")
    elif path == "/http":
        await send({"type": "websocket.http.response.start", "status": 418,
                    "headers": [(b"x-denied", b"yes")]})
        await send({"type": "websocket.http.response.body", "body": b"no tea", "more_body": False})
    elif path == "/return":
        return
    elif path == "/scope":
        native = scope["extensions"]["wsmanager.native"]
        await send({"type": "websocket.accept", "headers": [(b"x-extra", b"1")]})
        info = {k: scope[k] for k in ("type", "asgi", "http_version", "scheme", "path", "root_path",
                                      "subprotocols", "server", "client")}
        info["raw_path"] = scope["raw_path"].decode("latin-1")
        info["query_string"] = scope["query_string"].decode("latin-1")
        info["headers"] = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        info["extensions"] = sorted(scope["extensions"])
        info["handle"] = native.handle
        info["state"] = isinstance(scope.get("state"), dict)
        await send({"type": "websocket.send", "text": json.dumps(info)})
        await send({"type": "websocket.close", "code": 1000})
    else:
        await send({"type": "websocket.accept"})


def _fastapi_app() -> Any:
    app = FastAPI()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                data = await websocket.receive_json()
                await websocket.send_json({"echo": data})
        except WebSocketDisconnect:
            pass

    return app


def events_until(server: Any, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    """``echo_app``'s disconnect events once there are ``n`` (or what there is at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        ev = server.get("/events")
        if len(ev) >= n or time.monotonic() > deadline:
            return ev
        time.sleep(0.05)


# ---- raw RFC 6455 client ------------------------------------------------------------------

@contextlib.contextmanager
def serving(app: str, log_path: Path, env: dict[str, str] | None = None, **options: Any) -> Iterator[Any]:
    """A native-plane ``AppServer`` of ``tests.native_support:<app>`` (``options`` as
    AppServer's) for the ``with`` block; stopped after it, which must exit with code 0."""
    from tests.servers import AppServer  # not at import time: the server process loads this module

    s = AppServer(f"tests.native_support:{app}", "native", env=env, log_path=log_path, **options)
    try:
        yield s
    finally:
        assert s.stop() == 0, s.log()


def frame(op: int, payload: bytes = b"", fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    b0 = (0x80 if fin else 0) | (rsv << 4) | op
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        hdr = bytes([b0, m | n])
    elif n < 65536:
        hdr = bytes([b0, m | 126]) + struct.pack("!H", n)
    else:
        hdr = bytes([b0, m | 127]) + struct.pack("!Q", n)
    if mask:
        key = os.urandom(4)
        payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
        hdr += key
    return hdr + payload


def close_frame(code: int | None, reason: bytes = b"") -> bytes:
    return frame(8, b"" if code is None else struct.pack("!H", code) + reason)


def recv_head(sock: socket.socket, buf: bytes = b"") -> bytes:
    """Reads from ``sock`` onto ``buf`` until it holds an HTTP head's blank line or the peer
    closes; returns all that was read (the head and whatever came after it)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


class RawClient:
    def __init__(self, port: int, path: str = "/ws", headers: dict[str, str] | None = None,
                 timeout: float = 5, handshake: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.status = 0
        self.head = b""
        self.last_rsv = 0
        if handshake:
            self.handshake(path, headers)

    def request(self, path: str, headers: dict[str, str] | None = None) -> bytes:
        h = {"Host": "127.0.0.1", "Upgrade": "websocket", "Connection": "Upgrade",
             "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
             "Sec-WebSocket-Version": "13"}
        h.update(headers or {})
        lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in h.items() if v is not None]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def handshake(self, path: str, headers: dict[str, str] | None = None) -> int:
        self.sock.sendall(self.request(path, headers))
        self.buf = recv_head(self.sock, self.buf)
        self.head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.status = int(self.head.split(b" ", 2)[1]) if self.head else 0
        return self.status

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name.lower().encode():
                return v.strip().decode("latin-1")
        return None

    def body(self) -> bytes:
        data = self.buf
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except OSError:
            pass
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _need(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def recv_frame(self) -> tuple[int, bytes, bool] | None:
        """(opcode, payload, fin), or None at EOF."""
        if not self._need(2):
            return None
        b0, b1 = self.buf[0], self.buf[1]
        n, off = b1 & 0x7F, 2
        if n == 126:
            if not self._need(4):
                return None
            n, off = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            if not self._need(10):
                return None
            n, off = struct.unpack("!Q", self.buf[2:10])[0], 10
        assert not b1 & 0x80, "server frames are never masked"
        if not self._need(off + n):
            return None
        payload = self.buf[off:off + n]
        self.buf = self.buf[off + n:]
        self.last_rsv = (b0 >> 4) & 7  # RSV1 (4): a compressed message (permessage-deflate)
        return b0 & 0x0F, payload, bool(b0 & 0x80)

    def recv_data(self) -> tuple[int, bytes]:
        """The next data frame, skipping pings."""
        while True:
            f = self.recv_frame()
            assert f is not None, "connection closed"
            if f[0] not in (9, 10):
                return f[0], f[1]

    def expect_close(self) -> tuple[int | None, bytes]:
        """Reads until the server's Close frame; returns (code, reason)."""
        while True:
            f = self.recv_frame()
            assert f is not None, "EOF before a Close frame"
            if f[0] == 8:
                p = f[1]
                return (struct.unpack("!H", p[:2])[0] if len(p) >= 2 else None), p[2:]

    def at_eof(self, timeout: float = 5) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


if __name__ == "__main__":  # pragma: no cover
    print("helpers only")

fastapi_app = _fastapi_app()
