"""The manager's heartbeat task: JSON pings and the stale sweep, every ``ping_interval``.

Liveness itself is the C registry's (``Registry.sweep()`` pops only the connections whose
deadline passed, O(expired)); this module is the loop that asks it and closes what it returns.
Native connections are kept alive by the engine's RFC 6455 pings and are never swept here.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import TYPE_CHECKING

from ._encoding import _encode

if TYPE_CHECKING:
    from .manager import WebSocketManager

logger = logging.getLogger("wsmanager")

#: The close code of a stale connection (also its disconnect hooks' ``code``).
STALE_CODE = 1011


async def run(manager: "WebSocketManager") -> None:
    """The task ``WebSocketManager._ensure_heartbeat`` starts (``_heartbeat_task``)."""
    while True:
        await asyncio.sleep(manager.ping_interval)
        try:
            await once(manager)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the heartbeat must survive anything
            logger.exception("heartbeat failed")


async def once(manager: "WebSocketManager") -> None:
    registry = manager._registry
    if manager.json_heartbeat and len(registry):
        ping = {"type": "ping", "timestamp": datetime.now().isoformat()}
        await manager._deliver(registry.resolve_all(), _encode(ping, manager._dumps))
    cleaned = await manager.cleanup_stale_connections()
    if cleaned:
        logger.info("Cleaned up %d stale connections", cleaned)


async def sweep_stale(manager: "WebSocketManager") -> int:
    """``manager.cleanup_stale_connections()``: closes and unregisters every connection silent
    for longer than ``stale_timeout``; returns how many."""
    stale = []
    conns = manager._conns
    for handle in manager._registry.sweep():
        conn = conns.get(handle)
        if conn is not None:
            stale.append(conn)
            manager._drop(conn, "stale", STALE_CODE)
    if stale:
        # Closed, not only forgotten: a live-but-silent client sees 1011 and can reconnect.
        await asyncio.gather(*(c.plane.close(c, STALE_CODE, "stale connection") for c in stale))
    return len(stale)
