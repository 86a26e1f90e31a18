"""Scale-out backends.

A backend carries deliveries between processes; each process still fans out locally through its
own registry (and engine). The manager calls the backend; the backend calls back only
``manager._deliver_envelope(envelope)`` for envelopes published by *other* processes.

Envelope (a dict, serialized by the backend):
    ``{"node": <origin node id>, "kind": "all" | "user" | "channel" | "conn" | "disconnect",
       "target": <user id / channel / connection id / None>, "text": str | None,
       "data": bytes | None, "exclude": [connection ids], "code": int, "reason": str}``
The origin process has already delivered locally before publishing, so a backend must not hand
an envelope back to the process that published it: every receiver gets each message once.

Backends never raise into the manager for an infrastructure failure (a lost Redis connection):
they degrade to process-local behaviour, count what they could not do, and say so in
:meth:`Backend.stats`. Only programming errors propagate.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..manager import WebSocketManager

ENVELOPE_KINDS = ("all", "user", "channel", "conn", "disconnect")


class Backend:
    """The interface a scale-out backend implements (the in-process default has none)."""

    async def start(self, manager: "WebSocketManager") -> None:
        """Connect and subscribe; deliveries from other processes go to
        ``manager._deliver_envelope``."""

    async def stop(self) -> None:
        """Unsubscribe, drop this process's entries, close connections."""

    async def reserve(self, connection_id: str, user_id: str | None, max_per_user: int) -> bool:
        """Cluster-wide admission: False when ``user_id`` already has ``max_per_user``
        connections anywhere (0 or None: no limit). Must be atomic across processes."""
        return True

    async def release(self, connection_id: str, user_id: str | None) -> None:
        """Undo :meth:`reserve` when the connection goes away (also forgets its channels)."""

    async def joined(self, connection_id: str, user_id: str | None, channel: str) -> None:
        """``connection_id`` joined ``channel``: record it for cluster-wide presence."""

    async def left(self, connection_id: str, user_id: str | None, channel: str) -> None:
        """Undo :meth:`joined`. Idempotent."""

    async def publish(self, envelope: dict[str, Any]) -> None:
        """Send an envelope to every other process."""

    async def online_users(self) -> set[str]:
        """Users with at least one connection on any live process."""
        return set()

    async def channel_members(self, channel: str) -> set[str]:
        """Users with at least one connection in ``channel`` on any live process."""
        return set()

    def stats(self) -> dict[str, Any]:
        """Backend state for ``get_stats()["backend"]``."""
        return {"type": "local"}

    def cluster_stats(self) -> dict[str, Any]:
        """Aggregated stats of every live process, for ``get_stats(scope="cluster")``.

        Synchronous and cheap: get_stats() is called from route handlers, so a backend keeps a
        snapshot refreshed in the background rather than asking Redis on the caller's time."""
        return {}
