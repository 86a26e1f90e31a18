"""WebRTC call signaling on wsmanager (seed 004): the server relays call and WebRTC messages to the
target user's connections and never crashes on a bad or undeliverable one.

    uvicorn examples.signaling.app:app --ws wsmanager.uvicorn:WebSocketProtocol

Connect to ``/ws?user_id=<id>`` (replace that with your real authentication). On connect the
manager greets with ``{"type": "connection_established", ...}`` (``greeting=True``).

Client -> server, relayed to ``target_user_id`` (every connection of that user) with
``from_user_id`` added:
    call_incoming, call_accepted, call_rejected, call_ended,
    webrtc_offer, webrtc_answer, webrtc_ice_candidate
    e.g. {"type": "webrtc_offer", "target_user_id": "bob", "call_id": "c1", "sdp": {...}}
The sender gets ``{"type": "error", "error": <code>, ...}`` when the target is offline
(``user_offline``), the message names no target (``missing_target``), has an unknown type
(``unknown_type``) or is not JSON (``bad_request``). When a user's last connection goes away
during a call, the peer gets ``call_ended`` with ``"reason": "peer_disconnected"``.
``{"type": "ping"}`` is answered with ``{"type": "pong"}`` by the manager itself.
"""
from __future__ import annotations

import json
import logging
import re
import uuid

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from wsmanager import WebSocketManager
from wsmanager.fastapi import admin_token, router

logger = logging.getLogger("signaling")

RELAYED = frozenset({"call_incoming", "call_accepted", "call_rejected", "call_ended",
                     "webrtc_offer", "webrtc_answer", "webrtc_ice_candidate"})
USER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MAX_MESSAGE = 64 * 1024  # SDP offers are a few KiB; nothing legitimate is bigger

manager = WebSocketManager(greeting=True)
app = FastAPI(title="wsmanager signaling example")
app.include_router(router(manager, admin=admin_token()))

# Who is in a call with whom (user -> peers), to tell the peer when one side vanishes.
calls: dict[str, set[str]] = {}


def _pair(a: str, b: str) -> None:
    calls.setdefault(a, set()).add(b)
    calls.setdefault(b, set()).add(a)


def _unpair(a: str, b: str) -> None:
    for x, y in ((a, b), (b, a)):
        peers = calls.get(x)
        if peers is not None:
            peers.discard(y)
            if not peers:
                del calls[x]


@app.get("/healthz")
async def healthz() -> dict:
    return {"ok": True}


async def _error(connection_id: str, code: str, message: str, **extra: object) -> None:
    await manager.send_message(connection_id,
                               {"type": "error", "error": code, "message": message, **extra})


async def relay(connection_id: str, user_id: str, data: dict) -> None:
    kind = data.get("type")
    target = data.get("target_user_id") or data.get("to")
    if not isinstance(target, str) or not target:
        await _error(connection_id, "missing_target", f"{kind} needs target_user_id",
                     original_type=kind)
        return
    message = {**data, "type": kind, "from_user_id": user_id, "target_user_id": target}
    message.pop("to", None)
    delivered = await manager.send_to_user(target, message)
    if not delivered:
        logger.info("%s from %s to %s: target offline", kind, user_id, target)
        await _error(connection_id, "user_offline", f"{target} is not connected",
                     target_user_id=target, original_type=kind, call_id=data.get("call_id"))
        return
    logger.debug("%s from %s to %s (%d connection(s))", kind, user_id, target, delivered)
    if kind == "call_accepted":
        _pair(user_id, target)
    elif kind in ("call_rejected", "call_ended"):
        _unpair(user_id, target)


@app.websocket("/ws")
async def signaling(websocket: WebSocket, user_id: str | None = None) -> None:
    if not user_id or not USER_RE.match(user_id):
        await websocket.close(code=1008, reason="user_id required")
        return
    connection_id = str(uuid.uuid4())
    if not await manager.connect(websocket, connection_id, user_id):
        return
    try:
        while True:
            frame = await websocket.receive()
            if frame["type"] == "websocket.disconnect":
                break
            raw = frame.get("text")
            if raw is None:
                await _error(connection_id, "bad_request", "binary frames are not signaling")
                continue
            if len(raw) > MAX_MESSAGE:
                await _error(connection_id, "too_large", "message too large")
                continue
            try:
                data = json.loads(raw)
            except ValueError:
                await _error(connection_id, "bad_request", "messages are JSON objects")
                continue
            if not isinstance(data, dict):
                await _error(connection_id, "bad_request", "messages are JSON objects")
                continue
            kind = data.get("type")
            if kind in ("ping", "pong"):
                pass  # the JSON heartbeat: the manager answers pings and records pongs itself
            elif kind in RELAYED:
                await relay(connection_id, user_id, data)
            else:
                await _error(connection_id, "unknown_type", f"unknown message type {kind!r}",
                             original_type=kind)
    except WebSocketDisconnect:
        pass
    except Exception:  # never let one connection's bug take the worker down; log it loudly
        logger.exception("signaling connection %s (%s) failed", connection_id, user_id)
    finally:
        await manager.disconnect(connection_id)
        if not manager.get_stats()["connections_by_user"].get(user_id):
            for peer in list(calls.get(user_id, ())):
                _unpair(user_id, peer)
                await manager.send_to_user(peer, {"type": "call_ended", "from_user_id": user_id,
                                                  "target_user_id": peer,
                                                  "reason": "peer_disconnected"})
