"""The app of tests/test_hostile_detached.py (not a test module): detached connections
(``serve()``) and lifecycle hooks under attack, served by ``python -m wsmanager`` on 127.0.0.1.

One manager of its own, configured by ``WSMANAGER_*`` variables; ``SLOW_BACKEND=<seconds>``
gives it a backend that spans processes (as Redis does, so joins, leaves and releases go
through the manager's per-connection lanes) whose every call takes that long, and
``HOOK_DELAY=<seconds>`` registers one hook per lifecycle event that sleeps that long.

* ``/d/{mode}?cid=``  ``serve(websocket, cid, None, HANDLERS[mode], raw=mode == "raw")``:
  ``hang``  async, waits for ``POST /release`` (a handler that never returns until then;
            after it, returns at once);
  ``echo``  async, sends back what it got (a dict as JSON, bytes as bytes), never suspends;
  ``boom``  raises on every message;
  ``cmd``   sync: ``{"j": ch}`` joins, ``{"l": ch}`` leaves (a peer's channel commands).
* ``GET /introspect``  what Python holds: the manager's records and tasks, the dispatcher's
  routing and detached groups, handler runs, lanes and hooks, the backlogs of connections the
  manager already dropped, the slow backend's presence, the engine's counters.
* ``POST /join?cid=&channel=``  ``join()`` from a plain ``def`` route (FastAPI's thread pool).
* ``POST /release``, ``GET /health``.
"""
from __future__ import annotations

import asyncio
import gc
import os
import threading
from typing import Any

from fastapi import FastAPI, WebSocket

from wsmanager import WebSocketManager
from wsmanager.backends import Backend


class SlowBackend(Backend):
    """Presence that takes ``delay`` seconds per call, recorded per channel (cids)."""

    spans_processes = True

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.members: dict[str, set[str]] = {}
        self.calls = 0

    async def _slow(self) -> None:
        self.calls += 1
        await asyncio.sleep(self.delay)

    async def joined(self, connection_id: str, user_id: str | None, channel: str) -> None:
        await self._slow()
        self.members.setdefault(channel, set()).add(connection_id)

    async def left(self, connection_id: str, user_id: str | None, channel: str) -> None:
        await self._slow()
        self._forget(channel, connection_id)

    async def release(self, connection_id: str, user_id: str | None) -> None:
        await self._slow()
        for channel in list(self.members):
            self._forget(channel, connection_id)

    def _forget(self, channel: str, cid: str) -> None:
        members = self.members.get(channel)
        if members is not None:
            members.discard(cid)
            if not members:
                del self.members[channel]


_delay = os.environ.get("SLOW_BACKEND")
backend = SlowBackend(float(_delay)) if _delay else None
manager = WebSocketManager.from_env(**({"backend": backend} if backend else {}))
app = FastAPI(lifespan=manager.lifespan)

_release = asyncio.Event()
HOOK_CALLS = {"n": 0}

if os.environ.get("HOOK_DELAY"):
    _hook_delay = float(os.environ["HOOK_DELAY"])

    async def _slow_hook(event: Any) -> None:
        HOOK_CALLS["n"] += 1
        await asyncio.sleep(_hook_delay)

    for _register in (manager.on_connect, manager.on_disconnect, manager.on_join, manager.on_leave):
        _register(_slow_hook)


async def on_hang(cid: str, message: Any) -> None:
    await _release.wait()


async def on_echo(cid: str, message: Any) -> None:
    await manager.send_message(cid, message)


def on_boom(cid: str, message: Any) -> None:
    raise RuntimeError("handler-boom")


def on_cmd(cid: str, message: Any) -> None:
    if type(message) is dict:
        if "j" in message:
            manager.join(cid, message["j"])
        elif "l" in message:
            manager.leave(cid, message["l"])


HANDLERS = {"hang": on_hang, "echo": on_echo, "boom": on_boom, "cmd": on_cmd, "raw": on_echo}
_next = {"n": 0}


@app.websocket("/d/{mode}")
async def detached(websocket: WebSocket, mode: str) -> None:
    cid = websocket.query_params.get("cid")
    if not cid:
        _next["n"] += 1
        cid = f"c{_next['n']}"
    await manager.serve(websocket, cid, websocket.query_params.get("user"), HANDLERS[mode],
                        raw=mode == "raw")


@app.get("/health")
async def health() -> dict:
    return {"ok": True}


@app.post("/release")
async def release() -> dict:
    _release.set()  # for good: every later message of a hang handler is handled at once
    return {}


@app.post("/join")
def join_from_a_thread(cid: str, channel: str) -> dict:
    assert threading.current_thread() is not threading.main_thread()
    return {"changed": manager.join(cid, channel)}


@app.get("/introspect")
async def introspect() -> dict:
    from wsmanager import _detached
    from wsmanager.manager import _Detached
    from wsmanager.uvicorn import _dispatcher_of_process as d, get_engine

    await asyncio.sleep(0)
    records = [o for o in gc.get_objects() if type(o) is _Detached]
    gone = [c for c in records if manager._conns.get(c.handle) is not c]
    engine = get_engine().stats()
    return {
        "conns": len(manager._conns),
        "registry": len(manager._registry),
        "records": len(records),
        "protocols": len(d.protocols) if d else 0,
        "group_handles": sum(len(g.handles) for g in d.groups.values()) if d else 0,
        "groups_in_connections": sum(g in g.connections for g in d.groups.values()) if d else 0,
        "running": len(_detached._running),
        "tasks": len(manager._tasks),
        "all_tasks": len(asyncio.all_tasks()),
        "lanes": len(manager._announcements._lanes),
        "lane_items": manager._announcements.pending_total(),
        "hooks": manager.get_stats()["hooks"],
        "hook_calls": HOOK_CALLS["n"],
        "backlog_items": sum(len(c.backlog or ()) for c in records),
        "gone_backlog_items": sum(len(c.backlog or ()) for c in gone),
        "gone_backlog_bytes": sum(n for c in gone for _, n in (c.backlog or ())),
        "presence": {ch: sorted(m) for ch, m in backend.members.items()} if backend else {},
        "backend_calls": backend.calls if backend else 0,
        "disconnects": {k: v for k, v in manager.get_stats()["disconnects"].items() if v},
        "engine": {k: engine.get(k) for k in ("inbound_bytes", "read_pauses", "connections",
                                                "messages_in")},
    }
