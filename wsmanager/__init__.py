"""wsmanager: a drop-in WebSocket connection manager for FastAPI/uvicorn.

``from wsmanager import ws_manager`` gives the process-wide manager, configured from
``WSMANAGER_*`` environment variables (a bad value fails here, at import, naming the variable).
"""
from __future__ import annotations

from . import _core
from .errors import is_disconnect_error
from .manager import ConfigError, ConnectionInfo, WebSocketManager

__all__ = ["WebSocketManager", "ConnectionInfo", "ConfigError", "ws_manager", "is_disconnect_error"]
__version__ = "0.1.0"

ws_manager: WebSocketManager = WebSocketManager.from_env()
