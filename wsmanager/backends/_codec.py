"""The envelope's wire format: ``b"<node>\\n<header JSON>\\n<payload>"``.

The origin node id comes first, so a process recognises (and skips) its own envelopes with one
``startswith`` and no parsing; the payload travels raw after the header, never re-escaped inside
JSON. Header keys: ``k`` kind, ``p`` payload type (``t`` text, ``b`` binary, absent: none),
``t`` target, ``x`` excluded connection ids, ``c`` / ``r`` close code and reason (disconnect),
``i`` / ``u`` / ``r`` the member's connection id, user id and reason (join, leave).
Transport-neutral: any backend that moves bytes can use it.
"""
from __future__ import annotations

import json
from typing import Any

from . import ENVELOPE_KINDS, Envelope

__all__ = ["encode_envelope", "decode_envelope", "own_prefix"]

_compact = json.JSONEncoder(separators=(",", ":")).encode


def own_prefix(node_id: str) -> bytes:
    """What every envelope published by ``node_id`` starts with."""
    return node_id.encode() + b"\n"


def encode_envelope(envelope: Envelope | dict[str, Any], node_id: str) -> bytes:
    """The bytes of ``envelope`` as published by ``node_id``. ValueError for an unknown kind."""
    kind = envelope.get("kind")
    if kind not in ENVELOPE_KINDS:
        raise ValueError(f"unknown envelope kind {kind!r}")
    header: dict[str, Any] = {"k": kind}
    text, data = envelope.get("text"), envelope.get("data")
    if text is not None:
        header["p"], body = "t", text.encode("utf-8")
    elif data is not None:
        header["p"], body = "b", bytes(data)
    else:
        body = b""
    target = envelope.get("target")
    if target is not None:
        header["t"] = target
    exclude = envelope.get("exclude")
    if exclude:
        header["x"] = list(exclude)
    if kind == "disconnect":
        header["c"] = envelope.get("code", 1000)
        header["r"] = envelope.get("reason", "")
    elif kind in ("join", "leave"):
        header["i"] = envelope.get("connection_id")
        if envelope.get("user_id") is not None:
            header["u"] = envelope["user_id"]
        if envelope.get("reason"):
            header["r"] = envelope["reason"]
    return b"".join((own_prefix(node_id), _compact(header).encode(), b"\n", body))


def decode_envelope(raw: bytes) -> Envelope:
    """The envelope of ``raw``, every key present. ValueError, KeyError or UnicodeDecodeError
    for bytes that are not one."""
    node, header_raw, body = raw.split(b"\n", 2)
    header = json.loads(header_raw)
    payload = header.get("p")
    return {
        "node": node.decode(),
        "kind": header["k"],
        "target": header.get("t"),
        "text": body.decode("utf-8") if payload == "t" else None,
        "data": body if payload == "b" else None,
        "exclude": header.get("x", []),
        "code": header.get("c", 1000),
        "reason": header.get("r", ""),
        "connection_id": header.get("i"),
        "user_id": header.get("u"),
    }
