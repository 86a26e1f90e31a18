"""The seed's endpoint, scaled out: run by the Redis tests and benchmarks/redis_fanout.py under
uvicorn with ``WSMANAGER_REDIS_URL`` set. Only ``from wsmanager import ws_manager`` is wsmanager;
the extra message types let a client drive every cross-process path.

Client → server JSON: ``{"type": "broadcast" | "to_user" | "to_channel" | "to_conn" | "kick" |
"join" | "leave" | "ping", ...}`` (performed by tests/ws_commands.py); each command is answered
with ``{"type": "ack", "seq": ..., "n": ...}``.
Server → client first message: ``{"type": "hello", "cid", "pid", "node"}``.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
import os
import sys
import uuid

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from tests import ws_commands
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
            n = await ws_commands.run(ws_manager, connection_id, data)
            if n is ws_commands.UNKNOWN:
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
