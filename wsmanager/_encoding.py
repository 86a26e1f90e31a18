"""A message encoded once for all its receivers, and the default JSON encoder.

Every message the manager sends -- a broadcast to ten thousand receivers as a greeting to one --
is serialized here exactly once; the planes (:mod:`wsmanager._planes`) and the backend take the
parts they need from the result.
"""
from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple


class _Encoded(NamedTuple):
    """A message encoded once for all its receivers."""

    event: dict      # the ASGI websocket.send event (portable plane), shared by every receiver
    payload: str | bytes  # what the engine frames (native plane) and the backend publishes
    size: int        # payload bytes on the wire (UTF-8 for text), for the counters


def _encode(message: Any, dumps: Callable[[Any], str]) -> _Encoded:
    """One ASGI send event for ``message`` (shared by every receiver), its payload and size."""
    if isinstance(message, str):
        payload: str | bytes = message
    elif isinstance(message, (dict, list)):
        payload = dumps(message)
    elif isinstance(message, (bytes, bytearray, memoryview)):
        payload = bytes(message)
        return _Encoded({"type": "websocket.send", "bytes": payload}, payload, len(payload))
    else:
        raise TypeError(
            f"message must be a dict or list (sent as JSON), str (text) or bytes (binary), "
            f"not {type(message).__name__}")
    size = len(payload) if payload.isascii() else len(payload.encode("utf-8", "surrogatepass"))
    return _Encoded({"type": "websocket.send", "text": payload}, payload, size)


def _make_default_dumps() -> Callable[[Any], str]:
    """Starlette's send_json format (compact, ensure_ascii=False), so both paths produce the
    same bytes. json.dumps with keyword arguments builds a JSONEncoder on every call; one C
    encoder made once is about 3x faster on a small message, and every message goes through
    here. No circular-reference bookkeeping: a cyclic structure fails with RecursionError."""
    base = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # the pure-Python json module
        return base.encode
    chunks = make(None, base.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)

    def dumps(obj: Any) -> str:
        return "".join(chunks(obj, 0))
    return dumps


_default_dumps = _make_default_dumps()
