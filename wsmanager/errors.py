"""Error classification: which send failures mean "the peer went away".

Seeds 001 and 002 learned this in production: a closed browser tab or a dropped network shows up
as a zoo of exception types (ConnectionClosed, WebSocketDisconnect, "no close frame received or
sent", BrokenPipe, ConnectionReset, RuntimeError after close, ...). Those are normal events for a
WebSocket server and belong at DEBUG; everything else is a real problem and is logged as a
WARNING with its type. Classification is by type name and message so that it works for every
ASGI server and WebSocket library without importing them.
"""
from __future__ import annotations

__all__ = ["is_disconnect_error", "describe", "close_code_reason"]

_DISCONNECT_TYPES = frozenset({
    "WebSocketDisconnect",
    "ConnectionClosed",
    "ConnectionClosedOK",
    "ConnectionClosedError",
    "ClientDisconnected",
    "BrokenPipeError",
    "ConnectionResetError",
    "ConnectionAbortedError",
    "ConnectionError",
    "InvalidState",
    "LocalProtocolError",  # wsproto/h11: sending on a closed connection
    "ClosedResourceError",
    "BrokenResourceError",
    "EndOfStream",
})

_DISCONNECT_PATTERNS = (
    "no close frame received or sent",
    "connection closed",
    "connection is closed",
    "websocket is not connected",
    "websocket connection is closed",
    "after sending 'websocket.close'",
    'after sending "websocket.close"',
    "once a close message has been sent",
    "unexpected asgi message 'websocket.send'",
    'cannot call "send" once a close message has been sent',
    "need to call \"accept\" first",
    "invalid state",
    "broken pipe",
    "connection reset",
    "transport is closed",
    "handler is closed",
)


def is_disconnect_error(exc: BaseException) -> bool:
    """True when ``exc`` only says that the peer is gone (log at DEBUG, never retry)."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _DISCONNECT_TYPES:
            return True
    if isinstance(exc, OSError):
        # Any OSError on a socket we were writing to (EPIPE, ECONNRESET, ETIMEDOUT, WinError
        # 121 of seed 000) means the connection is unusable.
        return True
    message = str(exc).lower()
    return any(p in message for p in _DISCONNECT_PATTERNS)


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def close_code_reason(code: int | None) -> str:
    """Maps a close code received from (or reported for) a peer to a disconnect reason."""
    if code in (1000, 1001):
        return "normal"
    if code in (1002, 1003, 1007, 1009, 1010):
        return "protocol_error"
    if code == 1012:
        return "shutdown"
    if code is None or code in (1005, 1006, 1011):
        return "abrupt"
    return "normal"  # application codes (3000-4999) and the rest: a deliberate close
