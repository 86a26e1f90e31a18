"""The seed 003 endpoint with the one changed import -- the very router of
``examples/seed_endpoint/app.py`` -- plus the measurement routes of ``benchmarks/benchprobe.py``
and the same endpoint in the detached shape at ``/api/v1/detached/ws``. Run it on either plane:

    uvicorn benchmarks.wsm_app:app                                            # portable plane
    uvicorn benchmarks.wsm_app:app --ws wsmanager.uvicorn:WebSocketProtocol   # native plane

``/api/v1/detached/ws`` (server ``wsm-detached`` of benchmarks/run.py) authenticates with the
seed's dependency and hands the connection to ``ws_manager.serve()``; its handler does what the
seed's loop does with a message -- ``message`` is echoed, ``broadcast`` goes to every other
connection (a ``pong`` is the manager's own, as in the seed it only refreshes ``last_ping``) --
so the load client cannot tell the two shapes apart.

The manager is configured by WSMANAGER_* variables (the benchmark driver sets
WSMANAGER_MAX_CONNECTIONS_PER_USER=0).
"""
from __future__ import annotations

import uuid
from typing import Any

from fastapi import Depends, FastAPI, WebSocket

from examples.seed_endpoint.app import get_current_user_ws, router
from wsmanager import ws_manager

try:
    from . import benchprobe
except ImportError:  # run as a top-level module
    import benchprobe  # type: ignore[no-redef]

app = FastAPI(title="wsmanager benchmark endpoint")
app.include_router(router, prefix="/api/v1")
benchprobe.install(app, ws_manager.get_stats)


async def on_message(connection_id: str, data: Any) -> None:
    """The seed loop's body as a handler (never suspends on the native plane: runs inline)."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "message":
        await ws_manager.send_message(connection_id, {"type": "message", "content": data.get("content")})
    elif kind == "broadcast":
        await ws_manager.broadcast({"type": "broadcast", "content": data.get("content")},
                                   exclude={connection_id})


@app.websocket("/api/v1/detached/ws")
async def detached_endpoint(websocket: WebSocket, user_id: str | None = Depends(get_current_user_ws)) -> None:
    await ws_manager.serve(websocket, str(uuid.uuid4()), user_id, on_message)
