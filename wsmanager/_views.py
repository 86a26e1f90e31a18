"""The seed's dict-shaped views of the connections, read live from the C registry.

``manager.active_connections``, ``manager.connection_info`` and ``manager.user_connections``
were plain dicts in the seed's manager; here they are read-only mappings over the registry, so
there is one copy of every fact (the registry's) and nothing to keep in step.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import _core

if TYPE_CHECKING:
    from .manager import WebSocketManager

_OPEN = _core.STATE_OPEN


def _mono_to_datetime(mono_ns: int) -> datetime:
    wall = time.time() - (_core.monotonic_ns() - mono_ns) / 1e9
    return datetime.fromtimestamp(wall)


def _datetime_to_mono(value: Any) -> int:
    if isinstance(value, datetime):
        ts = value.timestamp()  # naive = local time, like the seed's datetime.now()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        ts = float(value)
    else:
        raise TypeError(f"last_ping must be a datetime or a POSIX timestamp, not {type(value).__name__}")
    return _core.monotonic_ns() - int((time.time() - ts) * 1e9)


class ConnectionInfo:
    """A live view of one connection's registry entry (the seed's ``ConnectionInfo``).

    Reads come from the C registry; ``info.last_ping = datetime.now()`` -- what the seed's
    endpoint does on a pong -- writes it back and counts as a sign of life.
    """

    __slots__ = ("_registry", "_handle", "connection_id", "user_id")

    def __init__(self, registry: _core.Registry, handle: int, connection_id: str,
                 user_id: str | None) -> None:
        self._registry = registry
        self._handle = handle
        self.connection_id = connection_id
        self.user_id = user_id

    def _row(self) -> Any:  # a _core.ConnectionRow
        row = self._registry.info(self._handle)
        if row is None:
            raise LookupError(f"connection {self.connection_id!r} is no longer registered")
        return row

    @property
    def connected_at(self) -> datetime:
        return _mono_to_datetime(self._row().connected_at)

    @property
    def last_seen(self) -> datetime:
        return _mono_to_datetime(self._row().last_seen)

    @property
    def last_ping(self) -> datetime:
        return _mono_to_datetime(self._row().last_ping)

    @last_ping.setter
    def last_ping(self, value: Any) -> None:
        self._registry.set_last_ping(self._handle, _datetime_to_mono(value))

    @property
    def is_alive(self) -> bool:
        row = self._registry.info(self._handle)
        return row is not None and row.state == _OPEN

    @is_alive.setter
    def is_alive(self, value: bool) -> None:
        if not value:  # the next sweep closes it
            self._registry.expire(self._handle)

    @property
    def state(self) -> str:
        row = self._registry.info(self._handle)
        code = row.state if row else _core.STATE_FREE
        return ("closed", "connecting", "open", "disconnecting", "closed")[code]

    messages_in = property(lambda self: self._row().messages_in, doc="messages received")
    messages_out = property(lambda self: self._row().messages_out, doc="messages sent")
    bytes_in = property(lambda self: self._row().bytes_in, doc="payload bytes received")
    bytes_out = property(lambda self: self._row().bytes_out, doc="payload bytes sent")

    @property
    def channels(self) -> list[str]:
        return self._registry.channels_of(self._handle)

    def model_dump(self) -> dict[str, Any]:
        """The fields as a dict (pydantic-style, for JSON responses)."""
        row = self._row()
        return {
            "connection_id": self.connection_id,
            "user_id": self.user_id,
            "connected_at": _mono_to_datetime(row.connected_at),
            "last_ping": _mono_to_datetime(row.last_ping),
            "last_seen": _mono_to_datetime(row.last_seen),
            "is_alive": row.state == _OPEN,
            "messages_in": row.messages_in, "messages_out": row.messages_out,
            "bytes_in": row.bytes_in, "bytes_out": row.bytes_out,
        }

    dict = model_dump

    def __repr__(self) -> str:
        return f"ConnectionInfo(connection_id={self.connection_id!r}, user_id={self.user_id!r}, state={self.state!r})"


class _View(Mapping):
    __slots__ = ("_m",)

    def __init__(self, manager: "WebSocketManager") -> None:
        self._m = manager

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"


class _ByConnectionId(_View):
    """A view keyed by connection id: its keys are the registry's ids."""

    __slots__ = ()

    def _conn(self, cid: object) -> Any:
        conn = self._m._lookup(cid) if isinstance(cid, str) else None
        if conn is None:
            raise KeyError(cid)
        return conn

    def __iter__(self) -> Iterator[str]:
        return iter(self._m._registry.ids())

    def __len__(self) -> int:
        return len(self._m._registry)

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, str) and self._m._registry.find(cid) is not None


class _ActiveConnections(_ByConnectionId):
    """connection_id -> WebSocket, backed by the registry."""

    __slots__ = ()

    def __getitem__(self, cid: str) -> Any:
        return self._conn(cid).websocket


class _ConnectionInfos(_ByConnectionId):
    """connection_id -> ConnectionInfo (live views of the registry)."""

    __slots__ = ()

    def __getitem__(self, cid: str) -> ConnectionInfo:
        conn = self._conn(cid)
        return ConnectionInfo(self._m._registry, conn.handle, conn.cid, conn.user_id)


class _UserConnections(_View):
    """user_id -> set of connection ids (snapshots)."""

    __slots__ = ()

    def __getitem__(self, user_id: str) -> set[str]:
        if not isinstance(user_id, str):
            raise KeyError(user_id)
        ids = self._m._registry.user_ids(user_id)
        if not ids:
            raise KeyError(user_id)
        return set(ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._m._registry.users())

    def __len__(self) -> int:
        return self._m._registry.stats()["total_users"]

    def __contains__(self, user_id: object) -> bool:
        return isinstance(user_id, str) and self._m._registry.user_count(user_id) > 0
