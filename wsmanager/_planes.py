"""The two delivery planes: how one connection is sent to, fanned out to and closed.

A connection's plane is chosen once, when the manager attaches it after the accept
(``WebSocketManager._plane_of``), and kept in ``_Conn.plane``; the manager's delivery code calls
``conn.plane.send_one(...)`` / ``conn.plane.close(...)`` and never asks which plane it has.

* :class:`_PortablePlane` -- any ASGI server or TestClient: every delivery awaits the
  connection's ASGI ``send`` (the Starlette WebSocket), bounded by ``send_timeout``; a send that
  fails drops the connection (``abrupt``, 1011), one that does not finish in time drops it as a
  ``slow_consumer`` (1008). Closes go through :meth:`_PortablePlane.close_websocket`, which
  closes even on a server that refuses the close code (daphne).
* :class:`_NativePlane` -- ``wsmanager.uvicorn``'s protocol handed the socket to the C engine
  (``_core.Engine``): a send, a fan-out and a close each only queue a command for the engine's
  thread, and a fan-out to every native receiver is one C call with no per-receiver Python.

A fan-out's receivers come from the registry already split by plane (``_core.Targets``:
iterating it yields the portable handles, the engine reads the native ones in C), so
``WebSocketManager._deliver`` gives each plane its share.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocketState

from . import _core
from ._encoding import _Encoded
from .errors import describe, is_disconnect_error

if TYPE_CHECKING:
    from .manager import WebSocketManager, _Conn

logger = logging.getLogger("wsmanager")

_REASON = {name: i for i, name in enumerate(_core.REASONS)}


def _log_send_error(cid: str, exc: BaseException) -> None:
    if is_disconnect_error(exc):
        logger.debug("connection %s already closed: %s", cid, describe(exc))
    else:
        logger.warning("WebSocket send error for %s (type: %s): %s", cid, type(exc).__name__, exc)


def _native_extension(websocket: Any) -> Any:
    """The native plane's handle on this connection (set by wsmanager.uvicorn), or None."""
    scope = getattr(websocket, "scope", None) or {}
    native = (scope.get("extensions") or {}).get("wsmanager.native")
    return native if native is not None and getattr(native, "handle", None) else None


# --------------------------------------------------------------------------------------------
# the portable plane


class _PortablePlane:
    """Deliveries through each connection's ASGI ``send``; the manager's default plane (a
    connection is on it from registration until the native plane adopts it, if ever)."""

    __slots__ = ("_m", "_registry", "_conns")

    def __init__(self, manager: "WebSocketManager") -> None:
        self._m = manager  # send_timeout and close_timeout are live options: read per call
        self._registry = manager._registry
        self._conns = manager._conns

    def adopt(self, conn: "_Conn", extension: Any) -> None:
        """Nothing to do: a connection starts on this plane."""

    async def send_one(self, conn: "_Conn", encoded: _Encoded) -> bool:
        coro = _send(conn, encoded.event)
        done, error = _step(coro)
        if not done:
            try:
                error = await asyncio.wait_for(_resume(coro, error), self._m.send_timeout)
            except asyncio.TimeoutError:
                self._failed(conn, "slow_consumer", None)
                return False
        if error is not None:
            self._failed(conn, "abrupt", error)
            return False
        self._registry.record_sent(conn.handle, encoded.size)
        return True

    async def fanout(self, handles: Iterable[int], encoded: _Encoded) -> int:
        # Every send is started at once and runs inline as far as it can: an ASGI send that
        # needs no wait (the common case) finishes here without a task. Only sends that must
        # wait become tasks, and one timer bounds them all, so a receiver that stopped reading
        # costs the others nothing and the broadcast at most send_timeout.
        conns = [c for c in map(self._conns.get, handles) if c is not None]
        event, size = encoded.event, encoded.size
        record_sent = self._registry.record_sent
        loop = asyncio.get_running_loop()
        delivered = 0
        waiting: list[tuple[_Conn, asyncio.Task]] = []
        for conn in conns:
            coro = _send(conn, event)
            done, value = _step(coro)
            if not done:
                waiting.append((conn, loop.create_task(_resume(coro, value))))
            elif value is None:
                delivered += 1
                record_sent(conn.handle, size)
            else:
                self._failed(conn, "abrupt", value)
        if waiting:
            _, late = await asyncio.wait([t for _, t in waiting], timeout=self._m.send_timeout)
            for task in late:
                task.cancel()
            for conn, task in waiting:
                if task in late or task.cancelled():
                    self._failed(conn, "slow_consumer", None)
                elif (error := task.result()) is not None:
                    self._failed(conn, "abrupt", error)
                else:
                    delivered += 1
                    record_sent(conn.handle, size)
        return delivered

    def _failed(self, conn: "_Conn", reason: str, error: BaseException | None) -> None:
        """A send failed: the connection is dropped at once (no retries on a dead peer) and
        closed in the background."""
        m = self._m
        self._registry.record_failure()
        if reason == "slow_consumer":
            logger.warning("connection %s is not reading (send blocked > %.3gs); closing it as a slow consumer",
                           conn.cid, m.send_timeout)
            code, text = 1008, "slow consumer"
        else:
            if error is not None:
                _log_send_error(conn.cid, error)
            code, text = 1011, "send failed"
        if self._conns.get(conn.handle) is conn:
            m._drop(conn, reason, code)
            m._spawn(self.close(conn, code, text))

    async def close(self, conn: "_Conn", code: int, reason: str) -> None:
        ws = conn.websocket
        if (getattr(ws, "application_state", None) is not WebSocketState.CONNECTED
                or getattr(ws, "client_state", None) is not WebSocketState.CONNECTED):
            return
        await self.close_websocket(ws, conn.cid, code, reason)

    async def refuse(self, websocket: Any, cid: str, extension: Any) -> None:
        """Closes an accepted connection over the limit (it was never registered)."""
        await self.close_websocket(websocket, cid, 1008, "Connection limit reached")

    async def close_websocket(self, ws: Any, cid: str, code: int, reason: str) -> None:
        """Closes a portable-plane WebSocket with ``code``, and closes it even on a server that
        refuses the code.

        Some ASGI servers send only part of the close codes RFC 6455 allows: daphne (autobahn's
        ``sendClose``) raises "invalid close code 1008 (must be 1000 or from [3000, 4999])" for
        every code from 1001 to 2999 -- the manager's 1001 (shutdown), 1008 (limit, slow
        consumer) and 1011 (stale, send failed) -- and leaves the connection open. A refusal is
        an exception from the close that does not say the peer is gone; then the close is sent
        again, straight to the server's ASGI ``send`` (Starlette has marked the WebSocket closed
        already), with

        1. the code moved into the application range: ``4000 + (code - 1000)`` for 1001-1999
           (1001 -> 4001, 1008 -> 4008, 1011 -> 4011, 1012 -> 4012), the same reason;
        2. no code at all (every server then sends 1000).

        The first one the server takes ends the connection: the server sends the close frame
        and drops the TCP connection after its closing handshake (or its timeout). Only when
        the server refuses every form is a WARNING logged.
        """
        try:
            await asyncio.wait_for(ws.close(code=code, reason=reason), self._m.close_timeout)
            return
        except asyncio.TimeoutError:
            logger.debug("close of %s timed out", cid)
            return
        except Exception as exc:  # noqa: BLE001 - classified
            if is_disconnect_error(exc):
                logger.debug("connection %s already closed: %s", cid, describe(exc))
                return
            refusal: BaseException = exc
        raw_send = getattr(ws, "_send", None)  # Starlette: the server's ASGI send
        for event in _fallback_closes(code, reason):
            try:
                if raw_send is not None:
                    await asyncio.wait_for(raw_send(event), self._m.close_timeout)
                else:  # a WebSocket-like object of another framework
                    await asyncio.wait_for(ws.close(code=event.get("code", 1000),
                                                    reason=event.get("reason", "")), self._m.close_timeout)
            except asyncio.TimeoutError:
                logger.debug("close of %s timed out", cid)
                return
            except Exception as exc:  # noqa: BLE001 - try the next form
                if is_disconnect_error(exc):
                    return
                continue
            _note_close_fallback(code, event, refusal)
            return
        logger.warning("could not close connection %s: the ASGI server refused close code %d (%s) "
                       "and every fallback (4000 + code - 1000, no code)", cid, code, describe(refusal))


async def _send(conn: "_Conn", event: dict) -> BaseException | None:
    """One ASGI send; returns the error instead of raising so a fan-out never aborts."""
    try:
        await conn.websocket.send(event)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified by the caller
        return exc
    return None


def _step(coro: Any) -> tuple[bool, Any]:
    """Runs a coroutine up to its first suspension: (True, result) when it finished, else
    (False, the future it waits on). What asyncio's eager tasks do on 3.12+, for 3.10+."""
    try:
        return False, coro.send(None)
    except StopIteration as stop:
        return True, stop.value


class _Resumed:
    """Awaitable that carries on a coroutine :func:`_step` started: it hands the pending
    future to the awaiting task unchanged, then relays results and exceptions."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Any, pending: Any) -> None:
        self.coro = coro
        self.pending = pending

    def __await__(self) -> Any:
        coro, pending = self.coro, self.pending
        while True:
            try:
                value = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation included: the coroutine decides
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    pending = coro.send(value)
                except StopIteration as stop:
                    return stop.value


async def _resume(coro: Any, pending: Any) -> Any:
    return await _Resumed(coro, pending)


def _fallback_closes(code: int, reason: str) -> list[dict]:
    """The ASGI close events to try, in order, after a server refused ``websocket.close`` with
    ``code`` (see :meth:`_PortablePlane.close_websocket`)."""
    events = []
    if 1001 <= code <= 1999:
        events.append({"type": "websocket.close", "code": 4000 + (code - 1000), "reason": reason})
    events.append({"type": "websocket.close"})
    return events


_close_fallback_noted: set[int] = set()


def _note_close_fallback(code: int, event: dict, refusal: BaseException) -> None:
    """Says once per refused code and process (INFO) what clients get instead."""
    if code in _close_fallback_noted:
        return
    _close_fallback_noted.add(code)
    sent = event.get("code")
    logger.info("the ASGI server refused close code %d (%s); such closes go out as %s",
                code, describe(refusal), f"{sent} (4000 + code - 1000)" if sent else "a close without a code")


# --------------------------------------------------------------------------------------------
# the native plane


class _NativePlane:
    """Deliveries queued to the C engine that owns the connection's socket.

    ``engine`` is the process's engine, known once a native connection attached; until then
    there is nothing on this plane to fan out to.
    """

    __slots__ = ("_registry", "engine", "ack_every")

    def __init__(self, manager: "WebSocketManager") -> None:
        self._registry = manager._registry
        self.engine: Any = None
        #: Inbound bytes a detached connection acknowledges at once (``wsmanager._detached``):
        #: the protocol's batch, ``read_limit / 4``; set at the first hand-over.
        self.ack_every: int | None = None

    def adopt(self, conn: "_Conn", extension: Any) -> None:
        """Moves a just-accepted connection onto this plane (for good): its engine handle is
        recorded here and in the registry, whose resolutions then list it as native."""
        conn.native = extension.handle
        conn.engine = self.engine = extension.engine
        conn.plane = self
        self._registry.set_native(conn.handle, conn.native)

    async def send_one(self, conn: "_Conn", encoded: _Encoded) -> bool:
        ok = conn.engine.send(conn.native, encoded.payload)
        if ok:
            self._registry.record_sent(conn.handle, encoded.size)
        return bool(ok)

    def fanout(self, targets: _core.Targets, encoded: _Encoded) -> int:
        """The native receivers of ``targets``: one C call queues them all, one more counts
        them (per receiver, in C)."""
        engine = self.engine
        if engine is None:
            return 0
        queued = engine.fanout(targets, encoded.payload)
        self._registry.record_sent_many(targets, encoded.size)
        return queued

    async def close(self, conn: "_Conn", code: int, reason: str) -> None:
        try:
            conn.engine.close(conn.native, code, reason, _REASON[conn.reason or "normal"])
        except Exception as exc:  # noqa: BLE001
            _log_send_error(conn.cid, exc)

    async def refuse(self, websocket: Any, cid: str, extension: Any) -> None:
        """Closes an accepted connection over the limit (it was never registered); counted by
        the engine as "limit", not as a normal close."""
        extension.engine.close(extension.handle, 1008, "Connection limit reached", _REASON["limit"])
