"""A live dashboard on wsmanager's *detached* shape: notifications posted over HTTP and a metrics
snapshot every second reach every open page, and the page shows who is online.

    make run-dashboard                             # native plane, http://127.0.0.1:8000
    uvicorn examples.dashboard.app:app             # stock uvicorn (portable plane)

The WebSocket endpoint only authenticates (a FastAPI dependency) and hands the connection to the
manager with ``ws_manager.serve(...)``: on the native plane no coroutine, task or frame is left
for an open page, which is what a dashboard with many idle viewers wants. Everything it sends
afterwards comes from elsewhere: ``POST /notify``, the producer task of the lifespan, and the
lifecycle hooks.

Protocol, page -> server (JSON; the handler ``on_message``):
    {"type": "subscribe" | "unsubscribe", "topic": t}   t: one of TOPICS, or "metrics"
    {"type": "ping"}: the JSON heartbeat, answered by the manager itself
server -> page: hello, subscribed, unsubscribed, presence, metrics, notification, error, ping, pong.

HTTP:
    POST /notify  {"topic", "message", "level"?, "source"?}  with  Authorization: Bearer <token>
                  -> {"id", "topic", "delivered"}: how many pages of the topic got it
    GET  /api/topics  the topics, with the same token (the page checks its token with it)
    GET  /        the page (examples/dashboard/static/index.html)

Environment: DASHBOARD_TOKEN is the access token of the pages and of /notify (default: the
development token "dashboard-dev", with a warning); DASHBOARD_INTERVAL the producer's period in
seconds (default 1); WSMANAGER_* configure the manager. One process: with several workers on
Redis every worker's producer would publish its own snapshots.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, HTTPException, WebSocket, WebSocketException
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from wsmanager import ConnectEvent, DisconnectEvent, JoinEvent, LeaveEvent, ws_manager
from wsmanager.fastapi import admin_token, router

logger = logging.getLogger("dashboard")

HERE = Path(__file__).resolve().parent
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
#: The topics a page may subscribe to and /notify may post to; "metrics" is the producer's.
TOPICS = ("alerts", "deploys", "general")
METRICS = "metrics"
CHANNELS = frozenset(TOPICS + (METRICS,))
#: How long the presence hooks gather changes before one presence message goes out.
PRESENCE_DELAY = 0.1
#: At most this many names in a presence message (the count is always exact).
PRESENCE_NAMES = 100

DEV_TOKEN = "dashboard-dev"
TOKEN = os.environ.get("DASHBOARD_TOKEN") or DEV_TOKEN
if TOKEN == DEV_TOKEN:
    logger.warning("DASHBOARD_TOKEN is not set: the development token %r opens the dashboard", DEV_TOKEN)

manager = ws_manager


def token_ok(candidate: str | None) -> bool:
    return candidate is not None and hmac.compare_digest(candidate.encode(), TOKEN.encode())


# ------------------------------------------------------------------ presence (lifecycle hooks)
#
# Every connect, disconnect, subscribe and unsubscribe changes what the pages show under
# "online" and beside each topic. The hooks run after the manager changed its registry, so the
# counts they read are already right; they only mark the presence as changed, and one task
# sends one presence message for all the changes of the last PRESENCE_DELAY seconds (a hundred
# pages opening at once cost one message to each, not a hundred).

class Presence:
    def __init__(self) -> None:
        self._pending: asyncio.Task[None] | None = None

    def changed(self) -> None:
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_task(self._publish())

    async def _publish(self) -> None:
        await asyncio.sleep(PRESENCE_DELAY)
        self._pending = None  # a change from here on schedules the next message
        try:
            await manager.broadcast(await presence_message())
        except Exception:  # noqa: BLE001 - the next change publishes again
            logger.exception("presence message failed")

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


async def presence_message() -> dict[str, Any]:
    users = await manager.online_users()
    subscribers = {topic: len(await manager.channel_presence(topic)) for topic in sorted(CHANNELS)}
    return {"type": "presence", "online": len(users), "users": users[:PRESENCE_NAMES],
            "connections": manager.get_stats()["total_connections"], "subscribers": subscribers}


presence = Presence()


async def greet(event: ConnectEvent) -> None:
    """on_connect: the page's hello (the endpoint has returned by now on the native plane)."""
    await manager.send_message(event.connection_id, {
        "type": "hello", "user": event.user_id, "connection_id": event.connection_id,
        "interval": STATE["interval"]})
    presence.changed()


def membership_changed(event: DisconnectEvent | JoinEvent | LeaveEvent) -> None:
    """on_disconnect, on_join, on_leave (plain functions: they only schedule)."""
    presence.changed()


HOOKS = ((manager.on_connect, greet), (manager.on_disconnect, membership_changed),
         (manager.on_join, membership_changed), (manager.on_leave, membership_changed))


# ------------------------------------------------------------------ the producer

#: What the app counts itself (shown in the snapshots).
STATE: dict[str, Any] = {"interval": 1.0, "notifications": 0}


def snapshot(seq: int, lag: float) -> dict[str, Any]:
    stats = manager.get_stats()
    return {
        "type": "metrics", "seq": seq, "ts": round(time.time(), 3), "lag_ms": round(lag * 1000, 1),
        "connections": stats["total_connections"], "users": stats["total_users"],
        "native_connections": stats.get("native_connections", 0),
        "messages_sent": stats["messages_sent"], "messages_received": stats["messages_received"],
        "bytes_sent": stats["bytes_sent"], "bytes_received": stats["bytes_received"],
        "send_failures": stats["send_failures"], "uptime_seconds": stats["uptime_seconds"],
        "notifications": STATE["notifications"],
    }


async def produce(interval: float) -> None:
    """Publishes a snapshot to the "metrics" channel every ``interval`` seconds, on a fixed
    schedule (``lag_ms``: how late this tick ran, a measure of the event loop's health)."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    for seq in itertools.count(1):
        due += interval
        await asyncio.sleep(max(0.0, due - loop.time()))
        lag = max(0.0, loop.time() - due)
        if lag > interval:  # the loop was stalled: skip the missed ticks, not burst them
            due = loop.time()
        try:
            await manager.broadcast_to_channel(METRICS, snapshot(seq, lag))
        except Exception:  # noqa: BLE001 - one failed tick must not end the producer
            logger.exception("metrics snapshot failed")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The manager, the hooks and the producer live as long as the app. The hooks are
    registered here rather than by decorators at import, so that importing this module (a test
    that serves other apps on the same ``ws_manager``) changes nothing until the app starts."""
    interval = float(os.environ.get("DASHBOARD_INTERVAL", "1"))
    if not interval > 0:
        raise ValueError(f"DASHBOARD_INTERVAL must be a number of seconds > 0, not {interval}")
    STATE["interval"] = interval
    for register, hook in HOOKS:
        register(hook)
    try:
        async with manager.lifespan(app):
            producer = asyncio.create_task(produce(STATE["interval"]), name="dashboard-producer")
            try:
                yield
            finally:
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)
    finally:  # after stop(): its disconnect hooks have run
        for _, hook in HOOKS:
            manager.remove_hook(hook)
        presence.cancel()


app = FastAPI(title="wsmanager dashboard example", lifespan=lifespan)
app.include_router(router(manager, admin=admin_token()))


# ------------------------------------------------------------------ the WebSocket endpoint

def viewer(token: str | None = None, name: str | None = None) -> str:
    """The page's credentials, from the query string (?token=...&name=...): its user id.
    A WebSocketException here refuses the handshake (1008) before anything is accepted."""
    if not token_ok(token):
        raise WebSocketException(code=1008, reason="a valid access token is required")
    if name is None or not NAME_RE.match(name):
        raise WebSocketException(code=1008, reason="a name is 1-32 letters, digits, '_', '-' or '.'")
    return name


async def error(connection_id: str, code: str, message: str) -> None:
    await manager.send_message(connection_id, {"type": "error", "error": code, "message": message})


async def on_message(connection_id: str, message: Any) -> None:
    """Every message of every page: subscriptions to topics (channels). Runs per message, with
    no state of its own between messages: what a page is subscribed to is the manager's."""
    if not isinstance(message, dict):
        await error(connection_id, "bad_request", "messages are JSON objects")
        return
    kind, topic = message.get("type"), message.get("topic")
    if kind not in ("subscribe", "unsubscribe"):
        await error(connection_id, "unknown_type", f"unknown message type {kind!r}")
    elif topic not in CHANNELS:
        await error(connection_id, "unknown_topic", f"topics: {', '.join(sorted(CHANNELS))}")
    elif kind == "subscribe":
        manager.join(connection_id, topic)  # presence: the join hook
        await manager.send_message(connection_id, {"type": "subscribed", "topic": topic})
    else:
        manager.leave(connection_id, topic)
        await manager.send_message(connection_id, {"type": "unsubscribed", "topic": topic})


@app.websocket("/ws")
async def dashboard_socket(websocket: WebSocket, user: str = Depends(viewer)) -> None:
    await manager.serve(websocket, uuid.uuid4().hex, user, on_message)
    # nothing after this: the connection is the manager's now (its hello: the connect hook)


# ------------------------------------------------------------------ HTTP

class Notification(BaseModel):
    topic: str
    message: str = Field(min_length=1, max_length=500)
    level: Literal["info", "warning", "critical"] = "info"
    source: str | None = Field(default=None, max_length=40)


bearer = HTTPBearer(auto_error=False)


def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    if credentials is None:
        raise HTTPException(401, "Authorization: Bearer <token> required",
                            headers={"WWW-Authenticate": "Bearer"})
    if not token_ok(credentials.credentials):
        raise HTTPException(403, "wrong token")


@app.post("/notify", dependencies=[Depends(require_token)])
async def notify(body: Notification) -> dict[str, Any]:
    if body.topic not in TOPICS:
        raise HTTPException(404, f"unknown topic {body.topic!r}; topics: {', '.join(TOPICS)}")
    text = body.message.strip()
    if not text:
        raise HTTPException(422, "the message is empty")
    note = {"type": "notification", "id": uuid.uuid4().hex[:12], "topic": body.topic,
            "level": body.level, "message": text, "source": body.source, "ts": round(time.time(), 3)}
    delivered = await manager.broadcast_to_channel(body.topic, note)
    STATE["notifications"] += 1
    return {"id": note["id"], "topic": body.topic, "delivered": delivered}


@app.get("/api/topics", dependencies=[Depends(require_token)])
async def topics() -> dict[str, Any]:
    """What a page needs before it connects (and a check of its token)."""
    return {"topics": list(TOPICS), "metrics": METRICS, "interval": STATE["interval"]}


@app.get("/")
async def index() -> FileResponse:
    return FileResponse(HERE / "static" / "index.html")
