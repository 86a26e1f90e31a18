"""wsmanager: a drop-in WebSocket connection manager for FastAPI/uvicorn.

``from wsmanager import ws_manager`` gives the process-wide manager, configured from
``WSMANAGER_*`` environment variables (a bad value fails here, at import, naming the variable).
"""
from __future__ import annotations

from . import _core
from .errors import is_disconnect_error
from .logs import install as _install_logging
from .manager import (ConfigError, ConnectEvent, ConnectionInfo, DisconnectEvent, JoinEvent,
                      LeaveEvent, WebSocketManager)

_install_logging()  # a library's logging: never Python's bare last-resort lines (wsmanager/logs.py)

__all__ = ["WebSocketManager", "ConnectionInfo", "ConfigError", "ws_manager", "is_disconnect_error",
           "ConnectEvent", "DisconnectEvent", "JoinEvent", "LeaveEvent"]
__version__ = "0.1.0"

ws_manager: WebSocketManager = WebSocketManager.from_env()
