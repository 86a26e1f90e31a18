"""The app the plane-independent tests drive: the seed's endpoint shape plus channel, user and
control messages. It uses the module-level ``ws_manager``, configured by WSMANAGER_* variables."""
from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import FastAPI, Query, WebSocket, WebSocketDisconnect

from wsmanager import ws_manager

app = FastAPI()


@app.websocket("/ws")
async def endpoint(websocket: WebSocket, user: str | None = Query(default=None),
                   cid: str | None = Query(default=None)):
    connection_id = cid or str(uuid.uuid4())
    if not await ws_manager.connect(websocket, connection_id, user):
        return
    try:
        while True:
            data = await websocket.receive_json()
            kind = data.get("type")
            if kind == "pong":
                info = ws_manager.connection_info.get(connection_id)
                if info:
                    info.last_ping = datetime.now()
            elif kind == "message":
                await ws_manager.send_message(connection_id, {"type": "message", "content": data.get("content")})
            elif kind == "broadcast":
                n = await ws_manager.broadcast({"type": "broadcast", "content": data.get("content")},
                                               exclude={connection_id})
                await websocket.send_json({"type": "broadcast_done", "count": n})
            elif kind == "to_user":
                n = await ws_manager.send_to_user(data["user"], {"type": "direct", "content": data.get("content")})
                await websocket.send_json({"type": "to_user_done", "count": n})
            elif kind == "join":
                ws_manager.join(connection_id, data["channel"])
                await websocket.send_json({"type": "joined", "channel": data["channel"]})
            elif kind == "leave":
                ws_manager.leave(connection_id, data["channel"])
                await websocket.send_json({"type": "left", "channel": data["channel"]})
            elif kind == "channel":
                n = await ws_manager.broadcast_to_channel(
                    data["channel"], {"type": "channel", "channel": data["channel"], "content": data.get("content")},
                    exclude={connection_id})
                await websocket.send_json({"type": "channel_done", "count": n})
            elif kind == "interleave":  # direct sends and manager sends, alternating
                for seq in range(data["count"]):
                    if seq % 2:
                        await ws_manager.send_message(connection_id, {"type": "seq", "seq": seq})
                    else:
                        await websocket.send_json({"type": "seq", "seq": seq})
            elif kind == "kick":  # the manager closes another connection with a given code
                await ws_manager.disconnect(data["target"], data.get("code", 1000), data.get("reason", ""))
                await websocket.send_json({"type": "kicked", "target": data["target"]})
            elif kind == "whoami":
                await websocket.send_json({"type": "whoami", "connection_id": connection_id})
    except WebSocketDisconnect:
        pass
    finally:
        await ws_manager.disconnect(connection_id)


@app.get("/stats")
async def stats():
    return ws_manager.get_stats()


@app.get("/ids")
async def ids():
    return sorted(ws_manager.active_connections)


@app.post("/broadcast")
async def broadcast(content: str = "", seq: int = 0, size: int = 0):
    if size:
        content = "y" * size
    n = await ws_manager.broadcast({"type": "broadcast", "content": content, "seq": seq})
    return {"count": n}


@app.post("/cleanup")
async def cleanup():
    return {"cleaned": await ws_manager.cleanup_stale_connections()}
