"""The app of the permessage-deflate tests (tests/test_native_deflate.py), served by
tests/servers.py's AppServer on the native plane. Not a test module (no ``test_`` prefix).

It echoes every message, except a text ``"fanout:<n>:<kind>"``: the engine fans out one message
of ``n`` bytes (``payload(n, kind)``, kind ``text`` or ``binary``) to every open connection in
one call, as the manager's broadcast does. ``GET /stats`` answers the engine's stats.
"""
from __future__ import annotations

from typing import Any

from tests.native_support import http_json, lifespan

OPEN: set[int] = set()

_WORDS = ("hello", "the", "deploy", "is", "done", "please", "check", "latency", "build", "green")


def payload(n: int, kind: str = "text") -> str | bytes:
    """A deterministic JSON-like message of exactly n bytes (ASCII), as text or bytes."""
    parts, i = [], 0
    while sum(map(len, parts)) < n:
        parts.append('{"seq":%d,"user":"user_%d","content":"%s %s"},' % (
            i, i % 97, _WORDS[i % 10], _WORDS[(i * 7) % 10]))
        i += 1
    text = "".join(parts)[:n]
    return text if kind == "text" else text.encode()


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["type"] == "http":
        from wsmanager.uvicorn import get_engine
        return await http_json(send, get_engine().stats())
    native = scope["extensions"]["wsmanager.native"]
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    OPEN.add(native.handle)
    try:
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is not None and text.startswith("fanout:"):
                _, n, kind = text.split(":")
                native.engine.fanout(sorted(OPEN), payload(int(n), kind))
            elif text is not None:
                await send({"type": "websocket.send", "text": text})
            else:
                await send({"type": "websocket.send", "bytes": msg["bytes"]})
    finally:
        OPEN.discard(native.handle)
