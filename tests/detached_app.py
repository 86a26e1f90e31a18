"""The app of tests/test_detached.py's real servers: tests/hooks_app.py's (the seed's endpoint at
``/ws`` with tests/ws_commands.py's commands and a hello, one recording hook per lifecycle
event, the lifespan that stop()s the manager) plus the detached shape at ``/detached/{mode}/ws``:

    await ws_manager.serve(websocket, cid, user, HANDLERS[mode], raw=mode == "raw")

and the endpoint returns. ``mode`` (in the path) picks the handler: ``task`` (async, awaits
``delay`` seconds first: becomes a task), ``eager`` (async, never suspends on the native
plane), ``sync`` (a plain function; its replies go out on a task it starts), ``raw`` (async,
gets the text frame's str). Each handler performs the client's command (the seed endpoint's
commands) and answers ``{"type": "ack", "seq", "n", "in_task", "got"}`` -- ``in_task``: whether
the reply ran in a task, ``got``: the type name of the message the handler got. A message of
``{"type": "boom"}`` makes every handler raise. A detached connection's hello comes from a
connect hook (the endpoint has returned by then on the native plane).
"""
from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

from fastapi import WebSocket

from tests import ws_commands
from tests.hooks_app import app  # noqa: F401 - the app served (with its hooks and lifespan)
from wsmanager import ConnectEvent, ws_manager

#: The connection ids served by /detached/ws (their hello comes from the connect hook).
DETACHED: set[str] = set()


async def reply(cid: str, data: Any, got: Any) -> None:
    if isinstance(data, (str, bytes)):
        data = json.loads(data)
    n = await ws_commands.run(ws_manager, cid, data)
    await ws_manager.send_message(cid, {
        "type": "ack", "seq": data.get("seq"), "n": n if isinstance(n, int) else None,
        "in_task": asyncio.current_task() is not None, "got": type(got).__name__})


def _boom(data: Any) -> None:
    if isinstance(data, dict) and data.get("type") == "boom":
        raise RuntimeError("handler-boom")


async def on_task(cid: str, data: Any) -> None:
    _boom(data)
    await asyncio.sleep(float(data.get("delay", 0)))
    await reply(cid, data, data)


async def on_eager(cid: str, data: Any) -> None:
    _boom(data)
    await reply(cid, data, data)


def on_sync(cid: str, data: Any) -> None:
    _boom(data)
    asyncio.get_running_loop().create_task(reply(cid, data, data))


async def on_raw(cid: str, data: Any) -> None:
    if isinstance(data, bytes):
        await ws_manager.send_message(cid, {"type": "binary", "len": len(data)})
        return
    _boom(json.loads(data))
    await reply(cid, data, data)


HANDLERS = {"task": on_task, "eager": on_eager, "sync": on_sync, "raw": on_raw}


@app.websocket("/detached/{mode}/ws")
async def detached_endpoint(websocket: WebSocket, mode: str) -> None:
    user_id = websocket.query_params.get("user") or None
    cid = websocket.query_params.get("cid") or str(uuid.uuid4())
    DETACHED.add(cid)
    await ws_manager.serve(websocket, cid, user_id, HANDLERS[mode], raw=mode == "raw")


@ws_manager.on_connect
async def hello(event: ConnectEvent) -> None:
    if event.connection_id in DETACHED:
        await ws_manager.send_message(event.connection_id, {
            "type": "hello", "cid": event.connection_id, "pid": os.getpid(),
            "node": ws_manager.node_id})


@app.get("/detached/info")
async def info(cid: str) -> dict:
    """What the manager holds for a connection: its last pong, whether the native plane still
    has a WebSocket for it, and the manager's background tasks now."""
    conn = ws_manager.connection_info.get(cid)
    return {"last_ping": conn.last_ping.timestamp() if conn else None,
            "websocket": ws_manager.active_connections.get(cid) is not None,
            "tasks": len(ws_manager._tasks)}


@app.post("/stop")
async def stop() -> dict:
    await ws_manager.stop()
    return {}


@app.get("/detached/objects")
async def objects() -> dict:
    """GC-tracked objects in this process after a full collection (the frozen ones too:
    WSMANAGER_GC_FREEZE), and the connections held."""
    import gc
    gc.collect()
    gc.collect()
    return {"objects": len(gc.get_objects()) + gc.get_freeze_count(),
            "connections": ws_manager.get_stats()["total_connections"]}
