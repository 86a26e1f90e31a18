"""The app of tests/test_hooks.py's real servers: tests/redis_app.py's (the seed's endpoint with
tests/ws_commands.py's commands, acked, on the module-level ``ws_manager``, stopped by its
lifespan), with one hook per lifecycle event.

Each hook appends one JSON line to the file ``HOOKS_EVENTS`` names: the event's fields, this
node's id, and what the hook found when it ran (``seen``: is the connection still registered,
the connection count, local channel members, cluster presence), so a test can check what a hook
receives and when it runs -- also for the events of a shutdown, after the server is gone.
Connections of user ``boom`` make a connect hook and a disconnect hook raise (the hooks after
them must still run). With ``WSMANAGER_REDIS_URL`` set, the nodes share one Redis.
"""
from __future__ import annotations

import dataclasses
import json
import os

from tests.redis_app import app  # noqa: F401 - the app served; its lifespan stop()s the manager
from wsmanager import ConnectEvent, DisconnectEvent, JoinEvent, LeaveEvent, ws_manager

EVENTS = os.environ["HOOKS_EVENTS"]


def record(hook: str, event: object, **seen: object) -> None:
    line = {"hook": hook, "node": ws_manager.node_id, **dataclasses.asdict(event), "seen": seen}
    with open(EVENTS, "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


def _registered(cid: str) -> bool:
    return cid in ws_manager.active_connections


@ws_manager.on_connect
def boom_on_connect(event: ConnectEvent) -> None:
    if event.user_id == "boom":
        raise RuntimeError("connect hook-boom")


@ws_manager.on_connect
def connected(event: ConnectEvent) -> None:
    record("connect", event, registered=_registered(event.connection_id),
           total=ws_manager.get_stats()["total_connections"])


@ws_manager.on_disconnect
async def boom_on_disconnect(event: DisconnectEvent) -> None:
    if event.user_id == "boom":
        raise RuntimeError("disconnect hook-boom")


@ws_manager.on_disconnect
async def disconnected(event: DisconnectEvent) -> None:
    members = {ch: event.connection_id in ws_manager.channel_members(ch) for ch in event.channels}
    record("disconnect", event, registered=_registered(event.connection_id),
           total=ws_manager.get_stats()["total_connections"], members=members,
           online=await ws_manager.online_users(),
           presence={ch: await ws_manager.channel_presence(ch) for ch in event.channels})


@ws_manager.on_join
async def joined(event: JoinEvent) -> None:
    record("join", event, presence=await ws_manager.channel_presence(event.channel),
           member=event.connection_id in ws_manager.channel_members(event.channel))


@ws_manager.on_leave
async def left(event: LeaveEvent) -> None:
    record("leave", event, presence=await ws_manager.channel_presence(event.channel),
           member=event.connection_id in ws_manager.channel_members(event.channel))
