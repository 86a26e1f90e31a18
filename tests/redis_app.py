"""The seed's endpoint, scaled out: run by the Redis tests and benchmarks/redis_fanout.py under
uvicorn with ``WSMANAGER_REDIS_URL`` set. Only ``from wsmanager import ws_manager`` is wsmanager;
the extra message types let a client drive every cross-process path.

Client → server JSON: ``{"type": "broadcast" | "to_user" | "to_channel" | "to_conn" | "kick" |
"join" | "leave", ...}``; each command is answered with ``{"type": "ack", "seq": ..., "n": ...}``.
Server → client first message: ``{"type": "hello", "cid", "pid", "node"}``.
"""
from __future__ import annotations

import inspect
import logging
from contextlib import asynccontextmanager
import os
import sys
import uuid

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from wsmanager import ws_manager

_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s pid=%(process)d %(message)s"))
_log = logging.getLogger("wsmanager")
_log.addHandler(_handler)
_log.setLevel(logging.INFO)



@asynccontextmanager
async def lifespan(app):
    yield
    # Leave the cluster at once on a clean shutdown (SIGTERM) instead of after the TTL.
    await ws_manager.stop()


app = FastAPI(lifespan=lifespan)


async def _maybe(result):
    return await result if inspect.isawaitable(result) else result


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket):
    user_id = websocket.query_params.get("user") or None
    connection_id = websocket.query_params.get("cid") or str(uuid.uuid4())
    if not await ws_manager.connect(websocket, connection_id, user_id):
        return
    try:
        await ws_manager.send_message(connection_id, {
            "type": "hello", "cid": connection_id, "pid": os.getpid(),
            "node": getattr(ws_manager, "node_id", None)})
        while True:
            data = await websocket.receive_json()
            kind = data.get("type")
            body = {"type": kind, "content": data.get("content"), "from": connection_id}
            exclude = {connection_id} if data.get("exclude_self") else None
            n = None
            if kind == "broadcast":
                n = await ws_manager.broadcast(body, exclude=exclude)
            elif kind == "to_user":
                n = await ws_manager.send_to_user(data["user"], body)
            elif kind == "to_channel":
                n = await ws_manager.broadcast_to_channel(data["channel"], body, exclude=exclude)
            elif kind == "to_conn":
                n = await ws_manager.send_message(data["cid"], body)
            elif kind == "kick":
                n = await _maybe(ws_manager.disconnect(data["cid"], code=4000, reason="kicked"))
            elif kind == "join":
                n = await _maybe(ws_manager.join(connection_id, data["channel"]))
            elif kind == "leave":
                n = await _maybe(ws_manager.leave(connection_id, data["channel"]))
            elif kind == "ping":
                pass
            else:
                continue
            if data.get("ack", True):
                await ws_manager.send_message(connection_id, {
                    "type": "ack", "seq": data.get("seq"), "n": n if isinstance(n, int) else None})
    except WebSocketDisconnect:
        pass
    except Exception:
        # The tests grep for this: nothing from the backend may ever surface here.
        _log.exception("ENDPOINT-EXCEPTION in %s", connection_id)
        raise
    finally:
        await ws_manager.disconnect(connection_id)


@app.get("/healthz")
async def healthz():
    return {"ok": True, "pid": os.getpid()}


@app.get("/stats")
async def stats():
    return ws_manager.get_stats()


@app.get("/cluster")
async def cluster():
    return ws_manager.get_stats(scope="cluster")


@app.get("/presence")
async def presence(channel: str | None = None):
    online = await ws_manager.online_users()
    members = await ws_manager.channel_presence(channel) if channel else None
    return {"online": sorted(online), "channel": sorted(members) if members is not None else None}
