"""The seed's endpoint (seed 003, "WebSocket Endpoint"), unchanged but for one import.

Run it: ``make run-seed`` (native plane, ``python -m wsmanager``; ``make run`` serves the chat
example instead), ``python -m wsmanager examples.seed_endpoint.app:app`` (the same by hand) or
``uvicorn examples.seed_endpoint.app:app`` (stock uvicorn, portable plane: needs ``websockets``
or ``uvicorn[standard]`` installed).
Auth is a stand-in for a real one: ``?token=tok-<user>`` maps to user ``<user>``; no token means
an anonymous connection (the seed's own tests connect without one); any other token is refused
with close code 1008 before the handshake completes.
"""
from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Depends, FastAPI, Query, WebSocket, WebSocketDisconnect, status
from fastapi.exceptions import WebSocketException

from wsmanager import ws_manager  # the one changed line: was app.core.websocket_manager

router = APIRouter()
logger = logging.getLogger(__name__)


async def get_current_user_ws(token: str | None = Query(default=None)) -> str | None:
    """Maps the ``token`` query parameter to a user id."""
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
    """
    WebSocket endpoint for real-time communication.

    Args:
        websocket: WebSocket connection
        user_id: Authenticated user ID
    """
    connection_id = str(uuid.uuid4())

    # Connect
    connected = await ws_manager.connect(websocket, connection_id, user_id)
    if not connected:
        return

    try:
        while True:
            # Receive message
            data = await websocket.receive_json()

            # Handle message types
            if data.get("type") == "pong":
                # Update last ping time
                info = ws_manager.connection_info.get(connection_id)
                if info:
                    from datetime import datetime
                    info.last_ping = datetime.now()

            elif data.get("type") == "message":
                # Echo message back
                await ws_manager.send_message(
                    connection_id,
                    {"type": "message", "content": data.get("content")}
                )

            elif data.get("type") == "broadcast":
                # Broadcast to all users
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
    """Get WebSocket connection statistics."""
    return ws_manager.get_stats()


app = FastAPI(title="wsmanager seed endpoint")
app.include_router(router, prefix="/api/v1")
