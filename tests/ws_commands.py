"""The client commands of the scale-out test apps (tests/redis_app.py, tests/test_backends.py).

A client sends ``{"type": "broadcast" | "to_user" | "to_channel" | "to_conn" | "kick" | "join" |
"leave" | "ping", ...}``; :func:`run` performs it on a manager (anything with the seed's
manager API: ``join`` and ``disconnect`` may be plain functions or coroutines) and returns what
the app's ack reports as ``n``.
"""
from __future__ import annotations

import inspect
from typing import Any

#: Returned by :func:`run` for a ``type`` it does not know (the app answers nothing).
UNKNOWN = object()


async def _maybe(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


async def run(manager: Any, connection_id: str, data: dict) -> Any:
    """Performs one command of ``connection_id``; its result, or :data:`UNKNOWN`."""
    kind = data.get("type")
    body = {"type": kind, "content": data.get("content"), "from": connection_id}
    exclude = {connection_id} if data.get("exclude_self") else None
    if kind == "broadcast":
        return await manager.broadcast(body, exclude=exclude)
    if kind == "to_user":
        return await manager.send_to_user(data["user"], body)
    if kind == "to_channel":
        return await manager.broadcast_to_channel(data["channel"], body, exclude=exclude)
    if kind == "to_conn":
        return await manager.send_message(data["cid"], body)
    if kind == "kick":
        return await _maybe(manager.disconnect(data["cid"], code=4000, reason="kicked"))
    if kind == "join":
        return await _maybe(manager.join(connection_id, data["channel"]))
    if kind == "leave":
        return await _maybe(manager.leave(connection_id, data["channel"]))
    if kind == "ping":
        return None
    return UNKNOWN
