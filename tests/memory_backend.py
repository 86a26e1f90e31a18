"""A scale-out backend written against the public contract only (``wsmanager.backends``):
several managers of one process share deliveries, the per-user limit, presence and stats
through an in-memory hub. It subclasses ``Backend``, talks to its manager through the
``BackendHost`` it is started with, and knows nothing else of ``WebSocketManager``.
"""
from __future__ import annotations

import asyncio
from typing import Any

from wsmanager.backends import Backend, BackendHost, Envelope


class MemoryHub:
    """What the "cluster" shares: the started backends and every reservation."""

    def __init__(self) -> None:
        self.members: list[MemoryBackend] = []


class MemoryBackend(Backend):
    def __init__(self, hub: MemoryHub) -> None:
        self.hub = hub
        self.host: BackendHost | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conns: dict[str, str | None] = {}           # reserved here: cid -> user
        self.channels: dict[str, dict[str, str | None]] = {}  # channel -> cid -> user
        self.counters = {"published": 0, "received": 0, "delivered": 0, "delivery_errors": 0,
                         "reserve_rejected": 0}

    # lifecycle
    async def start(self, host: BackendHost) -> None:
        self.host = host
        self.loop = asyncio.get_running_loop()
        self.hub.members.append(self)

    async def stop(self) -> None:
        if self in self.hub.members:
            self.hub.members.remove(self)
        self.conns.clear()
        self.channels.clear()

    # admission and presence
    async def reserve(self, connection_id: str, user_id: str | None, max_per_user: int | None
                      ) -> bool:
        if user_id is not None and max_per_user:
            held = sum(1 for member in self.hub.members for user in member.conns.values()
                       if user == user_id)
            if held >= max_per_user:
                self.counters["reserve_rejected"] += 1
                return False
        self.conns[connection_id] = user_id
        return True

    async def release(self, connection_id: str, user_id: str | None) -> None:
        self.conns.pop(connection_id, None)
        for members in self.channels.values():
            members.pop(connection_id, None)

    async def joined(self, connection_id: str, user_id: str | None, channel: str) -> None:
        if connection_id in self.conns:  # a late task after release records nothing
            self.channels.setdefault(channel, {})[connection_id] = user_id

    async def left(self, connection_id: str, user_id: str | None, channel: str) -> None:
        self.channels.get(channel, {}).pop(connection_id, None)

    async def online_users(self) -> set[str]:
        return {u for m in self.hub.members for u in m.conns.values() if u is not None}

    async def channel_members(self, channel: str) -> set[str]:
        return {u for m in self.hub.members for u in m.channels.get(channel, {}).values()
                if u is not None}

    # fan-out
    async def publish(self, envelope: Envelope) -> None:
        self.counters["published"] += 1
        for member in list(self.hub.members):
            if member is not self:
                await member._receive(dict(envelope))

    async def _receive(self, envelope: Envelope) -> None:
        host, loop = self.host, self.loop
        if host is None or loop is None or envelope.get("node") == host.node_id:
            return  # never back to the process that published it
        self.counters["received"] += 1
        try:
            if loop is asyncio.get_running_loop():
                await host.deliver(envelope)
            else:  # the host is for its own loop: hop there
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(host.deliver(envelope), loop))
            self.counters["delivered"] += 1
        except Exception:  # noqa: BLE001 - one bad delivery must not stop the bus
            self.counters["delivery_errors"] += 1

    # stats: answered from the hub's table, never by asking other hosts
    def stats(self) -> dict[str, Any]:
        return {"type": "memory", "node": self.host.node_id if self.host else None,
                **self.counters}

    def cluster_stats(self) -> dict[str, Any]:
        by_user: dict[str, int] = {}
        total = 0
        for member in self.hub.members:
            for user in member.conns.values():
                total += 1
                if user is not None:
                    by_user[user] = by_user.get(user, 0) + 1
        return {"scope": "cluster", "nodes": len(self.hub.members), "total_connections": total,
                "total_users": len(by_user), "connections_by_user": by_user}
