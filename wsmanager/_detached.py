"""Detached connections: what ``WebSocketManager.serve()`` does with a connection once the
endpoint has handed it over.

The seed's shape keeps the endpoint's coroutine suspended in ``receive_json()`` for the whole
life of the connection, and with it FastAPI's, Starlette's and the server's frames (about a
hundred GC-tracked objects and 30 KiB per idle connection). A detached connection has no
coroutine of its own:

* **native plane** (``wsmanager.uvicorn``): the endpoint returns at once. The protocol object
  gives its place in the engine's event routing to the manager's record of the connection
  (``_Detached``, see ``WebSocketProtocol.detach``) and goes away with the WebSocket, the scope
  and the receive queue; :func:`engine_event` is then called for each of the connection's
  events straight from the engine's batch (``_Dispatcher.on_events``). What stays is that one
  record and the registry's row in C.
* **portable plane** (any ASGI server): the ASGI call must stay open -- the server closes the
  connection when the app returns -- so :func:`serve_portable` runs the receive loop inside
  ``serve()`` itself, in the endpoint's own task (no task of its own).

Both planes take an inbound message the same way (:func:`take`): counted in the registry (a
sign of life), the JSON heartbeat answered or recorded and kept from the handler, a text frame
decoded as JSON unless ``raw``; then the handler is called (:func:`invoke`), its exception
logged on the ``wsmanager`` logger and contained.

Order and flow control on the native plane. A connection's messages reach its handler one
after the other, in order, as on the seed's shape: a sync handler, or an async one that does
not suspend, finishes inside the dispatch (no task); an async one that suspends becomes a task
(:func:`_start`), and the connection's next messages wait in ``backlog`` until it finished.
The bytes of a message are acknowledged to the engine once its handler finished (batched as the
protocol batches them), so a peer that outruns a slow handler is stopped by the engine's
inbound budget (TCP backpressure) and never queues more than that budget in Python.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from . import _core
from ._encoding import _encode
from ._planes import _native_extension, _resume, _step
from .errors import describe, is_disconnect_error

if TYPE_CHECKING:
    from .manager import _Detached

logger = logging.getLogger("wsmanager")

_REASONS = frozenset(_core.REASONS)
_EV_TEXT, _EV_BINARY, _EV_DISCONNECT = _core.EV_TEXT, _core.EV_BINARY, _core.EV_DISCONNECT
_EV_READ_PAUSED = _core.EV_READ_PAUSED

#: ``take()``'s answer for a message the handler does not get (heartbeat, a gone connection).
SKIP = object()

#: Close code and reason for a text frame that is not JSON (the handler wants JSON).
INVALID_JSON = (1007, "invalid JSON")

#: Python 3.12+: asyncio's eager tasks run the coroutine's first step inside a task of its own
#: (``asyncio.current_task()``, ``asyncio.timeout()`` and context variables work there); 3.10
#: and 3.11 have none, and the first step runs as :func:`_planes._step` runs a send.
_EAGER_TASKS = sys.version_info >= (3, 12)


def check_handler(handler: Any) -> None:
    """``serve()``'s handler is called as ``handler(connection_id, message)``: say so now."""
    if handler is None:
        return
    if not callable(handler):
        raise TypeError(f"handler must be callable, not {type(handler).__name__}")
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return
    try:
        signature.bind("cid", None)
    except TypeError:
        raise TypeError(f"handler {_name(handler)} must take two arguments, the connection id and "
                        f"the message (its signature is {signature})") from None


# --------------------------------------------------------------------------------------------
# one inbound message, both planes


def take(conn: "_Detached", payload: str | bytes) -> Any:
    """What the handler gets for one inbound message, or :data:`SKIP`: the decoded JSON of a
    text frame (its ``str`` when ``raw``), the ``bytes`` of a binary one. Counts it as the
    seed's shape does (``_Conn.receive``), answers a ``{"type": "ping"}`` and records a
    ``{"type": "pong"}`` (neither reaches the handler), and ends a connection whose text is not
    JSON (1007, ``protocol_error``). A message of a connection the manager already dropped (it
    is closing) is not delivered."""
    manager = conn.manager
    if manager._conns.get(conn.handle) is not conn:
        return SKIP
    registry = manager._registry
    if type(payload) is not str:
        registry.touch(conn.handle, len(payload))
        return payload
    size = len(payload) if payload.isascii() else len(payload.encode("utf-8", "surrogatepass"))
    registry.touch(conn.handle, size)
    if conn.raw:
        if size <= 256 and '"p' in payload:  # the seed shape's cheap filter before parsing
            try:
                obj = json.loads(payload)
            except ValueError:
                return payload
            if _heartbeat(conn, obj):
                return SKIP
        return payload
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the decoder goes
        logger.debug("connection %s sent a text frame that is not JSON; closing it", conn.cid)
        _close(conn, "protocol_error", *INVALID_JSON)
        return SKIP
    if size <= 256 and _heartbeat(conn, obj):
        return SKIP
    return obj


def _heartbeat(conn: "_Detached", obj: Any) -> bool:
    """The JSON heartbeat, as ``WebSocketManager._on_heartbeat_message`` handles it for the
    seed's shape; True when ``obj`` was one."""
    if type(obj) is not dict:
        return False
    kind = obj.get("type")
    if kind == "pong":
        conn.manager._registry.set_last_ping(conn.handle, _core.monotonic_ns())
        return True
    if kind == "ping":
        manager = conn.manager
        _run_soon(manager, conn.plane.send_one(conn, _encode({"type": "pong"}, manager._dumps)))
        return True
    return False


def _close(conn: "_Detached", reason: str, code: int, text: str) -> None:
    manager = conn.manager
    manager._drop(conn, reason, code)
    _run_soon(manager, conn.plane.close(conn, code, text))


def _run_soon(manager: Any, coro: Any) -> None:
    """Runs ``coro`` inline up to its first suspension (a native send or close never has
    one), the rest as one of the manager's tracked tasks."""
    done, value = _step(coro)
    if not done:
        manager._spawn(_resume(coro, value))


def invoke(conn: "_Detached", message: Any) -> Any:
    """Calls the handler: None when it is done (a sync handler, or one that failed: logged),
    else the awaitable it returned, not started yet."""
    handler = conn.handler
    if handler is None:
        return None
    try:
        result = handler(conn.cid, message)
    except Exception:  # noqa: BLE001 - contained: the connection and the others go on
        _failed(conn)
        return None
    if result is None or not inspect.isawaitable(result):
        return None
    return result


async def _guarded(conn: "_Detached", awaitable: Any) -> None:
    """An async handler's run: its exception is logged, never raised."""
    try:
        await awaitable
    except Exception:  # noqa: BLE001
        _failed(conn)


def _failed(conn: "_Detached", handler: Any = None) -> None:
    """A handler's exception: the connection's first at ERROR with its traceback, the next
    ones at DEBUG -- a peer whose every message makes the handler raise must not turn each
    few bytes it sends into a traceback in the server's log."""
    log = logger.debug if conn.failed else logger.error
    conn.failed = True
    log("message handler %s failed on connection %s", _name(handler or conn.handler), conn.cid,
        exc_info=True)


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


# --------------------------------------------------------------------------------------------
# the portable plane: the receive loop inside serve()


async def serve_portable(conn: "_Detached") -> None:
    """The detached shape where the ASGI call must stay open (the portable plane, or a native
    connection that could not be handed over): ``serve()`` receives here, in the endpoint's
    task, and awaits each async handler before the next message (in order, and a slow
    handler stops reading, as the seed's loop would). Returns when the connection is gone;
    one the loop leaves still registered (the receive failed, or the task was cancelled) is
    dropped and closed, as the seed's ``finally: disconnect()`` does."""
    manager = conn.manager
    ws = conn.websocket
    reason, code = "abrupt", 1011
    try:
        while True:
            message = await ws.receive()  # observed by _Detached.receive: the disconnect
            if message["type"] != "websocket.receive":
                break
            text = message.get("text")
            item = take(conn, text if text is not None else (message.get("bytes") or b""))
            if item is SKIP:
                continue
            result = invoke(conn, item)
            if result is not None:
                await _guarded(conn, result)
    except asyncio.CancelledError:
        reason, code = "shutdown", 1012
        raise
    except Exception as exc:  # noqa: BLE001 - classified
        if is_disconnect_error(exc):
            logger.debug("connection %s went away: %s", conn.cid, describe(exc))
        else:
            logger.warning("receive failed on connection %s (type: %s): %s", conn.cid,
                           type(exc).__name__, exc)
    finally:
        if manager._conns.get(conn.handle) is conn:
            manager._drop(conn, reason, code)
            try:
                await conn.plane.close(conn, code, "")
            except Exception as exc:  # noqa: BLE001 - the peer may be gone
                logger.debug("close of %s failed: %s", conn.cid, describe(exc))


# --------------------------------------------------------------------------------------------
# the native plane: the engine's events, from the dispatcher's batch


def hand_over(conn: "_Detached") -> bool:
    """Asks the native protocol to route this connection's engine events to ``conn`` and to
    let go of it (``WebSocketProtocol.detach``); then drops the manager's own references to
    the WebSocket, so it, its scope and the protocol go by refcount. False when the protocol
    could not (the connection is ending already): ``serve()`` then serves it in its loop."""
    ws = conn.websocket
    extension = _native_extension(ws)
    detach = getattr(extension, "detach", None)
    if detach is None:
        return False
    plane = conn.plane
    if plane.ack_every is None:
        plane.ack_every = max(1, extension.engine.options["read_limit"] // 4)
    if not detach(conn):
        return False
    if conn.asgi_receive is not None:
        ws._receive = conn.asgi_receive  # unhooked: no WebSocket <-> record cycle
        conn.asgi_receive = None
    conn.websocket = None
    return True


def engine_event(conn: "_Detached", kind: int, payload: Any, nbytes: int) -> None:
    """``_Detached.engine_event``: one event of the engine's batch for a detached connection
    (the dispatcher calls it as it calls a protocol's)."""
    if kind == _EV_TEXT or kind == _EV_BINARY:
        backlog = conn.backlog
        if backlog is not None and conn.manager._conns.get(conn.handle) is conn:
            backlog.append((payload, nbytes))  # a handler of an earlier message still runs
            return
        item = take(conn, payload)
        result = None if item is SKIP else invoke(conn, item)
        if result is None:
            _consumed(conn, nbytes)
        else:
            _start(conn, result, nbytes)
    elif kind == _EV_DISCONNECT:
        released_by_engine(conn, *payload)
    elif kind == _EV_READ_PAUSED:
        conn.read_paused = True
        if conn.backlog is None:
            _ack(conn)
    # Write paused / resumed: nothing waits on them (the manager's native sends only queue).


def released_by_engine(conn: "_Detached", code: int, reason: str, why: str) -> None:
    """The engine ended the connection (the peer's close or its loss, keepalive, a slow
    consumer, shutdown): the manager's one disconnect path, with the engine's reason and the
    close code. A handler run in progress finishes; the messages waiting for it go
    (:func:`discard_backlog`)."""
    manager = conn.manager
    if manager._conns.get(conn.handle) is conn:
        if why not in _REASONS:
            why = "abrupt"
        logger.debug("WebSocket %s ended by the engine (code %s, %s)", conn.cid, code, why)
        manager._drop(conn, why, code)


def _start(conn: "_Detached", awaitable: Any, nbytes: int) -> None:
    """An async handler's first step, inline; a task only if it suspends."""
    if _EAGER_TASKS:
        task = asyncio.Task(_then_backlog(conn, awaitable, nbytes),  # type: ignore[call-arg]
                            loop=asyncio.get_running_loop(), eager_start=True)
        if not task.done():
            _track(conn, task)
        return
    coro = _guarded(conn, awaitable)
    done, pending = _step(coro)
    if done:
        _consumed(conn, nbytes)
        return
    conn.backlog = collections.deque()
    _track(conn, asyncio.get_running_loop().create_task(
        _then_backlog(conn, _resume(coro, pending), nbytes, started=True)))


#: Handler runs that suspended: held here (the loop keeps only weak references to tasks),
#: not among the manager's background tasks, which ``stop()`` awaits -- a handler waiting for
#: something of its own must not hold up a shutdown.
_running: set[asyncio.Task] = set()


def _track(conn: "_Detached", task: asyncio.Task) -> None:
    if conn.backlog is None:
        conn.backlog = collections.deque()
    _running.add(task)
    task.add_done_callback(_running.discard)


async def _then_backlog(conn: "_Detached", awaitable: Any, nbytes: int, started: bool = False) -> None:
    """Finishes one handler run, then handles the messages that waited for it, in order, in
    this task; the connection's next message then goes straight to its handler again."""
    try:
        if started:
            await awaitable
        else:
            await _guarded(conn, awaitable)
        _consumed(conn, nbytes)
        backlog = conn.backlog
        while backlog:
            payload, nbytes = backlog.popleft()
            item = take(conn, payload)
            result = None if item is SKIP else invoke(conn, item)
            if result is not None:
                await _guarded(conn, result)
            _consumed(conn, nbytes)
    finally:
        conn.backlog = None
        if conn.read_paused:
            _ack(conn)


def discard_backlog(conn: "_Detached") -> None:
    """The manager dropped the connection (``WebSocketManager._drop``): the messages waiting
    for its handler would never reach it (:func:`take` skips them), so they go now, their
    charge acknowledged -- a handler that never returns must not keep up to read_limit of a
    gone peer's bytes (the engine no longer counts them) for good."""
    backlog = conn.backlog
    if backlog:
        conn.unacked += sum(nbytes for _, nbytes in backlog)
        backlog.clear()
        _ack(conn)


def _consumed(conn: "_Detached", nbytes: int) -> None:
    """A message's charge is acknowledged once its handler finished, batched like the
    protocol's (``read_limit / 4``), at once while the engine has paused reading."""
    conn.unacked += nbytes
    if conn.unacked >= conn.plane.ack_every or (conn.read_paused and conn.backlog is None):
        _ack(conn)


def _ack(conn: "_Detached") -> None:
    if conn.unacked:
        conn.engine.ack(conn.native, conn.unacked)
        conn.unacked = 0
    conn.read_paused = False
