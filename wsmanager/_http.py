"""uvicorn's HTTP protocols with the native plane's defences before the 101.

Use them as ``--http wsmanager.uvicorn:HTTPProtocol`` (``python -m wsmanager`` passes it), or
``uvicorn.run(app, http="wsmanager.uvicorn:HTTPProtocol", ws="wsmanager.uvicorn:WebSocketProtocol")``.
``HTTPProtocol`` is the one uvicorn's ``auto`` would pick (httptools when installed, else h11);
``H11HTTPProtocol`` and ``HttpToolsHTTPProtocol`` name one of them. Import them from
``wsmanager.uvicorn``, not from here.

uvicorn's protocols never time out a connection that connects and sends nothing, or half a
request head, or a head at one byte a second (slowloris): its keep-alive timer runs only after a
response, and any byte cancels it. Here:

* **Request-head timeout.** A timer runs from ``connection_made`` and again from the end of each
  response; it stops when a complete request head has been parsed (an HTTP request cycle
  started, or the transport went to the WebSocket protocol). When it fires the connection is
  closed and counted. After a response, uvicorn's own ``--timeout-keep-alive`` governs the idle
  wait (its timer is the one that closes an idle keep-alive connection): ours runs for
  ``max(timeout, keep-alive)`` until the first byte of the next request, and from that byte the
  head has ``WSMANAGER_HANDSHAKE_TIMEOUT`` seconds to complete.
* **A cap** on connections waiting for their request head in this process. Above it the oldest
  waiting connection is closed, counted, and the closes are logged as one WARNING per burst.
* **HTTP/1.0 upgrades** answer 400 (uvicorn rewrites the request line to HTTP/1.1 before the
  WebSocket protocol sees it, so only the HTTP protocol can tell).

The timeout is ``WSMANAGER_HANDSHAKE_TIMEOUT`` (0 = off), the cap ``WSMANAGER_MAX_HANDSHAKES``
(0 = no cap): rows of :data:`wsmanager.config.OPTIONS` (range, default), read at import.

The counters are in ``wsmanager.uvicorn.handshake_stats()``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import config as _config
from .uvicorn import _HANDSHAKE_COUNTS, _Burst

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

__all__ = ["HTTPProtocol", "H11HTTPProtocol", "HttpToolsHTTPProtocol"]

_access = logging.getLogger("uvicorn.error")  # per-request lines, as uvicorn's own protocols

# Read once, at import (the server's start, when uvicorn loads --http): a bad value stops it,
# naming the variable.
_protocol = _config.values("protocol")
HANDSHAKE_TIMEOUT: float = _protocol["handshake_timeout"]
MAX_HANDSHAKES: int = _protocol["max_handshakes"]

# Connections waiting for a request head, oldest first (one event loop per process, as the
# engine's: the protocols of one loop only).
_waiting: collections.OrderedDict[HandshakeGuard, None] = collections.OrderedDict()

_evictions = _Burst(
    logging.WARNING,
    "native plane: closed %d connection(s) in %.0f s that were still waiting for their HTTP "
    "request head, oldest first, to stay under WSMANAGER_MAX_HANDSHAKES=%d (half-open or "
    "trickled requests: slowloris?)", MAX_HANDSHAKES)
_timeouts = _Burst(
    logging.INFO,
    "native plane: closed %d connection(s) in %.0f s that sent no complete HTTP request head "
    "within WSMANAGER_HANDSHAKE_TIMEOUT=%g s", HANDSHAKE_TIMEOUT)


def waiting() -> int:
    """Connections of this process still waiting for their request head."""
    return len(_waiting)


class HandshakeGuard:
    """The request-head timeout, the cap and the HTTP/1.0 refusal, mixed into uvicorn's HTTP
    protocol classes below (it calls their methods through ``super()``)."""

    # Class-level defaults: no __init__ of our own in front of uvicorn's.
    _hs_timer: asyncio.TimerHandle | None = None
    _hs_idle = False  # after a response, before the next request's first byte

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    config: Config
    cycle: Any
    client: tuple[str, int] | None

    # -- uvicorn protocol hooks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._hs_wait(HANDSHAKE_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        if self._hs_idle:  # the next request's first byte: from now on, the head's own limit
            self._hs_idle = False
            self._hs_arm(HANDSHAKE_TIMEOUT)
        cycle = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self in _waiting:
            if self.cycle is not cycle or self.transport.get_protocol() is not self:
                self._hs_done()  # a complete head: a request cycle started, or the upgrade

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        transport = self.transport
        if transport.is_closing() or transport.get_protocol() is not self:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return  # a pipelined request already started
        if getattr(self, "pipeline", None):
            return  # httptools: parsed requests still queued
        # Idle until the next request's first byte: uvicorn's keep-alive timer closes the
        # connection at --timeout-keep-alive; ours is only the backstop.
        idle = max(HANDSHAKE_TIMEOUT, float(self.config.timeout_keep_alive))
        self._hs_wait(idle if HANDSHAKE_TIMEOUT else 0.0)
        self._hs_idle = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._hs_done()
        super().connection_lost(exc)  # type: ignore[misc]

    # -- waiting for a request head --------------------------------------------------------

    def _hs_arm(self, delay: float) -> None:
        if self._hs_timer is not None:
            self._hs_timer.cancel()
        self._hs_timer = self.loop.call_later(delay, self._hs_expired) if delay > 0 else None

    def _hs_wait(self, delay: float) -> None:
        self._hs_arm(delay)
        _waiting[self] = None
        _waiting.move_to_end(self)
        if MAX_HANDSHAKES and len(_waiting) > MAX_HANDSHAKES:
            _evict_oldest(self.loop)

    def _hs_done(self) -> None:
        self._hs_idle = False
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None
        _waiting.pop(self, None)

    def _hs_expired(self) -> None:
        self._hs_timer = None
        _waiting.pop(self, None)
        if self.transport.is_closing():  # uvicorn's keep-alive timer of the same instant
            return
        _HANDSHAKE_COUNTS["timed_out"] += 1
        _timeouts.add(self.loop)
        # abort, not close: on TLS a close waits for the peer's close_notify (up to 30 s), and
        # this peer is not answering; on plain TCP the two do the same.
        self.transport.abort()

    def _hs_refuse_version(self, version: str) -> None:
        _HANDSHAKE_COUNTS["http10_refused"] += 1
        _access.info('%s - "WebSocket" 400 HTTP/%s upgrade refused',
                     "%s:%d" % self.client if self.client else "", version)
        self.send_400_response("WebSocket upgrade needs HTTP/1.1")  # type: ignore[attr-defined]


def _evict_oldest(loop: asyncio.AbstractEventLoop) -> None:
    # Why the oldest: a legitimate client sends its whole request head at once, so it waits
    # here for milliseconds, while a slowloris client keeps its slot as long as it can. Closing
    # the oldest waiter frees the slot an attacker has held longest and lets every new client,
    # legitimate ones included, in at once; refusing the newest instead would lock legitimate
    # clients out for as long as attackers keep the cap full.
    while len(_waiting) > MAX_HANDSHAKES:
        oldest, _ = _waiting.popitem(last=False)
        oldest._hs_done()
        _HANDSHAKE_COUNTS["evicted"] += 1
        _evictions.add(loop)
        oldest.transport.abort()


class H11HTTPProtocol(HandshakeGuard, H11Protocol):
    """uvicorn's h11 protocol with the defences of this module."""

    def handle_websocket_upgrade(self, event: Any) -> None:
        if event.http_version != b"1.1":
            return self._hs_refuse_version(event.http_version.decode("ascii", "replace"))
        super().handle_websocket_upgrade(event)


if HttpToolsProtocol is not None:
    class HttpToolsHTTPProtocol(HandshakeGuard, HttpToolsProtocol):  # type: ignore[valid-type,misc]
        """uvicorn's httptools protocol with the defences of this module."""

        def handle_websocket_upgrade(self) -> None:
            version = self.parser.get_http_version()
            if version != "1.1":
                return self._hs_refuse_version(version)
            super().handle_websocket_upgrade()
else:
    HttpToolsHTTPProtocol = None  # type: ignore[assignment,misc]

HTTPProtocol: type[asyncio.Protocol] = (
    HttpToolsHTTPProtocol if HttpToolsProtocol is not None and AutoHTTPProtocol is HttpToolsProtocol
    else H11HTTPProtocol)
