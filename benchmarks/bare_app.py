"""A bare FastAPI WebSocket endpoint with no connection manager: accept, then await messages.
It measures what the FastAPI endpoint itself costs per idle connection (RSS, GC-tracked
objects) on each plane, the share of the per-connection figures no manager can remove.

    uvicorn benchmarks.bare_app:app
    uvicorn benchmarks.bare_app:app --ws wsmanager.uvicorn:WebSocketProtocol
"""
from __future__ import annotations

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

try:
    from . import benchprobe
except ImportError:  # run as a top-level module
    import benchprobe  # type: ignore[no-redef]

app = FastAPI(title="bare endpoint")


@app.websocket("/api/v1/ws")
async def endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.receive_json()
    except WebSocketDisconnect:
        pass


benchprobe.install(app, lambda: {"total_connections": None})
