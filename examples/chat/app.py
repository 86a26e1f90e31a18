"""A chat on wsmanager: login by name, rooms (channels) with presence, broadcast, direct messages,
and a live stats panel.

    make run                                   # native plane, http://127.0.0.1:8000
    uvicorn examples.chat.app:app              # stock uvicorn (portable plane)

Open it in two browser tabs (each tab logs in under its own name).

Protocol, client -> server (JSON):
    {"type": "join" | "leave", "channel": room}
    {"type": "message", "channel": room, "text": ...}     to everyone in the room
    {"type": "broadcast", "text": ...}                     to everyone connected
    {"type": "dm", "to": user, "text": ...}                to every tab of one user
    {"type": "ping"} / {"type": "pong"}: the JSON heartbeat, handled by the manager itself
server -> client: hello, users, presence, joined, left, message, broadcast, dm, error, ping, pong.

Environment: CHAT_SECRET signs the login tokens (set it outside development);
WSMANAGER_ADMIN_TOKEN opens the debug routes; WSMANAGER_* configure the manager.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from pydantic import BaseModel

from wsmanager import ConnectEvent, DisconnectEvent, JoinEvent, LeaveEvent, ws_manager
from wsmanager.fastapi import admin_token, router

logger = logging.getLogger("chat")

HERE = Path(__file__).resolve().parent
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
ROOM_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_TEXT = 2000

_DEV_SECRET = "wsmanager-chat-development-secret"
SECRET = os.environ.get("CHAT_SECRET", _DEV_SECRET).encode()
if SECRET == _DEV_SECRET.encode():
    logger.warning("CHAT_SECRET is not set: login tokens are signed with the development secret")

manager = ws_manager
app = FastAPI(title="wsmanager chat example")
app.include_router(router(manager, admin=admin_token()))

# ------------------------------------------------------------------ login tokens

def _sign(name: str) -> str:
    mac = hmac.new(SECRET, name.encode(), hashlib.sha256).digest()[:18]
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def make_token(name: str) -> str:
    return f"{name}.{_sign(name)}"


def verify_token(token: str | None) -> str | None:
    if not token or "." not in token:
        return None
    name, _, mac = token.rpartition(".")
    if not NAME_RE.match(name) or not hmac.compare_digest(mac, _sign(name)):
        return None
    return name


class Login(BaseModel):
    name: str


@app.post("/api/login")
async def login(body: Login) -> dict:
    name = body.name.strip()
    if not NAME_RE.match(name):
        raise HTTPException(422, "a name is 1-32 letters, digits, '_', '-' or '.'")
    return {"user_id": name, "token": make_token(name)}


@app.get("/")
async def index() -> FileResponse:
    return FileResponse(HERE / "static" / "index.html")


@app.get("/healthz")
async def healthz() -> dict:
    return {"ok": True}


# ------------------------------------------------------------------ presence
#
# The manager's lifecycle hooks keep everyone's lists current: they fire after the manager
# changed its registry (a hook that reads presence finds the change), also for a tab that
# vanished without a word, and a room's leave fires for each room a closing tab was in. Under
# several workers sharing Redis, joins and leaves of the other workers fire here too: only the
# worker holding the connection (``event.local``) announces, since its broadcast reaches every
# worker's clients.

def _now() -> float:
    return round(time.time(), 3)


async def _users_message() -> dict:
    return {"type": "users", "users": sorted(await manager.online_users())}


async def _presence(room: str) -> None:
    users = await manager.channel_presence(room)
    await manager.broadcast_to_channel(room, {"type": "presence", "channel": room, "users": users})


@manager.on_connect
async def _user_came(event: ConnectEvent) -> None:
    await manager.broadcast(await _users_message())


@manager.on_disconnect
async def _user_went(event: DisconnectEvent) -> None:
    await manager.broadcast(await _users_message())


@manager.on_join
async def _room_joined(event: JoinEvent) -> None:
    if event.local:
        await _presence(event.channel)


@manager.on_leave
async def _room_left(event: LeaveEvent) -> None:
    if event.local:
        await _presence(event.channel)


def _in_room(connection_id: str, room: str) -> bool:
    try:
        return room in manager.channels_of(connection_id)
    except ValueError:  # the manager dropped it meanwhile (a failed send): in no room
        return False


async def _error(connection_id: str, code: str, message: str) -> None:
    await manager.send_message(connection_id, {"type": "error", "error": code, "message": message})


def _text(data: dict) -> str | None:
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        return None
    return text[:MAX_TEXT]


# ------------------------------------------------------------------ the endpoint

@app.websocket("/ws")
async def chat_socket(websocket: WebSocket, token: str | None = None) -> None:
    user_id = verify_token(token)
    if user_id is None:
        await websocket.close(code=1008, reason="login required")
        return
    connection_id = str(uuid.uuid4())
    if not await manager.connect(websocket, connection_id, user_id):
        return
    try:
        await manager.send_message(connection_id, {"type": "hello", "user_id": user_id,
                                                   "connection_id": connection_id})
        while True:
            try:
                data = await websocket.receive_json()
            except (ValueError, KeyError):
                await _error(connection_id, "bad_request", "messages are JSON objects")
                continue
            if not isinstance(data, dict):
                await _error(connection_id, "bad_request", "messages are JSON objects")
                continue
            kind = data.get("type")
            if kind in ("ping", "pong"):
                pass  # the JSON heartbeat: the manager answers pings and records pongs itself
            elif kind in ("join", "leave"):
                room = data.get("channel")
                if not isinstance(room, str) or not ROOM_RE.match(room):
                    await _error(connection_id, "bad_room", "a room is 1-32 letters, digits, '_' or '-'")
                elif kind == "join":
                    if manager.join(connection_id, room):  # presence: _room_joined
                        await manager.send_message(connection_id, {"type": "joined", "channel": room})
                elif manager.leave(connection_id, room):  # presence: _room_left
                    await manager.send_message(connection_id, {"type": "left", "channel": room})
            elif kind == "message":
                room, text = data.get("channel"), _text(data)
                if text is None:
                    await _error(connection_id, "bad_request", "empty message")
                elif not _in_room(connection_id, room):
                    await _error(connection_id, "not_in_room", f"join {room!r} first")
                else:
                    await manager.broadcast_to_channel(room, {
                        "type": "message", "channel": room, "from": user_id, "text": text,
                        "ts": _now()})
            elif kind == "broadcast":
                text = _text(data)
                if text is None:
                    await _error(connection_id, "bad_request", "empty message")
                else:
                    await manager.broadcast({"type": "broadcast", "from": user_id, "text": text,
                                             "ts": _now()})
            elif kind == "dm":
                to, text = data.get("to"), _text(data)
                if not isinstance(to, str) or text is None:
                    await _error(connection_id, "bad_request", "a dm needs 'to' and 'text'")
                    continue
                message = {"type": "dm", "from": user_id, "to": to, "text": text, "ts": _now()}
                if not await manager.send_to_user(to, message):
                    await _error(connection_id, "user_offline", f"{to} is not online")
                elif to != user_id:
                    await manager.send_to_user(user_id, message)  # every tab of the sender
            else:
                await _error(connection_id, "unknown_type", f"unknown message type {kind!r}")
    except WebSocketDisconnect:
        pass
    finally:
        await manager.disconnect(connection_id)  # the hooks tell the rooms and the user list
