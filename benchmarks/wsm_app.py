"""The seed 003 endpoint with the one changed import, ``from wsmanager import ws_manager``, plus
the measurement routes of ``benchmarks/benchprobe.py``. Run it on either plane:

    uvicorn benchmarks.wsm_app:app                                            # portable plane
    uvicorn benchmarks.wsm_app:app --ws wsmanager.uvicorn:WebSocketProtocol   # native plane

The manager is configured by WSMANAGER_* variables (the benchmark driver sets
WSMANAGER_MAX_CONNECTIONS_PER_USER=0).
"""
from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Depends, FastAPI, Query, WebSocket, WebSocketDisconnect, status
from fastapi.exceptions import WebSocketException

from wsmanager import ws_manager

try:
    from . import benchprobe
except ImportError:  # run as a top-level module
    import benchprobe  # type: ignore[no-redef]

router = APIRouter()
logger = logging.getLogger(__name__)


async def get_current_user_ws(token: str | None = Query(default=None)) -> str | None:
    if token is None:
        return None
    if token.startswith("tok-") and 0 < len(token) - 4 <= 64:
        return token[4:]
    raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION, reason="invalid token")


@router.websocket("/ws")
async def websocket_endpoint(
    websocket: WebSocket,
    user_id: str = Depends(get_current_user_ws)
):
    connection_id = str(uuid.uuid4())

    connected = await ws_manager.connect(websocket, connection_id, user_id)
    if not connected:
        return

    try:
        while True:
            data = await websocket.receive_json()

            if data.get("type") == "pong":
                info = ws_manager.connection_info.get(connection_id)
                if info:
                    from datetime import datetime
                    info.last_ping = datetime.now()

            elif data.get("type") == "message":
                await ws_manager.send_message(
                    connection_id,
                    {"type": "message", "content": data.get("content")}
                )

            elif data.get("type") == "broadcast":
                await ws_manager.broadcast(
                    {"type": "broadcast", "content": data.get("content")},
                    exclude={connection_id}
                )

    except WebSocketDisconnect:
        logger.info(f"WebSocket disconnected: {connection_id}")
    except Exception as e:
        logger.error(f"WebSocket error: {e}")
    finally:
        await ws_manager.disconnect(connection_id)


@router.get("/ws/stats")
async def get_websocket_stats():
    return ws_manager.get_stats()


app = FastAPI(title="wsmanager benchmark endpoint")
app.include_router(router, prefix="/api/v1")
benchprobe.install(app, ws_manager.get_stats)
