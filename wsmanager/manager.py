"""The drop-in ``WebSocketManager``.

The Python API of the seed's hand-written manager, kept thin: arguments are validated, a message
is serialized once, and everything about connections -- ids, users, channels, states,
timestamps, counters, target resolution, the stale sweep -- lives in the C registry
(``wsmanager._core``), whose loops run with the GIL released.

Delivery has two planes. On the *portable* plane (TestClient, stock uvicorn, any ASGI server)
each receiver's ASGI ``send`` is awaited concurrently under one per-broadcast timeout, so a slow
or dead peer never holds up the others. On the *native* plane (``--ws
wsmanager.uvicorn:WebSocketProtocol``) the C engine owns the socket and a broadcast is one C call.
Each plane is one object (``wsmanager._planes``), chosen per connection when it is attached.

What stands apart lives beside this module: the message encoding (``_encoding``), the heartbeat
and stale sweep (``_heartbeat``), ``get_stats()`` and the fan-out histogram (``_stats``), the
seed's dict-shaped views and ``ConnectionInfo`` (``_views``); the names are importable from here
as before.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from typing import Any, Callable

from starlette.websockets import WebSocketState

from . import _core, _detached, _heartbeat, _procs
from . import config as _config
from ._encoding import _default_dumps, _encode, _Encoded, _make_default_dumps  # noqa: F401 - importable here
from ._hooks import ConnectEvent, DisconnectEvent, Hooks, JoinEvent, Lanes, LeaveEvent  # noqa: F401 - importable here
from ._planes import _log_send_error, _native_extension, _NativePlane, _PortablePlane
from ._stats import FANOUT_BUCKETS, _FanoutLatency, local_stats  # noqa: F401 - FANOUT_BUCKETS: importable here
from ._views import ConnectionInfo, _ActiveConnections, _ConnectionInfos, _UserConnections
from .backends import Backend, LocalBackend
from .config import ConfigError
from .errors import close_code_reason, describe, is_disconnect_error

__all__ = ["WebSocketManager", "ConnectionInfo", "ConfigError", "ConnectEvent", "DisconnectEvent",
           "JoinEvent", "LeaveEvent"]

logger = logging.getLogger("wsmanager")

_REASON = {name: i for i, name in enumerate(_core.REASONS)}

_OPEN = _core.STATE_OPEN
_CONNECTING = _core.STATE_CONNECTING


# Options: types, ranges, defaults and variables are rows of wsmanager.config.OPTIONS.
_D = _config.defaults("manager")
#: The options ``configure()`` changes on a live manager.
_LIVE_OPTIONS = ("ping_interval", "ping_timeout", "max_connections_per_user", "max_connections",
                 "send_timeout", "close_timeout", "stale_timeout", "greeting", "json_heartbeat",
                 "hook_queue_limit")
#: The manager's variables (``from_env``), and the Redis backend's it passes on.
_ENV_KWARGS = frozenset(_config.names("manager"))
_REDIS_KWARGS = frozenset(_config.names("redis")) - {"redis_url"}


def _check_name(value: Any, what: str) -> str:
    """A connection id or a channel: a non-empty str."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    return value


def _check_cid(connection_id: Any) -> str:
    return _check_name(connection_id, "connection_id")


# --------------------------------------------------------------------------------------------
# per-connection Python state and views


class _Conn:
    """What only Python can hold for a connection: its WebSocket object and plane.

    ``plane`` (a :mod:`wsmanager._planes` object) sends to, fans out to and closes it: the
    portable plane from registration on, the native one once ``_attach`` finds the engine's
    handle (then also ``native``, the engine handle, and ``engine``).

    Its bound ``receive`` replaces the WebSocket's ASGI receive, so observing a connection costs
    two GC-tracked objects (this one and the bound method), not a closure with its cells.
    """

    __slots__ = ("handle", "cid", "user_id", "websocket", "native", "engine", "plane", "reason",
                 "manager", "asgi_receive")

    def __init__(self, manager: "WebSocketManager", handle: int, cid: str, user_id: str | None,
                 websocket: Any) -> None:
        self.manager = manager
        self.handle = handle
        self.cid = cid
        self.user_id = user_id
        self.websocket = websocket
        self.native = 0          # engine handle on the native plane
        self.engine: Any = None
        self.plane: Any = manager._portable
        self.reason: str | None = None   # why it went away, once known
        self.asgi_receive: Any = None

    async def receive(self) -> Any:
        """The endpoint's receive, observed: liveness, counters, JSON heartbeat, disconnect."""
        message = await self.asgi_receive()
        kind = message.get("type")
        manager = self.manager
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
                manager._registry.touch(self.handle, size)
                if size <= 256 and '"p' in text:  # cheap filter before parsing JSON
                    await manager._on_heartbeat_message(self, text)
            else:
                manager._registry.touch(self.handle, len(message.get("bytes") or b""))
        elif kind == "websocket.disconnect":
            manager._on_peer_gone(self, message)
        return message


class _Detached(_Conn):
    """The manager's record of a connection served by ``serve()`` (the detached shape).

    On the native plane, once handed over, it is all Python holds for the connection (no
    WebSocket, no protocol, no coroutine): the dispatcher routes the engine's events for it
    to ``engine_event``. ``handler`` and ``raw`` are ``serve()``'s; ``backlog`` holds the
    messages that wait for a suspended async handler (None otherwise); ``unacked`` and
    ``read_paused`` are its share of the engine's inbound flow control; ``failed``: its handler
    raised before (logged at ERROR once per connection). How it all works:
    :mod:`wsmanager._detached`.
    """

    __slots__ = ("handler", "raw", "backlog", "unacked", "read_paused", "failed")

    def __init__(self, manager: "WebSocketManager", handle: int, cid: str, user_id: str | None,
                 websocket: Any, handler: Callable[[str, Any], Any] | None, raw: bool) -> None:
        super().__init__(manager, handle, cid, user_id, websocket)
        self.handler = handler
        self.raw = raw
        self.backlog: Any = None
        self.unacked = 0
        self.read_paused = False
        self.failed = False  # its handler raised once already (_detached._failed)

    async def receive(self) -> Any:
        """The portable plane's receive, observed only for the disconnect: counting,
        the heartbeat and decoding are ``_detached.take``'s (once per message)."""
        message = await self.asgi_receive()
        if message.get("type") == "websocket.disconnect":
            self.manager._on_peer_gone(self, message)
        return message

    engine_event = _detached.engine_event
    released_by_engine = _detached.released_by_engine


class _Change:
    """A join or leave waiting on its connection's lane (``WebSocketManager._change_later``):
    ``kind`` "join" or "leave", None once a later change cancelled it."""

    __slots__ = ("kind",)

    def __init__(self, kind: str | None) -> None:
        self.kind = kind


class _Host:
    """The manager as its backend sees it: a :class:`wsmanager.backends.BackendHost` and
    nothing more (the contract is in :mod:`wsmanager.backends`)."""

    __slots__ = ("_m", "deliver", "local_stats")

    def __init__(self, manager: "WebSocketManager") -> None:
        self._m = manager
        self.deliver = manager._deliver_envelope  # bound once: called per received envelope
        self.local_stats = manager.get_stats

    @property
    def node_id(self) -> str:
        return self._m.node_id

    def local_users(self) -> set[str]:
        return set(self._m._registry.users())

    def local_channel_users(self, channel: str) -> set[str]:
        registry = self._m._registry
        handles = filter(None, map(registry.find, registry.channel_ids(channel)))
        return {user for user in map(registry.user_id, handles) if user}


# --------------------------------------------------------------------------------------------
# the manager


class WebSocketManager:
    """Manages WebSocket connections: registry, limits, delivery, heartbeat, stats.

    Options (all keyword arguments, also ``WSMANAGER_*`` variables for ``ws_manager``): their
    types, ranges, defaults and variables are rows of :data:`wsmanager.config.OPTIONS` (the
    README's Configuration table); a bad value raises :class:`ConfigError` naming the argument.

    ping_interval
        Seconds between JSON heartbeats ``{"type": "ping"}`` and stale sweeps; 0 turns both off.
        (The native engine also sends RFC 6455 pings; it reads the same variable.)
    ping_timeout
        Extra seconds of silence tolerated after a missed heartbeat. A connection silent for
        ``ping_interval + ping_timeout`` (or ``stale_timeout``) is closed as stale.
    max_connections_per_user
        Per-user limit (0/None: none). Over it, ``connect`` closes with 1008.
    max_connections
        Process-wide limit (0/None: none).
    send_timeout
        Seconds one send may take before its receiver is dropped as a slow consumer.
    close_timeout
        Seconds to wait for a close to be written.
    stale_timeout
        Overrides ``ping_interval + ping_timeout``.
    greeting
        Send ``{"type": "connection_established", ...}`` after accept (seed 004).
    json_heartbeat
        Send the JSON pings at all (the seed's clients expect them).
    hook_queue_limit
        Lifecycle-hook events that may wait for slow hooks (0: no limit); past it new events are
        dropped and counted (``get_stats()["hooks"]``), so connection churn cannot grow the
        queue without bound while a hook is stuck.
    json_dumps
        Serializer for dict/list messages (e.g. ``orjson.dumps(...).decode``).
    redis_url / redis_options / backend
        Scale-out across processes: ``RedisBackend(redis_url, **redis_options)``, or any
        ``wsmanager.backends.Backend``. Without either: ``LocalBackend``, nothing leaves the
        process.
    """

    def __init__(
        self,
        ping_interval: float = _D["ping_interval"],
        ping_timeout: float = _D["ping_timeout"],
        max_connections_per_user: int | None = _D["max_connections_per_user"],
        *,
        max_connections: int | None = _D["max_connections"],
        send_timeout: float = _D["send_timeout"],
        close_timeout: float = _D["close_timeout"],
        stale_timeout: float | None = _D["stale_timeout"],
        greeting: bool = _D["greeting"],
        json_heartbeat: bool = _D["json_heartbeat"],
        hook_queue_limit: int = _D["hook_queue_limit"],
        json_dumps: Callable[[Any], str] | None = None,
        redis_url: str | None = None,
        redis_options: Mapping[str, Any] | None = None,
        backend: Backend | None = None,
        capacity: int = 1024,
    ) -> None:
        self._set_options(_config.check_kwargs({
            "ping_interval": ping_interval, "ping_timeout": ping_timeout,
            "max_connections_per_user": max_connections_per_user,
            "max_connections": max_connections, "send_timeout": send_timeout,
            "close_timeout": close_timeout, "stale_timeout": stale_timeout, "greeting": greeting,
            "json_heartbeat": json_heartbeat, "hook_queue_limit": hook_queue_limit},
            _LIVE_OPTIONS, func="WebSocketManager"))
        if json_dumps is not None and not callable(json_dumps):
            raise TypeError("json_dumps must be callable")
        self._dumps = json_dumps or _default_dumps
        redis_url = _config.check("redis_url", redis_url or None)
        if redis_url and backend is not None:
            raise ValueError("pass redis_url or backend, not both")
        self.redis_url = redis_url
        if self.redis_url:
            # Built now (no I/O yet), so a bad URL or WSMANAGER_REDIS_* value fails at import,
            # not inside the first endpoint that connects.
            from .backends.redis import RedisBackend
            backend = RedisBackend(self.redis_url, **dict(redis_options or {}))
        elif redis_options:
            raise ValueError("redis_options needs redis_url")
        elif backend is not None and not isinstance(backend, Backend):
            raise TypeError(f"backend must be a wsmanager.backends.Backend, not {type(backend).__name__}")
        self._host = _Host(self)  # all the backend sees of the manager
        self._backend: Backend = backend if backend is not None else LocalBackend(self._host)
        # Presence before the backend starts (and after it stops) is this process's.
        self._local = self._backend if isinstance(self._backend, LocalBackend) else LocalBackend(self._host)
        self._backend_started = False
        # A started backend that spans processes: only then are envelopes built and the
        # backend's bookkeeping tasks spawned (for LocalBackend they would be no-ops, and the
        # hot paths stay as cheap as they are without scale-out).
        self._remote = False
        self._backend_lock: asyncio.Lock | None = None
        self.node_id = uuid.uuid4().hex
        self._registry = _core.Registry(capacity, self.stale_timeout)
        self._conns: dict[int, _Conn] = {}
        # One object per plane: what sending, fanning out and closing mean there.
        self._portable = _PortablePlane(self)
        self._native = _NativePlane(self)
        self._heartbeat_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        # on_connect / on_disconnect / on_join / on_leave; the bound is read per event (configure())
        self._hooks = Hooks(self._spawn, lambda: self.hook_queue_limit)
        # Each connection's backend calls and announcements, in order (key: connection id);
        # the joins and leaves waiting there, at most one per connection and channel.
        self._announcements = Lanes(self._spawn)
        self._changes: dict[tuple[_Conn, str], _Change] = {}
        self._started_at = time.time()
        self._latency = _FanoutLatency()
        self._ping_text = None  # built per heartbeat (it carries a timestamp)
        self.active_connections: Mapping[str, Any] = _ActiveConnections(self)
        self.connection_info: Mapping[str, ConnectionInfo] = _ConnectionInfos(self)
        self.user_connections: Mapping[str, set[str]] = _UserConnections(self)

    # ---- configuration ------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "WebSocketManager":
        """A manager configured from ``WSMANAGER_*`` variables (keyword ``overrides`` win).

        Every variable of :data:`wsmanager.config.OPTIONS` is read and validated -- the
        engine's, the handshake's and Redis' too -- so a bad one raises :class:`ConfigError`
        naming it; for ``ws_manager`` that is at ``import wsmanager``, i.e. at start-up."""
        given = _config.from_env(environ)
        options = {k: v for k, v in given.items() if k in _ENV_KWARGS}
        if "backend" in overrides or "redis_url" in overrides:
            options.pop("redis_url", None)
        if options.get("redis_url"):
            # The backend's variables from the same environment (given explicitly: RedisBackend
            # itself reads os.environ for what it is not given).
            redis = {k: v for k, v in given.items() if k in _REDIS_KWARGS}
            redis.update(overrides.pop("redis_options", None) or {})
            if redis:
                options["redis_options"] = redis
        return cls(**{**options, **overrides})

    def configure(self, **options: Any) -> None:
        """Changes heartbeat and limit options of a live manager (e.g. the module-level
        ``ws_manager`` in tests): the options of ``_LIVE_OPTIONS``, validated as the keyword
        arguments of ``WebSocketManager``. Without ``stale_timeout`` it follows the new
        ``ping_interval + ping_timeout``."""
        checked = _config.check_kwargs(options, _LIVE_OPTIONS, func="configure")
        current = {name: getattr(self, name) for name in _LIVE_OPTIONS if name != "stale_timeout"}
        self._set_options({**current, "stale_timeout": None, **checked})
        self._registry.stale_after = self.stale_timeout
        if self._heartbeat_task is not None and "ping_interval" in options:
            self._heartbeat_task.cancel()  # restarted with the new interval on next connect/start
            self._heartbeat_task = None

    def _set_options(self, values: Mapping[str, Any]) -> None:
        """Sets the validated ``_LIVE_OPTIONS``; a None ``stale_timeout`` is derived."""
        for name in _LIVE_OPTIONS:
            setattr(self, name, values[name])
        if self.stale_timeout is None:
            self.stale_timeout = _config.derived_default(
                "stale_timeout", {"ping_interval": self.ping_interval, "ping_timeout": self.ping_timeout})

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the heartbeat (and the backend) on the running loop. Idempotent; connect()
        calls it too, so it is optional."""
        self._ensure_heartbeat()
        await self._ensure_backend()

    async def stop(self, *, close_connections: bool = True, code: int = 1001,
                   reason: str = "server shutdown") -> None:
        """Stops the heartbeat, closes every connection (reason "shutdown"), stops the backend."""
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                await asyncio.gather(task, return_exceptions=True)
        if close_connections:
            conns = list(self._conns.values())
            for conn in conns:
                self._drop(conn, "shutdown", code)
            await asyncio.gather(*(c.plane.close(c, code, reason) for c in conns),
                                 return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._backend_started:
            self._backend_started = self._remote = False
            try:
                await self._backend.stop()
            except Exception as exc:  # noqa: BLE001 - shutdown must finish
                logger.warning("backend stop failed: %s", describe(exc))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """``FastAPI(lifespan=ws_manager.lifespan)``: starts the manager with the app and stops
        it (closing connections, leaving the cluster at once) when the server shuts down."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    def _ensure_heartbeat(self) -> None:
        if _procs.check_due and not self._backend.spans_processes:  # once per process: see wsmanager._procs
            _procs.schedule_check(asyncio.get_running_loop())
        if not self.ping_interval:
            return
        loop = asyncio.get_running_loop()
        task = self._heartbeat_task
        if task is not None and not task.done() and not task.get_loop().is_closed():
            return
        self._heartbeat_task = loop.create_task(_heartbeat.run(self), name="wsmanager-heartbeat")

    async def _ensure_backend(self) -> None:
        if self._backend_started:
            return
        if self._backend_lock is None:
            self._backend_lock = asyncio.Lock()
        async with self._backend_lock:
            if not self._backend_started:
                await self._backend.start(self._host)
                self._backend_started = True
                self._remote = self._backend.spans_processes

    # ---- lifecycle hooks (wsmanager._hooks) -----------------------------------------------

    def on_connect(self, hook: Callable[[ConnectEvent], Any] | None = None) -> Any:
        """Registers ``hook(event: ConnectEvent)`` (a decorator; sync or async): called for
        every connection ``connect()`` admitted. Why decorators, when and in which order hooks
        run, and what a failing one does: :mod:`wsmanager._hooks`."""
        return self._hooks.register("connect", hook)

    def on_disconnect(self, hook: Callable[[DisconnectEvent], Any] | None = None) -> Any:
        """Registers ``hook(event: DisconnectEvent)``: called once per connection that
        ``on_connect`` announced, after the manager unregistered it (so ``get_stats()`` and
        presence no longer count it), with its user, channels, reason and close code."""
        return self._hooks.register("disconnect", hook)

    def on_join(self, hook: Callable[[JoinEvent], Any] | None = None) -> Any:
        """Registers ``hook(event: JoinEvent)``: a connection joined a channel -- one of this
        manager's (``event.local``) or, with a backend that spans processes, another node's."""
        return self._hooks.register("join", hook)

    def on_leave(self, hook: Callable[[LeaveEvent], Any] | None = None) -> Any:
        """Registers ``hook(event: LeaveEvent)``: a connection left a channel, by ``leave()``
        (``event.reason`` None) or by disconnecting (one event per channel it was in, before its
        disconnect event); cluster-wide like ``on_join``."""
        return self._hooks.register("leave", hook)

    def remove_hook(self, hook: Any) -> bool:
        """Unregisters ``hook`` from every event; False when it was registered for none."""
        return self._hooks.remove(hook)

    def _presence(self) -> Backend:
        """Who answers presence: the backend once started, else this process's view."""
        return self._backend if self._backend_started else self._local

    # ---- connect / disconnect ------------------------------------------------------------

    async def connect(self, websocket: Any, connection_id: str, user_id: str | None = None, *,
                      subprotocol: str | None = None, headers: Iterable | None = None) -> bool:
        """Accepts and registers a connection. Returns False (after closing it with 1008
        "Connection limit reached") when the per-user or global limit is full."""
        conn = await self._admit(websocket, connection_id, user_id, subprotocol, headers,
                                 functools.partial(_Conn, self))
        return conn is not None

    async def serve(self, websocket: Any, connection_id: str, user_id: str | None = None,
                    handler: Callable[[str, Any], Any] | None = None, *, raw: bool = False,
                    subprotocol: str | None = None, headers: Iterable | None = None) -> bool:
        """Admits a connection like ``connect()`` and then serves it for the endpoint, which
        returns: the *detached* shape. False when a limit refused it (closed with 1008).

        Each inbound message is passed to ``handler(connection_id, message)`` (a plain
        function or a coroutine function; None: messages are only counted): the decoded JSON
        of a text frame -- what the seed's ``receive_json()`` returns -- or, with
        ``raw=True``, its ``str``; the ``bytes`` of a binary frame. The JSON heartbeat is the
        manager's (a ``{"type": "ping"}`` is answered, a ``{"type": "pong"}`` recorded; the
        handler gets neither); a text frame that is not JSON (without ``raw``) closes the
        connection with 1007 (``protocol_error``). One connection's messages are handled one
        at a time, in order; an async handler runs inline up to its first suspension and only
        then becomes a task. A handler's exception is logged (ERROR, ``wsmanager``) and the
        connection goes on. Limits, channels, sends, the hooks, the heartbeat, stats, the
        backend and ``stop()`` treat it as any other connection.

        Why a method of its own rather than ``connect(..., handler=...)``: the two return at
        different times. ``connect()`` returns once the connection is accepted, and the
        endpoint owns the receive loop; ``serve()`` returns when the endpoint has nothing left
        to do -- on the native plane at once (the engine keeps the socket, the manager's
        dispatcher calls the handler and the endpoint's coroutine, the WebSocket and the
        protocol are freed), on the portable plane, where an ASGI server closes a connection
        whose app returned, when the connection ends (the receive loop runs here, in the
        endpoint's task). A keyword that moved ``connect()``'s return to the end of the
        connection on one plane only would make the code after it run at different times on
        different servers; ``serve()`` means the same everywhere: when it returns, return.
        ``connect()`` stays exactly the seed's.

        After ``serve()`` the WebSocket is the manager's: send with ``send_message()``, end with
        ``disconnect()``. On the native plane ``active_connections[connection_id]`` is None
        (there is no WebSocket object any more). The endpoint's dependencies with ``yield``
        are finalized when the endpoint returns: a handler must not use them.
        """
        _detached.check_handler(handler)
        conn = await self._admit(websocket, connection_id, user_id, subprotocol, headers,
                                 functools.partial(_Detached, self, handler=handler, raw=bool(raw)))
        if conn is None:
            return False
        if conn.plane is self._native and _detached.hand_over(conn):
            return True
        await _detached.serve_portable(conn)
        return True

    async def _admit(self, websocket: Any, connection_id: str, user_id: str | None,
                     subprotocol: str | None, headers: Iterable | None,
                     record: Callable[..., _Conn]) -> _Conn | None:
        """``connect()``'s body for both shapes: limits, the backend's admission, the accept,
        the plane, the connect hook, the greeting. ``record(handle, cid, user_id, websocket)``
        makes the manager's record (``_Conn`` or ``_Detached``); None when not admitted."""
        _check_cid(connection_id)
        if user_id is not None and not isinstance(user_id, str):
            raise TypeError(f"user_id must be str or None, not {type(user_id).__name__}")
        if not hasattr(websocket, "accept") or not hasattr(websocket, "send"):
            raise TypeError(f"websocket must be a Starlette/FastAPI WebSocket, not {type(websocket).__name__}")
        self._ensure_heartbeat()
        self._hooks.loop = asyncio.get_running_loop()
        if not self._backend_started:
            await self._ensure_backend()
        try:
            handle = self._registry.add(connection_id, user_id,
                                        max_per_user=self.max_connections_per_user,
                                        max_total=self.max_connections)
        except _core.LimitReached as exc:
            return await self._reject(websocket, connection_id, user_id, exc.scope)
        try:
            admitted = await self._backend.reserve(connection_id, user_id, self.max_connections_per_user)
        except BaseException:
            self._registry.remove(handle)
            raise
        if not admitted:
            self._registry.remove(handle)
            return await self._reject(websocket, connection_id, user_id, "cluster")
        conn = record(handle, connection_id, user_id, websocket)
        self._conns[handle] = conn
        try:
            await websocket.accept(subprotocol=subprotocol, headers=headers)
        except BaseException as exc:
            self._forget(conn)
            if isinstance(exc, Exception) and is_disconnect_error(exc):
                logger.debug("connection %s went away during accept: %s", connection_id, describe(exc))
                self._registry.record_disconnect(_REASON["abrupt"])
                return None
            raise
        self._attach(conn)
        self._registry.set_state(handle, _OPEN)
        logger.debug("WebSocket connected: %s (user %s)", connection_id, user_id)
        self._hooks.connected(connection_id, user_id)
        if self.greeting:
            greeting = {"type": "connection_established", "connection_id": connection_id,
                        "user_id": user_id, "timestamp": datetime.now().isoformat()}
            if not await conn.plane.send_one(conn, _encode(greeting, self._dumps)):
                return None
        return conn

    async def _reject(self, websocket: Any, cid: str, user_id: str | None, scope: str) -> None:
        logger.warning("Connection limit reached for %s (%s limit); rejecting %s",
                       f"user {user_id}" if user_id else "the server", scope, cid)
        self._registry.record_disconnect(_REASON["limit"])
        # Accept, then close: a real client sees close code 1008 and its reason. A close
        # before accept would reach it only as an HTTP 403 without either.
        try:
            await websocket.accept()
            plane, extension = self._plane_of(websocket)
            await plane.refuse(websocket, cid, extension)
        except Exception as exc:  # noqa: BLE001 - the peer may already be gone
            _log_send_error(cid, exc)
        return None

    def _attach(self, conn: _Conn) -> None:
        """Observes the connection's inbound traffic: liveness, counters, JSON heartbeat and
        the disconnect event, without changing what the endpoint receives."""
        ws = conn.websocket
        plane, extension = self._plane_of(ws)
        plane.adopt(conn, extension)  # the connection's plane, for good
        # Starlette's WebSocket reads through its ``_receive`` attribute; a WebSocket-like
        # object without one is simply not observed (sends still work).
        original = getattr(ws, "_receive", None)
        if original is not None:
            conn.asgi_receive = original
            ws._receive = conn.receive

    def _plane_of(self, websocket: Any) -> tuple[Any, Any]:
        """The plane that carries an accepted ``websocket`` and, on the native plane, the
        engine's handle on it: the one place that asks which plane a connection is on."""
        extension = _native_extension(websocket)
        return (self._portable, None) if extension is None else (self._native, extension)

    async def _on_heartbeat_message(self, conn: _Conn, text: str) -> None:
        try:
            obj = json.loads(text)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind == "pong":
            self._registry.set_last_ping(conn.handle, _core.monotonic_ns())
        elif kind == "ping":
            await conn.plane.send_one(conn, _encode({"type": "pong"}, self._dumps))

    def _on_peer_gone(self, conn: _Conn, message: dict) -> None:
        """The endpoint received ``websocket.disconnect``: the reason by who closed first.

        The manager's own closes (limit, stale, slow consumer, shutdown, ``disconnect()``)
        unregister before they send, so they never get here. When the application closed the
        WebSocket itself, the code servers report afterwards is theirs, not the peer's
        (hypercorn: 1000, granian: 1005, uvicorn and daphne: the app's own): "normal". When
        the peer closed first, its close code decides (``errors.close_code_reason``) -- except
        on a server that never reports it (hypercorn's 1006 says only "the peer closed"):
        there a 1006 counts as "normal", since a clean close cannot be told from a dropped
        connection and the clean close is the common case.
        """
        code = message.get("code")
        reason = message.get("wsmanager.reason")
        if reason is None:
            if getattr(conn.websocket, "application_state", None) is WebSocketState.DISCONNECTED:
                reason = "normal"
            elif code == 1006 and _peer_codes_unreported():
                reason = "normal"
            else:
                reason = close_code_reason(code)
        if reason not in _REASON:
            reason = "abrupt"
        if self._conns.get(conn.handle) is conn:
            logger.debug("WebSocket %s closed by peer (code %s, %s)", conn.cid, code, reason)
            self._drop(conn, reason, code)

    async def disconnect(self, connection_id: str, code: int = 1000, reason: str = "") -> None:
        """Closes (if still open) and unregisters a connection. Idempotent."""
        _check_cid(connection_id)
        if not isinstance(code, int) or isinstance(code, bool):
            raise TypeError("code must be an int close code")
        if not isinstance(reason, str):
            raise TypeError("reason must be str")
        conn = self._lookup(connection_id)
        if conn is None:
            if self._remote:
                await self._publish({"kind": "disconnect", "target": connection_id,
                                     "code": code, "reason": reason})
            return
        self._drop(conn, conn.reason or "normal", code)
        await conn.plane.close(conn, code, reason)

    def _lookup(self, cid: str) -> _Conn | None:
        handle = self._registry.find(cid)
        return None if handle is None else self._conns.get(handle)

    def _forget(self, conn: _Conn) -> bool:
        if self._conns.get(conn.handle) is not conn:
            return False
        del self._conns[conn.handle]
        self._registry.remove(conn.handle)
        return True

    def _drop(self, conn: _Conn, reason: str, code: int | None = None) -> None:
        """Unregisters now (no further deliveries), counts the reason once, and tells the
        backend and the hooks -- the one path every disconnect takes, whichever side ended it
        (``code``: the close code the peer sent or the manager closes with)."""
        if conn.reason is None:
            conn.reason = reason
        if self._conns.get(conn.handle) is not conn:
            return
        channels, announced = self._last_look(conn)
        self._forget(conn)
        if type(conn) is _Detached and conn.backlog:
            _detached.discard_backlog(conn)
        if conn.asgi_receive is not None:
            # Unhook: breaks the WebSocket <-> _Conn cycle so both go by refcount, no GC pass.
            conn.websocket._receive = conn.asgi_receive
        self._registry.record_disconnect(_REASON[conn.reason])
        logger.debug("WebSocket disconnected: %s (%s)", conn.cid, conn.reason)
        if self._remote:
            self._announcements.add(conn.cid, functools.partial(self._released, conn, channels))
        if announced:
            self._hooks.dropped(conn.cid, conn.user_id, channels, conn.reason, code, self.node_id)

    def _last_look(self, conn: _Conn) -> tuple[tuple[str, ...], bool]:
        """What ``_drop`` must read before the registry forgets a connection, when someone will
        be told (the backend, a disconnect or leave hook): the channels it was in, and whether
        its connect was announced (one dropped during its accept never was)."""
        if not (self._remote or self._hooks.on_drop):
            return (), False
        registry = self._registry
        return tuple(sorted(registry.channels_of(conn.handle))), registry.state(conn.handle) != _CONNECTING

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            logger.warning("background task failed: %s", describe(exc))

    # ---- state queries ------------------------------------------------------------------

    def is_connected(self, connection_id: str) -> bool:
        conn = self._lookup(_check_cid(connection_id))
        if conn is None or self._registry.state(conn.handle) != _OPEN:
            return False
        ws = conn.websocket
        state = getattr(ws, "client_state", WebSocketState.CONNECTED)
        return state is WebSocketState.CONNECTED and getattr(
            ws, "application_state", WebSocketState.CONNECTED) is WebSocketState.CONNECTED

    def mark_disconnecting(self, connection_id: str) -> None:
        """No more deliveries to this connection (seed 002); disconnect() finishes it."""
        conn = self._lookup(_check_cid(connection_id))
        if conn is None:
            raise ValueError(f"unknown connection_id {connection_id!r}")
        self._registry.set_state(conn.handle, _core.STATE_DISCONNECTING)

    def is_disconnecting(self, connection_id: str) -> bool:
        conn = self._lookup(_check_cid(connection_id))
        return conn is not None and self._registry.state(conn.handle) == _core.STATE_DISCONNECTING

    # ---- delivery -----------------------------------------------------------------------

    async def send_message(self, connection_id: str, message: Any) -> bool:
        """Sends to one connection: dict/list as JSON, str as text, bytes as binary. False --
        never an exception -- when the peer is gone (it is then cleaned up)."""
        _check_cid(connection_id)
        encoded = _encode(message, self._dumps)
        conn = self._lookup(connection_id)
        if conn is None:
            if self._remote:
                return await self._publish({"kind": "conn", "target": connection_id}, encoded)
            logger.debug("send_message: connection %s not found", connection_id)
            return False
        if self._registry.state(conn.handle) != _OPEN:
            return False
        return await conn.plane.send_one(conn, encoded)

    async def broadcast(self, message: Any, exclude: Iterable[str] | None = None) -> int:
        """Sends to every open connection but the excluded ids; returns how many got it."""
        encoded = _encode(message, self._dumps)
        started = time.perf_counter()
        count = await self._deliver(self._registry.resolve_all(exclude), encoded)
        self._latency.observe("all", started)
        if self._remote:
            await self._publish({"kind": "all", "target": None, "exclude": _excl(exclude)}, encoded)
        return count

    async def send_to_user(self, user_id: str, message: Any) -> int:
        """Sends to every connection of ``user_id``; returns how many got it."""
        if not isinstance(user_id, str):
            raise TypeError(f"user_id must be str, not {type(user_id).__name__}")
        encoded = _encode(message, self._dumps)
        started = time.perf_counter()
        count = await self._deliver(self._registry.resolve_user(user_id), encoded)
        self._latency.observe("user", started)
        if self._remote:
            await self._publish({"kind": "user", "target": user_id}, encoded)
        return count

    def join(self, connection_id: str, channel: str) -> bool:
        """Adds a connection to a channel; False when it already was a member."""
        return self._membership(connection_id, channel, self._registry.join, "join")

    def leave(self, connection_id: str, channel: str) -> bool:
        """Removes a connection from a channel; False when it was not a member."""
        return self._membership(connection_id, channel, self._registry.leave, "leave")

    def _membership(self, connection_id: str, channel: str, change: Callable[[int, str], bool],
                    kind: str) -> bool:
        """``join``/``leave`` (``kind``): the registry's ``change``; when the membership changed,
        the hooks' event and, with a backend that spans processes, the announcement."""
        conn = self._require(connection_id)
        changed = change(conn.handle, _check_channel(channel))
        if changed:
            if self._remote:
                self._change_later(conn, kind, channel)
            self._hooks.membership(kind, conn.cid, conn.user_id, channel, self.node_id, True)
        return changed

    def _change_later(self, conn: _Conn, kind: str, channel: str) -> None:
        """Queues the backend's side of a join or leave on the connection's lane. At most one
        change per channel waits there: one that undoes the waiting change cancels it (the
        backend never needed to hear of either, nor the other nodes' hooks), one that redoes a
        cancelled change revives it. So a peer that joins and leaves as fast as it can keeps
        at most one waiting backend call per channel it changed, however slow the backend.
        From a thread without a loop (a plain ``def`` route) it hops onto the manager's."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            loop = self._hooks.loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._change_later, conn, kind, channel)
            return
        if self._conns.get(conn.handle) is not conn:
            return  # gone meanwhile (a hop from a thread): its release has been queued
        key = (conn, channel)
        waiting = self._changes.get(key)
        if waiting is not None:
            waiting.kind = None if waiting.kind is not None else kind
            return
        waiting = self._changes[key] = _Change(kind)
        self._announcements.add(conn.cid, functools.partial(self._apply_change, key, waiting))

    async def _apply_change(self, key: tuple[_Conn, str], change: "_Change") -> None:
        if self._changes.get(key) is change:
            del self._changes[key]
        if change.kind is not None:
            conn, channel = key
            await self._announce(change.kind, conn.cid, conn.user_id, channel)

    def channels_of(self, connection_id: str) -> list[str]:
        return self._registry.channels_of(self._require(connection_id).handle)

    def channel_members(self, channel: str) -> list[str]:
        """Connection ids in a channel (this process)."""
        return self._registry.channel_ids(_check_channel(channel))

    async def broadcast_to_channel(self, channel: str, message: Any,
                                   exclude: Iterable[str] | None = None) -> int:
        """Sends to every member of ``channel`` but the excluded ids; returns how many got it."""
        _check_channel(channel)
        encoded = _encode(message, self._dumps)
        started = time.perf_counter()
        count = await self._deliver(self._registry.resolve_channel(channel, exclude), encoded)
        self._latency.observe("channel", started)
        if self._remote:
            await self._publish({"kind": "channel", "target": channel, "exclude": _excl(exclude)}, encoded)
        return count

    def _require(self, connection_id: str) -> _Conn:
        conn = self._lookup(_check_cid(connection_id))
        if conn is None:
            raise ValueError(f"unknown connection_id {connection_id!r}")
        return conn

    async def _deliver(self, targets: _core.Targets, encoded: _Encoded) -> int:
        """Fans one encoded message out to resolved targets, each plane its share."""
        count = 0
        if targets.native_count:
            count += self._native.fanout(targets, encoded)
        if targets.portable_count:
            count += await self._portable.fanout(targets, encoded)
        return count

    # ---- scale-out ----------------------------------------------------------------------

    async def _announce(self, kind: str, cid: str, user_id: str | None, channel: str) -> None:
        """A join or leave, cluster-wide: the backend's presence first (``joined``/``left``),
        then an envelope for the other nodes' hooks -- published only once presence is
        recorded, so a hook there that asks ``channel_presence()`` finds it up to date."""
        if kind == "join":
            await self._backend.joined(cid, user_id, channel)
        else:
            await self._backend.left(cid, user_id, channel)
        await self._publish_membership(kind, cid, user_id, channel, "")

    async def _released(self, conn: _Conn, channels: tuple[str, ...]) -> None:
        """A connection gone, cluster-wide: the backend's ``release`` (its memberships with it),
        then a ``leave`` envelope per channel it was in, for the other nodes' hooks."""
        await self._backend.release(conn.cid, conn.user_id)
        for channel in channels:
            await self._publish_membership("leave", conn.cid, conn.user_id, channel, conn.reason or "")

    async def _publish_membership(self, kind: str, cid: str, user_id: str | None, channel: str,
                                  reason: str) -> None:
        await self._publish({"kind": kind, "target": channel, "connection_id": cid,
                             "user_id": user_id, "reason": reason})

    async def _publish(self, envelope: dict, encoded: _Encoded | None = None) -> bool:
        envelope["node"] = self.node_id
        if encoded is not None:
            payload = encoded.payload
            envelope["text"] = payload if isinstance(payload, str) else None
            envelope["data"] = payload if isinstance(payload, bytes) else None
        try:
            await self._backend.publish(envelope)
        except Exception as exc:  # noqa: BLE001 - local delivery already happened
            logger.warning("publish to backend failed: %s", describe(exc))
            return False
        return True

    async def _deliver_envelope(self, envelope: dict) -> int:
        """Local delivery of an envelope published by another process: the host's ``deliver``
        (``_Host``), the backend's one way into the manager."""
        kind, target = envelope.get("kind"), envelope.get("target")
        if kind in ("join", "leave"):
            self._remote_membership(envelope)
            return 0
        if kind == "disconnect":
            conn = self._lookup(target) if isinstance(target, str) else None
            if conn is not None:
                await self.disconnect(target, envelope.get("code", 1000), envelope.get("reason", ""))
                return 1
            return 0
        text, data = envelope.get("text"), envelope.get("data")
        payload = text if text is not None else data
        if payload is None:
            return 0
        encoded = _encode(payload, self._dumps)
        exclude = envelope.get("exclude") or None
        if kind == "all":
            return await self._deliver(self._registry.resolve_all(exclude), encoded)
        if kind == "user" and isinstance(target, str):
            return await self._deliver(self._registry.resolve_user(target), encoded)
        if kind == "channel" and isinstance(target, str):
            return await self._deliver(self._registry.resolve_channel(target, exclude), encoded)
        if kind == "conn" and isinstance(target, str):
            conn = self._lookup(target)
            if conn is not None and self._registry.state(conn.handle) == _OPEN:
                return int(await conn.plane.send_one(conn, encoded))
        return 0

    def _remote_membership(self, envelope: dict) -> None:
        """Another node's join or leave: this manager's hooks hear of it (nothing to deliver)."""
        channel, cid = envelope.get("target"), envelope.get("connection_id")
        if not (isinstance(channel, str) and isinstance(cid, str)):
            raise ValueError(f"a {envelope.get('kind')} envelope needs a channel and a connection id")
        reason = envelope.get("reason") or None
        self._hooks.membership(envelope["kind"], cid, envelope.get("user_id"), channel,
                               str(envelope.get("node")), False, reason if reason in _REASON else None)

    async def online_users(self) -> list[str]:
        """Users with at least one connection (cluster-wide with a backend)."""
        return sorted(await self._presence().online_users())

    async def channel_presence(self, channel: str) -> list[str]:
        """Users present in a channel (cluster-wide with a backend)."""
        _check_channel(channel)
        return sorted(await self._presence().channel_members(channel))

    # ---- heartbeat and cleanup (wsmanager._heartbeat) ------------------------------------

    async def cleanup_stale_connections(self) -> int:
        """Closes and unregisters every connection silent for longer than ``stale_timeout``
        (O(expired), not O(connections)); returns how many."""
        return await _heartbeat.sweep_stale(self)

    # ---- stats --------------------------------------------------------------------------

    def get_stats(self, scope: str = "local") -> dict[str, Any]:
        """Connection statistics (the seed's keys first). ``scope="cluster"`` aggregates every
        process when a backend is configured (the backend's ``cluster_stats()``; with
        ``LocalBackend`` the local stats)."""
        if scope == "cluster":
            return self._backend.cluster_stats()
        if scope != "local":
            raise ValueError(f"scope must be 'local' or 'cluster', not {scope!r}")
        return local_stats(self)

    def __repr__(self) -> str:
        return (f"WebSocketManager(connections={len(self._registry)}, ping_interval={self.ping_interval}, "
                f"max_connections_per_user={self.max_connections_per_user})")


def _excl(exclude: Iterable[str] | None) -> list[str]:
    if exclude is None:
        return []
    if isinstance(exclude, (str, bytes)):
        raise TypeError("exclude must be a collection of connection ids (e.g. a set), not a str")
    return list(exclude)


#: Modules of ASGI servers whose ``websocket.disconnect`` carries no close code of the peer:
#: hypercorn (0.18 and before, pgjones/hypercorn#127) reports 1000 when the app closed first
#: and 1006 whenever the peer did -- after a clean Close frame as after a dropped connection.
_NO_PEER_CODE_SERVERS = ("hypercorn.protocol.ws_stream",)


def _peer_codes_unreported() -> bool:
    """True when this process is served by a server of ``_NO_PEER_CODE_SERVERS`` (its module
    is loaded: imported by the server, not by applications). Asked only for a 1006."""
    return any(name in sys.modules for name in _NO_PEER_CODE_SERVERS)


def _check_channel(channel: Any) -> str:
    return _check_name(channel, "channel")
