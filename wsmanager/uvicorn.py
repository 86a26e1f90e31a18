"""A uvicorn WebSocket protocol that hands each socket to the native engine after the handshake.

Enable it with ``uvicorn app:app --ws wsmanager.uvicorn:WebSocketProtocol``,
``uvicorn.run(app, ws="wsmanager.uvicorn:WebSocketProtocol")`` or ``python -m wsmanager app:app``.

The protocol parses and validates the upgrade request, runs the ASGI app and answers
``websocket.accept`` with the 101 response. From then on the C engine (``_core.Engine``, one per
process, one I/O thread) owns the socket: it takes a duplicate of the descriptor, the transport
closes its own at once (one fd per connection), and the engine parses and writes frames, pings,
detects stale and slow peers and runs the closing handshake. This object stays in uvicorn's
``server_state.connections`` until the engine reports the connection gone, so a graceful
shutdown waits for every closing handshake. TLS connections (``--ssl-*``) are served by
uvicorn's own protocol instead (websockets-sansio, else wsproto): the engine takes plain
sockets only, and the manager uses the portable plane for them.

Options (types, ranges, defaults: the ``engine`` and ``protocol`` rows of
:data:`wsmanager.config.OPTIONS`, the README's Configuration table). The engine's are read when
the engine starts: keyword arguments of :func:`configure_engine` win over ``WSMANAGER_*``
variables, which win over uvicorn's ``--ws-ping-interval``, ``--ws-ping-timeout`` and
``--ws-max-size`` when those differ from uvicorn's own defaults (20 s, 20 s, 16 MiB: the
table's defaults replace those, so ``WSMANAGER_PING_INTERVAL`` has one default on both planes).
The protocol's (``WSMANAGER_ALLOWED_ORIGINS``, ``WSMANAGER_MAX_HEADER_BYTES``,
``WSMANAGER_LOOP_SLICE_US``, ``WSMANAGER_GC_FREEZE``, ``WSMANAGER_PER_MESSAGE_DEFLATE``, and
``WSMANAGER_HANDSHAKE_TIMEOUT`` / ``WSMANAGER_MAX_HANDSHAKES`` of ``wsmanager/_http.py``) are
read at import.

permessage-deflate (RFC 7692) is negotiated in :meth:`WebSocketProtocol.validate` by
``wsmanager/_deflate.py`` (the parameters' one owner) when :func:`deflate_enabled`: then the
101 carries the agreed ``Sec-WebSocket-Extensions`` and the engine gets the client's window
(``Engine.register(deflate=bits)``); the engine compresses and inflates (csrc/deflate.h). A bad value stops the server at start-up with
a ``ConfigError`` naming the variable (importing wsmanager validates every variable).

Before the 101, with ``--http wsmanager.uvicorn:HTTPProtocol`` (``python -m wsmanager`` passes
it; uvicorn's own HTTP protocol, httptools or h11, plus the defences of ``wsmanager/_http.py``):
a request-head timeout and a cap on connections waiting for their request head.

A connection that has not sent a complete request head within the timeout (of its start, or
of the first byte after a response) is closed; above the cap the oldest waiting one is closed
(one WARNING per burst); an HTTP/1.0 upgrade answers 400. Without that HTTP protocol none of
this happens (uvicorn's never times out a half-sent head, and rewrites the request line to
HTTP/1.1 before this protocol sees it): the first WebSocket logs one WARNING saying so. Out of
descriptors (or memory) when handing a socket to the engine, the client gets ``503 Service
Unavailable`` with ``Retry-After: 1`` and the app a disconnect (one WARNING per burst). The
counters: :func:`handshake_stats`.

``WSMANAGER_LOOP_SLICE_US`` (0 leaves the thread alone): the scheduler slice asked
for the event-loop thread when the first native connection arrives. While broadcasts keep the
I/O thread busy, the event-loop thread is preempted now and then (writing a response wakes the
client, on loopback on the same core); with the kernel's default slice the busy I/O thread may
then run until the next scheduler tick before the event-loop thread gets the core back, with a
short slice the event-loop thread has the earlier deadline and is picked first (EEVDF, Linux
6.12 and later; older kernels ignore it). Its share of the CPU does not change. benchmarks/RESULTS.md ("Event-loop freedom") measures the HTTP
latency during broadcasts with and without it.

``WSMANAGER_GC_FREEZE`` (on by default): when the first native connection arrives (the app is
imported and its lifespan has started), a collection of the young generations and then
``gc.freeze()``, unless something froze objects already. What the app made until then
(FastAPI's, pydantic's and the app's own objects: most of what a process holds) moves to the
permanent generation, which the collector never walks again, so a full collection's pause is
that of what came after: on the native plane's detached shape, one object per connection. Those
objects stay alive, as nearly all of them would have anyway (cyclic garbage of the start-up
that reached the oldest generation is kept too). Measured in benchmarks/RESULTS.md ("Density").
"""
from __future__ import annotations

import asyncio
import atexit
import base64
import collections
import email.utils
import enum
import errno
import gc
import hashlib
import inspect
import logging
import sys
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from uvicorn.config import Config
from uvicorn.protocols.utils import (
    ClientDisconnected,
    get_client_addr,
    get_local_addr,
    get_path_with_query_string,
    get_remote_addr,
    is_ssl,
)
from uvicorn.server import ServerState

from . import _core
from . import _deflate
from . import config as _config

if not sys.platform.startswith("linux") or not hasattr(_core, "Engine"):
    raise ImportError(
        "wsmanager.uvicorn: the native plane needs Linux (epoll, eventfd); run uvicorn with its "
        "default --ws instead, WebSocketManager keeps working on the portable plane"
    )

__all__ = ["WebSocketProtocol", "configure_engine", "get_engine", "NativeConnection",
           "HTTPProtocol", "H11HTTPProtocol", "HttpToolsHTTPProtocol", "handshake_stats"]

logger = logging.getLogger("uvicorn.error")  # access lines and app errors, as uvicorn's protocols
_log = logging.getLogger("wsmanager")  # the engine's own messages

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: The engine's options (``_core.Engine`` keywords): rows of wsmanager.config.OPTIONS.
ENGINE_OPTIONS: tuple[str, ...] = _config.names("engine")
# uvicorn's --ws-* flags the engine honours: (flag, Config attribute, option). A value equal to
# uvicorn's own default counts as not given, so the table's default applies.
_UVICORN_FLAGS = (("--ws-ping-interval", "ws_ping_interval", "ping_interval"),
                  ("--ws-ping-timeout", "ws_ping_timeout", "ping_timeout"),
                  ("--ws-max-size", "ws_max_size", "max_message_size"))
_UVICORN_DEFAULTS = {attr: inspect.signature(Config.__init__).parameters[attr].default
                     for _, attr, _ in _UVICORN_FLAGS}

# Disconnect reasons as the engine names them; "why" argument of Engine.close.
_WHY_NORMAL = _core.REASONS.index("normal")
_WHY_ABRUPT = _core.REASONS.index("abrupt")
_WHY_SHUTDOWN = _core.REASONS.index("shutdown")
_EV_DISCONNECT = _core.EV_DISCONNECT


def engine_options(config: Config | None = None, **overrides: Any) -> dict[str, Any]:
    """The engine options that are set, validated (wsmanager.config): keyword ``overrides``
    (None: not set), then WSMANAGER_* variables, then uvicorn's ``--ws-*`` flags that differ
    from uvicorn's defaults. What is not here takes the table's default (:func:`get_engine`)."""
    options: dict[str, Any] = {}
    if config is not None:
        for flag, attr, name in _UVICORN_FLAGS:
            value = getattr(config, attr, None)
            if value == _UVICORN_DEFAULTS[attr]:
                continue
            if value is None:  # --ws-ping-interval None: no pings; a None timeout: not set
                if name != "ping_interval":
                    continue
                value = 0.0
            options[name] = _config.check(name, value, what=flag)
    given = _config.from_env()
    options.update((name, given[name]) for name in ENGINE_OPTIONS if name in given)
    options.update(_config.check_kwargs({k: v for k, v in overrides.items() if v is not None},
                                        ENGINE_OPTIONS, func="engine_options"))
    return options


# Read once, at import: a bad value stops the server at start-up, naming the variable.
_protocol = _config.values("protocol")
MAX_HEADER_BYTES: int = _protocol["max_header_bytes"]
ALLOWED_ORIGINS: frozenset[str] = _protocol["allowed_origins"]
LOOP_SLICE_US: int = _protocol["loop_slice_us"]
GC_FREEZE: bool = _protocol["gc_freeze"]
#: WSMANAGER_PER_MESSAGE_DEFLATE when set, else None: uvicorn's ``ws_per_message_deflate`` decides.
PER_MESSAGE_DEFLATE: bool | None = _config.from_env().get("per_message_deflate")


def deflate_enabled(config: Config) -> bool:
    """Whether the native plane negotiates permessage-deflate: ``WSMANAGER_PER_MESSAGE_DEFLATE``
    when set, else uvicorn's ``--ws-per-message-deflate`` (``Config.ws_per_message_deflate``,
    on by default)."""
    if PER_MESSAGE_DEFLATE is not None:
        return PER_MESSAGE_DEFLATE
    return bool(getattr(config, "ws_per_message_deflate", True))

# -- before the 101 ---------------------------------------------------------------------------
# The request-head timeout, the cap and the HTTP/1.0 refusal live in the HTTP protocol
# (wsmanager/_http.py, loaded by uvicorn from --http); the 503 at descriptor exhaustion here.

_HANDSHAKE_COUNTS = {"timed_out": 0, "evicted": 0, "http10_refused": 0, "unavailable": 0}
_HTTP_GUARD_MODULE = __name__.rpartition(".")[0] + "._http"
_http_checked = False
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def handshake_stats() -> dict[str, int]:
    """This process's counters before the 101: ``waiting`` (connections waiting for their
    request head now), ``timed_out`` (closed by the request-head timeout), ``evicted`` (closed
    as the oldest waiting above the cap), ``http10_refused`` (HTTP/1.0 upgrades answered 400),
    ``unavailable`` (out of descriptors or memory at the hand-off, answered 503). The first four
    need ``--http wsmanager.uvicorn:HTTPProtocol``."""
    guard = sys.modules.get(_HTTP_GUARD_MODULE)
    return {"waiting": guard.waiting() if guard is not None else 0, **_HANDSHAKE_COUNTS}


class _Burst:
    """One log line per burst of like events, not one per event: the first event of a quiet
    spell schedules the line ``window`` seconds later, and every event until then is counted in
    it, so a steady stream logs once per window, each line with the count since the last.
    ``fmt`` takes the count, the window, then ``args`` (the last event's, when it gave some).
    Event-loop thread only."""

    __slots__ = ("level", "fmt", "args", "window", "count", "pending")

    def __init__(self, level: int, fmt: str, *args: Any, window: float = 1.0) -> None:
        self.level, self.fmt, self.args, self.window = level, fmt, args, window
        self.count = 0
        self.pending: asyncio.TimerHandle | None = None

    def add(self, loop: asyncio.AbstractEventLoop, *args: Any) -> None:
        self.count += 1
        if args:
            self.args = args
        if self.pending is None:
            try:
                self.pending = loop.call_later(self.window, self.flush)
            except RuntimeError:  # the loop is closing: say it now
                self.flush()

    def flush(self) -> None:
        self.pending = None
        count, self.count = self.count, 0
        if count:
            _log.log(self.level, self.fmt, count, self.window, *self.args)


_unavailable = _Burst(
    logging.WARNING,
    "native plane: answered %d WebSocket handshake(s) in %.0f s with 503 Service Unavailable: "
    "out of file descriptors (or memory) when handing the socket to the engine (last: %s); "
    "raise the descriptor limit (ulimit -n, LimitNOFILE=) or lower the connection cap", "?")


def _check_http_protocol(config: Config) -> None:
    """Once per process, at the first WebSocket: warns when uvicorn's HTTP protocol is not one
    of wsmanager's (it has no request-head timeout). Without it an HTTP/1.0 upgrade cannot be
    refused either: uvicorn rewrites the request line to HTTP/1.1 before this protocol sees it."""
    global _http_checked
    _http_checked = True
    cls = getattr(config, "http_protocol_class", None)
    guard = sys.modules.get(_HTTP_GUARD_MODULE)
    if guard is not None and isinstance(cls, type) and issubclass(cls, guard.HandshakeGuard):
        return
    name = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)
    _log.warning(
        "native plane: uvicorn's HTTP protocol %s does not time out connections that never "
        "complete their request head, so half-open requests (slowloris) hold their descriptors "
        "forever; serve with `python -m wsmanager`, or pass `--http wsmanager.uvicorn:HTTPProtocol` "
        "(uvicorn.run(..., http=\"wsmanager.uvicorn:HTTPProtocol\"))", name)


def __getattr__(name: str) -> Any:
    # The HTTP protocol classes come from wsmanager._http, which imports this module: loaded on
    # first use (uvicorn's --http loads them at start-up), so neither import order breaks.
    if name in ("HTTPProtocol", "H11HTTPProtocol", "HttpToolsHTTPProtocol"):
        import importlib

        return getattr(importlib.import_module(_HTTP_GUARD_MODULE), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_engine: Any = None
_engine_overrides: dict[str, Any] = {}
_ack_every = 256 * 1024  # consumed inbound bytes reported to the engine at once


def configure_engine(**options: Any) -> None:
    """Sets engine options (``ENGINE_OPTIONS``) before the engine starts, validated now
    (ConfigError naming the argument); they win over the variables. None takes an option's
    setting back. RuntimeError once the engine runs."""
    unknown = set(options) - set(ENGINE_OPTIONS)
    if unknown:
        raise TypeError(f"configure_engine() got unexpected keyword argument(s) "
                        f"{', '.join(sorted(unknown))}; it takes {', '.join(ENGINE_OPTIONS)}")
    checked = _config.check_kwargs({k: v for k, v in options.items() if v is not None},
                                   ENGINE_OPTIONS, func="configure_engine")
    if _engine is not None:
        raise RuntimeError("the native engine is already running")
    for name, value in options.items():
        if value is None:
            _engine_overrides.pop(name, None)
    _engine_overrides.update(checked)


def get_engine(config: Config | None = None) -> Any:
    """The process's engine, started on first use (after a fork, in the worker)."""
    global _engine, _ack_every
    if _engine is None:
        options = {**_config.defaults("engine"), **engine_options(config, **_engine_overrides)}
        _engine = _core.Engine(**options)
        _ack_every = max(1, _engine.options["read_limit"] // 4)
        atexit.register(_stop_engine)
    return _engine


def _stop_engine() -> None:
    global _engine
    if _engine is not None:
        _engine.shutdown()


class NativeConnection:
    """``scope["extensions"]["wsmanager.native"]``: the engine and, once accepted, the handle."""

    __slots__ = ("engine", "handle")

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.handle: int | None = None

    def __repr__(self) -> str:
        return f"<NativeConnection handle={self.handle!r}>"

    def detach(self, sink: Any) -> bool:
        """Hands the accepted connection over to ``sink`` (``WebSocketManager.serve()``'s
        record): see :meth:`WebSocketProtocol.detach`. The protocol is found through the
        dispatcher's routing, so this object holds no reference to it (none to break later)."""
        d = _dispatcher_of_process
        protocol = d.protocols.get(self.handle) if d is not None and self.handle is not None else None
        return isinstance(protocol, WebSocketProtocol) and protocol.detach(sink)


class _Dispatcher:
    """Routes the engine's events to protocols: the engine's eventfd read by one event loop."""

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        # Engine handle -> what its events go to: the protocol, or, once the app detached the
        # connection (WebSocketProtocol.detach), the manager's record of it. Either has
        # engine_event(kind, payload, nbytes) and released_by_engine(code, reason, why).
        self.protocols: dict[int, Any] = {}
        # The detached connections of each uvicorn server (its ServerState), keyed by the id
        # of its connection set, which the group holds (so the id is not reused).
        self.groups: dict[int, _DetachedGroup] = {}
        loop.add_reader(engine.fileno(), self.on_events)
        if GC_FREEZE and gc.get_freeze_count() == 0:  # the app's start-up is over: keep it frozen
            t0 = time.perf_counter()
            gc.collect(1)  # the young generations only: a full collection would pause for all of it
            gc.freeze()
            _log.debug("native plane: %d objects frozen in %.1f ms", gc.get_freeze_count(),
                       (time.perf_counter() - t0) * 1000)
        if LOOP_SLICE_US:  # made in the loop's thread: that is the thread whose slice is set
            got = _core.set_thread_slice(LOOP_SLICE_US * 1000)
            _log.debug("native plane: event-loop thread slice %s", f"{got} ns" if got else
                         "unchanged (no per-thread slices in this kernel)")

    def on_events(self) -> None:
        protocols = self.protocols
        try:
            events = self.engine.drain()
        except Exception:  # MemoryError: nothing left to deliver, but the reader must live on
            _log.exception("native plane: could not take the engine's events")
            return
        for kind, handle, payload, nbytes in events:
            protocol = protocols.get(handle)
            if protocol is None:
                continue
            try:
                protocol.engine_event(kind, payload, nbytes)
            except Exception:  # one broken connection must not lose the rest of the batch
                _log.exception("native plane: error while delivering an engine event; "
                               "closing that connection")
                self.abandon(protocol, handle)
            else:
                if kind == _EV_DISCONNECT and self.groups:
                    self.release(handle)

    def release(self, handle: int) -> None:
        """The engine let go of a connection: it leaves the routing and, if detached, its
        server's group (a protocol removes itself from both in ``released_by_engine``)."""
        self.protocols.pop(handle, None)
        for group in self.groups.values():
            group.discard(handle)

    def group(self, server_state: ServerState) -> _DetachedGroup:
        key = id(server_state.connections)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _DetachedGroup(self, server_state.connections)
        return group

    def abandon(self, protocol: Any, handle: int) -> None:
        """Ends a connection whose event could not be handled: the engine closes it (1011) and
        the app sees a disconnect now, so its manager unregisters it; the engine's own
        disconnect event comes later and finds nobody."""
        self.release(handle)  # the rest of its events, in this batch too, go nowhere
        try:
            self.engine.close(handle, 1011, "internal error", _WHY_ABRUPT)
            protocol.released_by_engine(1011, "internal error", "abrupt")
        except Exception:
            _log.exception("native plane: could not close connection %s", handle)

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.remove_reader(self.engine.fileno())


class _DetachedGroup:
    """Stands for one uvicorn server's detached connections in its ``server_state.connections``.

    A detached connection has no protocol object left, yet uvicorn's graceful shutdown must
    still close it (``shutdown()`` on everything in that set) and wait for its closing
    handshake (until the set is empty), as it does for a connection whose app still runs.
    One object per server does both: it is in the set while it holds a connection, and its
    ``shutdown()`` closes each with 1012 and tells the manager at once (reason "shutdown"),
    as the protocol's does. Per connection it costs one entry in ``handles``. (uvicorn's
    ``--limit-concurrency`` counts the group as one connection.)
    """

    __slots__ = ("dispatcher", "connections", "handles")

    def __init__(self, dispatcher: _Dispatcher, connections: set) -> None:
        self.dispatcher = dispatcher
        self.connections = connections
        self.handles: set[int] = set()

    def add(self, handle: int) -> None:
        self.handles.add(handle)
        self.connections.add(self)

    def discard(self, handle: int) -> None:
        handles = self.handles
        if handle in handles:
            handles.discard(handle)
            if not handles:
                self.connections.discard(self)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: every detached connection of this server is closed
        with 1012; the group leaves ``connections`` once the engine reported each one gone."""
        engine, protocols = self.dispatcher.engine, self.dispatcher.protocols
        for handle in list(self.handles):
            sink = protocols.get(handle)
            try:
                if engine.close(handle, 1012, "", _WHY_SHUTDOWN) and sink is not None:
                    sink.released_by_engine(1012, "", "shutdown")
            except Exception:  # one connection must not stop the shutdown of the others
                _log.exception("native plane: could not shut down connection %s", handle)

    def __repr__(self) -> str:
        return f"<_DetachedGroup of {len(self.handles)} detached connection(s)>"


_dispatcher_of_process: _Dispatcher | None = None


def _dispatcher(engine: Any, loop: asyncio.AbstractEventLoop) -> _Dispatcher:
    """The process's dispatcher; moved to a new loop once the old one is closed or idle (tests
    run servers one after another), refused while another loop still has live connections."""
    global _dispatcher_of_process
    d = _dispatcher_of_process
    if d is not None and d.loop is loop:
        return d
    if d is not None:
        if d.protocols and not d.loop.is_closed():
            raise RuntimeError("wsmanager's native engine serves one event loop per process")
        d.close()
    d = _dispatcher_of_process = _Dispatcher(engine, loop)
    return d


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


def _tls_protocol_class() -> type[asyncio.Protocol]:
    """uvicorn's own protocol for TLS connections (the engine only takes plain sockets)."""
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
        return WebSocketsSansIOProtocol
    except ImportError:
        from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
        return WSProtocol


class _Inbox:
    """What the app has yet to receive, each message with what the engine charged for it to the
    connection's inbound budget (payload + a fixed per-message charge; acknowledged to the
    engine when the app takes it, so reading resumes). A deque and at most one waiter: an asyncio.Queue plus a
    deque of sizes cost seven GC-tracked objects per connection, this costs two, and every
    generation-2 collection walks them for each of thousands of idle connections."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque[tuple[dict[str, Any], int]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def put(self, message: dict[str, Any], nbytes: int) -> None:
        self.items.append((message, nbytes))
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self.items

    async def get(self) -> tuple[dict[str, Any], int]:
        while not self.items:
            if self.waiter is not None:
                raise RuntimeError("receive() is already being awaited by another task")
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()


class _Phase(enum.Enum):
    """Where a native connection is in its life; it only moves forward (down this list).

    ``app_closed`` (who ended it), ``disconnect_queued`` (the inbox has its last message) and
    ``read_paused`` (flow control) are facts beside the phase, not phases."""

    HEAD = "head"            # reading the request head
    HANDSHAKE = "handshake"  # head parsed, the app decides: accept, close (403), HTTP response
    RESPONSE = "response"    # the app is sending websocket.http.response.body
    OPEN = "open"            # accepted: the engine owns the socket, frames flow both ways
    CLOSING = "closing"      # no more frames from the app (its close, the server's shutdown,
                             # its return); the engine holds the socket until it reports the end
    CLOSED = "closed"        # over: answered without a 101, released by the engine, or lost
    DETACHED = "detached"    # the app gave the connection to the manager (detach()): the
                             # engine's events go to the manager's record; this object is done


class _HandshakeError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or []


class WebSocketProtocol(asyncio.Protocol):
    """uvicorn ws protocol class of the native plane (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        if not _http_checked:
            _check_http_protocol(config)
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.root_path = config.root_path
        self.app_state = app_state
        self.server_state = server_state
        # On a TLS connection every call goes to uvicorn's own protocol (portable plane).
        self.delegate: Any = None

        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.default_headers = server_state.default_headers

        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "ws"

        self.queue = _Inbox()
        self.writable: asyncio.Event | None = None  # made at the first pause: most never need one
        self.buffer = bytearray()  # request head, then bytes that came after it
        self.phase = _Phase.HEAD
        self.app_closed = False  # the app itself sent websocket.close
        self.disconnect_queued = False
        self.initial_response: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        self.scope: dict[str, Any] = {}
        self.accept_key = b""
        self.deflate_on = deflate_enabled(config)
        self.deflate: _deflate.Agreement | None = None  # negotiated in validate()

        self.engine: Any = None
        self.native: NativeConnection | None = None
        # Set at the hand-off; from then on the transport has let go of its fd and the engine's
        # duplicate is the only one.
        self.handle: int | None = None
        self.dispatcher: _Dispatcher | None = None
        self.unacked = 0
        self.read_paused = False

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if is_ssl(transport):  # type: ignore[arg-type]
            self.delegate = _tls_protocol_class()(  # type: ignore[call-arg]
                config=self.config, server_state=self.server_state, app_state=self.app_state,
                _loop=self.loop,
            )
            self.delegate.connection_made(transport)
            return
        self.connections.add(self)
        self.transport = transport  # type: ignore[assignment]
        self.server = get_local_addr(self.transport)
        self.client = get_remote_addr(self.transport)
        self.scheme = "wss" if is_ssl(self.transport) else "ws"

    def connection_lost(self, exc: Exception | None) -> None:
        if self.delegate is not None:
            return self.delegate.connection_lost(exc)
        if self.handle is not None:
            return  # our own close after the hand-off: the connection lives on in the engine
        self.connections.discard(self)
        self.phase = _Phase.CLOSED
        self.queue_disconnect(1006, "", "abrupt")
        self.resume_sends()

    def engine_holds(self) -> bool:
        """The engine has the socket and has not reported its end yet."""
        return self.handle is not None and self.phase in (_Phase.OPEN, _Phase.CLOSING)

    def queue_disconnect(self, code: int, reason: str, why: str) -> None:
        if not self.disconnect_queued:
            self.disconnect_queued = True
            self.queue.put(
                {"type": "websocket.disconnect", "code": code, "reason": reason, "wsmanager.reason": why}, 0
            )

    def pause_sends(self) -> None:
        if self.writable is None:
            self.writable = asyncio.Event()
        self.writable.clear()

    def resume_sends(self) -> None:
        if self.writable is not None:
            self.writable.set()

    def eof_received(self) -> None:
        if self.delegate is not None:
            self.delegate.eof_received()

    def pause_writing(self) -> None:
        if self.delegate is not None:
            return self.delegate.pause_writing()
        self.pause_sends()

    def resume_writing(self) -> None:
        if self.delegate is not None:
            return self.delegate.resume_writing()
        self.resume_sends()

    def data_received(self, data: bytes) -> None:
        if self.delegate is not None:
            return self.delegate.data_received(data)
        self.buffer += data
        if self.phase is not _Phase.HEAD:
            # Bytes past the request go to the engine with the socket; a client that does not
            # wait for the 101 is not read further until then.
            if len(self.buffer) > 64 * 1024 and not self.transport.is_closing():
                self.transport.pause_reading()
            return
        end = self.buffer.find(b"\r\n\r\n")
        limit = MAX_HEADER_BYTES
        if end < 0 and len(self.buffer) <= limit:
            return
        self.phase = _Phase.HANDSHAKE
        try:
            if end < 0 or end + 4 > limit:
                raise _HandshakeError(431, "Request header fields too large")
            head = bytes(self.buffer[: end + 4])
            del self.buffer[: end + 4]
            self.start(head)
        except _HandshakeError as exc:
            self.reject(exc.status, str(exc), exc.headers)

    def shutdown(self) -> None:
        if self.delegate is not None:  # not reached: the delegate is in server_state itself
            return self.delegate.shutdown()
        if self.engine_holds():
            if self.engine.close(self.handle, 1012, "", _WHY_SHUTDOWN):
                self.queue_disconnect(1012, "", "shutdown")
            self.phase = _Phase.CLOSING
            return  # the transport closes when the engine reports the end
        self.send_500_response()
        if self.phase is not _Phase.RESPONSE:  # an HTTP response the app is writing may finish
            self.phase = _Phase.CLOSED
        self.transport.close()

    # -- handshake ------------------------------------------------------------------------

    def start(self, head: bytes) -> None:
        lines = head[:-4].split(b"\r\n")
        try:
            method, target, version = lines[0].decode("latin-1").split(" ")
        except ValueError:
            raise _HandshakeError(400, "Malformed request line") from None
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise _HandshakeError(400, "Malformed header line")
            headers.append((name.lower(), value.strip()))
        self.validate(method, version, headers)
        self.scope = self.build_scope(target, headers)
        self.queue.put({"type": "websocket.connect"}, 0)
        task = self.loop.create_task(self.run_asgi())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def validate(self, method: str, version: str, headers: list[tuple[bytes, bytes]]) -> None:
        def values(name: bytes) -> list[bytes]:
            return [v for k, v in headers if k == name]

        def tokens(name: bytes) -> set[bytes]:
            return {t.strip().lower() for v in values(name) for t in v.split(b",")}

        if method != "GET" or version != "HTTP/1.1":
            raise _HandshakeError(400, "WebSocket upgrade needs GET and HTTP/1.1")
        if b"websocket" not in tokens(b"upgrade") or b"upgrade" not in tokens(b"connection"):
            raise _HandshakeError(400, "Missing 'Upgrade: websocket' or 'Connection: Upgrade'")
        if values(b"sec-websocket-version") != [b"13"]:
            raise _HandshakeError(
                426, "Unsupported Sec-WebSocket-Version, expected 13",
                [(b"Sec-WebSocket-Version", b"13")],
            )
        keys = values(b"sec-websocket-key")
        try:
            ok = len(keys) == 1 and len(base64.b64decode(keys[0], validate=True)) == 16
        except ValueError:
            ok = False
        if not ok:
            raise _HandshakeError(400, "Missing or invalid Sec-WebSocket-Key")
        if ALLOWED_ORIGINS:
            origin = values(b"origin")
            if len(origin) != 1 or origin[0].decode("latin-1").lower() not in ALLOWED_ORIGINS:
                raise _HandshakeError(403, "Origin not allowed")
        self.accept_key = base64.b64encode(hashlib.sha1(keys[0] + _GUID).digest())
        if self.deflate_on:
            self.deflate = _deflate.negotiate(values(b"sec-websocket-extensions"))

    def build_scope(self, target: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
        raw_path, _, query = target.partition("?")
        subprotocols = [
            t.strip()
            for k, v in headers if k == b"sec-websocket-protocol"
            for t in v.decode("latin-1").split(",") if t.strip()
        ]
        self.engine = get_engine(self.config)
        self.native = NativeConnection(self.engine)
        return {
            "type": "websocket",
            "asgi": {"version": self.config.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": self.scheme,
            "server": self.server,
            "client": self.client,
            "root_path": self.root_path,
            "path": self.root_path + unquote(raw_path),
            "raw_path": self.root_path.encode("ascii") + raw_path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "headers": headers,
            "subprotocols": subprotocols,
            "state": self.app_state.copy(),
            "extensions": {"websocket.http.response": {}, "wsmanager.native": self.native},
        }

    def http_response(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
        names = {k.lower() for k, _ in headers}
        out = [_status_line(status)]
        defaults = list(self.default_headers) + [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        if not any(k.lower() == b"date" for k, _ in self.default_headers):
            defaults.append((b"date", email.utils.formatdate(usegmt=True).encode()))
        for name, value in list(headers) + [(k, v) for k, v in defaults if k.lower() not in names]:
            out.append(name + b": " + value + b"\r\n")
        out.append(b"\r\n")
        return b"".join(out) + body

    def reject(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        logger.info('%s - "WebSocket" %d %s', "%s:%d" % self.client if self.client else "", status, message)
        self.phase = _Phase.CLOSED
        self.transport.write(self.http_response(status, headers or [], message.encode()))
        self.transport.close()

    def send_500_response(self) -> None:
        if self.phase not in (_Phase.HEAD, _Phase.HANDSHAKE):
            return  # a 101, a denial or the app's own response went out already
        self.transport.write(self.http_response(500, [], b"Internal Server Error"))

    def accept(self, message: dict[str, Any]) -> None:
        logger.info('%s - "WebSocket %s" [accepted]', get_client_addr(self.scope),  # type: ignore[arg-type]
                    get_path_with_query_string(self.scope))  # type: ignore[arg-type]
        out = [
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
            b"Sec-WebSocket-Accept: " + self.accept_key + b"\r\n",
        ]
        for name, value in list(self.default_headers) + list(message.get("headers") or []):
            out.append(name + b": " + value + b"\r\n")
        subprotocol = message.get("subprotocol")
        if subprotocol:
            out.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("latin-1") + b"\r\n")
        if self.deflate is not None:
            out.append(b"Sec-WebSocket-Extensions: " + self.deflate.response + b"\r\n")
        out.append(b"\r\n")
        self.phase = _Phase.OPEN
        if self.transport.is_closing():
            raise ClientDisconnected()
        self.hand_off(b"".join(out))

    def hand_off(self, response: bytes) -> None:
        """The engine writes the 101 itself, so nothing is ever buffered in the transport."""
        self.transport.pause_reading()
        sock = self.transport.get_extra_info("socket")
        self.dispatcher = _dispatcher(self.engine, self.loop)
        try:
            handle = self.engine.register(sock.fileno(), response, bytes(self.buffer),
                                          deflate=self.deflate.window_bits if self.deflate else 0,
                                          takeover=self.deflate.takeover if self.deflate else False)
        except (OSError, MemoryError) as exc:  # the duplicate fd (EMFILE at the limit) or memory
            if isinstance(exc, OSError) and exc.errno not in _OUT_OF_RESOURCES:
                raise
            self.refuse_unavailable(exc)
            raise ClientDisconnected() from None  # Starlette's accept() and the manager: gone
        self.buffer.clear()
        self.handle = handle
        assert self.native is not None
        self.native.handle = handle
        self.dispatcher.protocols[handle] = self
        # The engine holds its own duplicate of the socket, so the transport's descriptor can go
        # now: closing one of two descriptors sends nothing to the peer, and the connection costs
        # one fd instead of two (10 000 connections fit a 20 000 descriptor limit).
        self.transport.close()

    def refuse_unavailable(self, exc: BaseException) -> None:
        """No descriptor (or memory) for the engine: nothing has been written yet (the engine
        writes the 101), so the client gets a 503 to retry and the app a disconnect (1006)."""
        why = errno.errorcode.get(exc.errno, str(exc.errno)) if isinstance(exc, OSError) else "ENOMEM"
        _HANDSHAKE_COUNTS["unavailable"] += 1
        _unavailable.add(self.loop, why)
        logger.info('%s - "WebSocket %s" 503 (%s at hand-off)', get_client_addr(self.scope),  # type: ignore[arg-type]
                    get_path_with_query_string(self.scope), why)  # type: ignore[arg-type]
        self.phase = _Phase.CLOSED
        self.buffer.clear()
        self.queue_disconnect(1006, "", "abrupt")
        self.transport.write(self.http_response(
            503, [(b"retry-after", b"1")], b"Service Unavailable"))
        self.transport.close()

    # -- engine events --------------------------------------------------------------------

    def engine_event(self, kind: int, payload: Any, nbytes: int) -> None:
        if kind == _core.EV_TEXT:
            self.push_message({"type": "websocket.receive", "text": payload}, nbytes)
        elif kind == _core.EV_BINARY:
            self.push_message({"type": "websocket.receive", "bytes": payload}, nbytes)
        elif kind == _core.EV_DISCONNECT:
            self.released_by_engine(*payload)
        elif kind == _core.EV_WRITE_PAUSED:
            self.pause_sends()
        elif kind == _core.EV_WRITE_RESUMED:
            self.resume_sends()
        elif kind == _core.EV_READ_PAUSED:
            self.read_paused = True
            if self.queue.empty():
                self.ack()

    def push_message(self, message: dict[str, Any], nbytes: int) -> None:
        if self.phase is not _Phase.OPEN:  # the app sends no more, so it reads no more
            self.ack_bytes(nbytes)
            return
        self.queue.put(message, nbytes)

    def released_by_engine(self, code: int, reason: str, why: str) -> None:
        if self.dispatcher is not None and self.handle is not None:
            self.dispatcher.protocols.pop(self.handle, None)
        self.phase = _Phase.CLOSED
        self.queue_disconnect(code, reason, why)
        self.resume_sends()
        self.connections.discard(self)

    def ack_bytes(self, nbytes: int) -> None:
        self.unacked += nbytes
        if self.unacked >= _ack_every or (self.read_paused and self.queue.empty()):
            self.ack()

    def ack(self) -> None:
        if self.handle is not None and self.unacked:
            self.engine.ack(self.handle, self.unacked)
        self.unacked = 0
        self.read_paused = False

    # -- ASGI -----------------------------------------------------------------------------

    async def run_asgi(self) -> None:
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if self.phase in (_Phase.HANDSHAKE, _Phase.RESPONSE):
                logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                logger.error("ASGI callable should return None, but returned '%s'.", result)
        if self.phase is _Phase.DETACHED:
            return  # the connection lives on without its app: the manager has it (detach())
        if self.engine_holds():
            if self.phase is _Phase.OPEN:
                self.phase = _Phase.CLOSING
                self.engine.close(self.handle, 1000, "", _WHY_NORMAL)
            return  # the transport closes when the engine reports the end
        self.phase = _Phase.CLOSED
        self.transport.close()

    def detach(self, sink: Any) -> bool:
        """The app hands the open connection over and is about to return
        (``WebSocketManager.serve()``): the app's return will not close it, the engine's events
        for it go to ``sink`` from now on (``engine_event`` / ``released_by_engine``, as for a
        protocol), and this object leaves the routing and uvicorn's connection set (the server's
        :class:`_DetachedGroup` stands in for it), so it is freed with the app's scope, its
        WebSocket and its receive queue once the app returns.

        What the app had not received yet goes to ``sink`` first, in order, and what it had
        consumed is acknowledged now (the sink acknowledges the rest). False, and nothing
        changed, when the connection is not open (closing, or its end already queued for the
        app): the app then keeps it and its ``websocket.disconnect`` comes as usual."""
        if (self.phase is not _Phase.OPEN or self.app_closed or self.disconnect_queued
                or self.handle is None or self.dispatcher is None):
            return False
        handle = self.handle
        self.dispatcher.protocols[handle] = sink
        self.dispatcher.group(self.server_state).add(handle)
        self.connections.discard(self)
        self.phase = _Phase.DETACHED
        read_paused = self.read_paused
        self.ack()
        pending, self.queue.items = self.queue.items, collections.deque()
        for message, nbytes in pending:
            text = message.get("text")
            if text is not None:
                sink.engine_event(_core.EV_TEXT, text, nbytes)
            else:
                sink.engine_event(_core.EV_BINARY, message.get("bytes") or b"", nbytes)
        if read_paused:
            sink.engine_event(_core.EV_READ_PAUSED, None, 0)
        return True

    async def receive(self) -> dict[str, Any]:
        if self.phase is _Phase.DETACHED:
            raise RuntimeError("this connection was handed over to the manager (serve()): "
                               "its messages go to the handler")
        message, nbytes = await self.queue.get()
        if nbytes:
            self.ack_bytes(nbytes)
        return message

    async def send(self, message: dict[str, Any]) -> None:
        if self.writable is not None:
            await self.writable.wait()
        kind = message["type"]
        if self.phase is _Phase.HANDSHAKE:
            self.send_handshake(message)
        elif self.initial_response is not None:
            self.send_http_body(message)
        elif self.app_closed:
            raise RuntimeError(f"Unexpected ASGI message '{kind}', after sending 'websocket.close'.")
        elif self.phase is _Phase.DETACHED:
            raise RuntimeError("this connection was handed over to the manager (serve()): "
                               "send with ws_manager.send_message()")
        elif self.phase is not _Phase.OPEN or self.handle is None:
            raise ClientDisconnected()  # the peer, the engine or the server ended it
        else:
            self.send_frame(message)

    def send_handshake(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            self.accept(message)
        elif kind == "websocket.close":
            logger.info('%s - "WebSocket %s" 403', get_client_addr(self.scope),  # type: ignore[arg-type]
                        get_path_with_query_string(self.scope))  # type: ignore[arg-type]
            self.queue_disconnect(1006, "", "normal")
            self.phase = _Phase.CLOSED
            self.transport.write(self.http_response(403, [], b""))
            self.transport.close()
        elif kind == "websocket.http.response.start":
            status = message["status"]
            if not 100 <= status < 600:
                raise RuntimeError("Invalid HTTP status code '%d' in response." % status)
            self.initial_response = (status, list(message.get("headers") or []), b"")
            self.phase = _Phase.RESPONSE
        else:
            raise RuntimeError(
                "Expected ASGI message 'websocket.accept', 'websocket.close' "
                f"or 'websocket.http.response.start' but got '{kind}'."
            )

    def send_frame(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        assert self.handle is not None
        if kind == "websocket.send":
            data = message.get("bytes")
            if data is None:
                data = message.get("text")
            if data is None:
                raise RuntimeError("websocket.send needs 'bytes' or 'text'")
            if not self.engine.send(self.handle, data):
                raise ClientDisconnected()
        elif kind == "websocket.close":
            code = message.get("code", 1000) or 1000
            reason = (message.get("reason") or "").encode()[:123].decode("utf-8", "ignore")
            self.phase = _Phase.CLOSING
            self.app_closed = True
            self.queue_disconnect(code, reason, "normal")
            self.engine.close(self.handle, code, reason, _WHY_NORMAL)
        else:
            raise RuntimeError(f"Expected ASGI message 'websocket.send' or 'websocket.close', but got '{kind}'.")

    def send_http_body(self, message: dict[str, Any]) -> None:
        if message["type"] != "websocket.http.response.body" or self.phase is not _Phase.RESPONSE:
            raise RuntimeError(f"Expected ASGI message 'websocket.http.response.body' but got '{message['type']}'.")
        assert self.initial_response is not None
        status, headers, body = self.initial_response
        body += message.get("body", b"")
        self.initial_response = (status, headers, body)
        if message.get("more_body", False):
            return
        logger.info('%s - "WebSocket %s" %d', get_client_addr(self.scope),  # type: ignore[arg-type]
                    get_path_with_query_string(self.scope), status)  # type: ignore[arg-type]
        self.queue_disconnect(1006, "", "normal")
        self.phase = _Phase.CLOSED
        self.transport.write(self.http_response(status, headers, body))
        self.transport.close()
