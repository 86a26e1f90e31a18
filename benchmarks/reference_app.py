"""The reference: seed 003's pure-Python WebSocketManager and endpoint, re-typed from the seed,
importing nothing from wsmanager. Run on stock uvicorn:

    uvicorn benchmarks.reference_app:app                 # default ws implementation
    uvicorn benchmarks.reference_app:app --ws wsproto

Differences from the seed, all outside the manager's delivery path:
- ``get_current_user_ws`` (absent from the seed) is the example app's stand-in:
  ``?token=tok-<user>`` -> user ``<user>``;
- ``REF_PING_TIMEOUT`` (default: the seed's 10 s) -- the seed's heartbeat drops every connection
  whose ``last_ping`` is older than 2 x ping_timeout at its first tick (30 s), since ``last_ping``
  is only refreshed by a ping that already passed that check; the benchmark driver sets it high
  so connections live through a run (the heartbeat's ping fan-out every 30 s still happens);
- the measurement routes of ``benchmarks/benchprobe.py`` (/health, /bench/gc, /bench/stats_time).
"""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from datetime import datetime, timedelta
from typing import Dict, Set

from fastapi import APIRouter, Depends, FastAPI, Query, WebSocket, WebSocketDisconnect, status
from fastapi.exceptions import WebSocketException
from pydantic import BaseModel

try:
    from . import benchprobe
except ImportError:  # run as a top-level module
    import benchprobe  # type: ignore[no-redef]

logger = logging.getLogger(__name__)


# ---- app/core/websocket_manager.py (seed 003) ----

class ConnectionInfo(BaseModel):
    """WebSocket connection information."""
    connection_id: str
    user_id: str | None = None
    connected_at: datetime
    last_ping: datetime
    is_alive: bool = True


class WebSocketManager:
    """Manages WebSocket connections."""

    def __init__(
        self,
        ping_interval: int = 30,
        ping_timeout: int = 10,
        max_connections_per_user: int = 5
    ):
        self.active_connections: Dict[str, WebSocket] = {}
        self.connection_info: Dict[str, ConnectionInfo] = {}
        self.user_connections: Dict[str, Set[str]] = {}

        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_connections_per_user = max_connections_per_user

        self._heartbeat_task = None

    async def connect(self, websocket: WebSocket, connection_id: str, user_id: str | None = None) -> bool:
        if user_id and len(self.user_connections.get(user_id, set())) >= self.max_connections_per_user:
            logger.warning(f"Connection limit reached for user {user_id}")
            await websocket.close(code=1008, reason="Connection limit reached")
            return False

        await websocket.accept()

        self.active_connections[connection_id] = websocket
        self.connection_info[connection_id] = ConnectionInfo(
            connection_id=connection_id,
            user_id=user_id,
            connected_at=datetime.now(),
            last_ping=datetime.now()
        )

        if user_id:
            if user_id not in self.user_connections:
                self.user_connections[user_id] = set()
            self.user_connections[user_id].add(connection_id)

        logger.info(
            f"WebSocket connected: {connection_id}",
            extra={"connection_id": connection_id, "user_id": user_id}
        )

        if not self._heartbeat_task:
            self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())

        return True

    async def disconnect(self, connection_id: str):
        if connection_id not in self.active_connections:
            return

        info = self.connection_info.get(connection_id)

        if info and info.user_id:
            if info.user_id in self.user_connections:
                self.user_connections[info.user_id].discard(connection_id)
                if not self.user_connections[info.user_id]:
                    del self.user_connections[info.user_id]

        del self.active_connections[connection_id]
        if connection_id in self.connection_info:
            del self.connection_info[connection_id]

        logger.info(
            f"WebSocket disconnected: {connection_id}",
            extra={"connection_id": connection_id}
        )

    async def send_message(self, connection_id: str, message: dict):
        if connection_id not in self.active_connections:
            logger.warning(f"Connection not found: {connection_id}")
            return

        websocket = self.active_connections[connection_id]
        try:
            await websocket.send_json(message)
        except Exception as e:
            logger.error(f"Error sending message: {e}")
            await self.disconnect(connection_id)

    async def broadcast(self, message: dict, exclude: Set[str] | None = None):
        exclude = exclude or set()

        for connection_id in list(self.active_connections.keys()):
            if connection_id not in exclude:
                await self.send_message(connection_id, message)

    async def send_to_user(self, user_id: str, message: dict):
        if user_id not in self.user_connections:
            return

        for connection_id in self.user_connections[user_id]:
            await self.send_message(connection_id, message)

    async def _heartbeat_loop(self):
        while True:
            try:
                await asyncio.sleep(self.ping_interval)
                await self._send_pings()
            except Exception as e:
                logger.error(f"Heartbeat error: {e}")

    async def _send_pings(self):
        now = datetime.now()
        dead_connections = []

        for connection_id, websocket in list(self.active_connections.items()):
            info = self.connection_info.get(connection_id)
            if not info:
                continue

            if now - info.last_ping > timedelta(seconds=self.ping_timeout * 2):
                dead_connections.append(connection_id)
                continue

            try:
                await websocket.send_json({"type": "ping"})
                info.last_ping = now
            except Exception as e:
                logger.error(f"Ping failed for {connection_id}: {e}")
                dead_connections.append(connection_id)

        for connection_id in dead_connections:
            await self.disconnect(connection_id)

    def get_stats(self) -> dict:
        return {
            "total_connections": len(self.active_connections),
            "total_users": len(self.user_connections),
            "connections_by_user": {
                user_id: len(conn_ids)
                for user_id, conn_ids in self.user_connections.items()
            }
        }


ws_manager = WebSocketManager(ping_timeout=int(os.environ.get("REF_PING_TIMEOUT", "10")))


# ---- app/api/v1/endpoints/websocket.py (seed 003) ----

router = APIRouter()


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


app = FastAPI(title="seed 003 reference")
app.include_router(router, prefix="/api/v1")
benchprobe.install(app, ws_manager.get_stats)
