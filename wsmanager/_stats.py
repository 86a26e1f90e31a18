"""``get_stats()``: the local statistics dict, and the fan-out latency histogram behind it.

Counters live in the C registry (``Registry.stats()``); this module only names and arranges
them, adds what Python alone knows (uptime, node id, the backend's own stats, the native
plane's handshake counters) and keeps the one histogram measured in Python: how long each
fan-out took, per kind.
"""
from __future__ import annotations

import bisect
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .manager import WebSocketManager

#: Upper bounds (seconds) of the fan-out latency histogram in ``get_stats()["fanout_latency"]``:
#: from microseconds (native plane: frames queued) to seconds (portable plane: a slow peer
#: awaited up to send_timeout).
FANOUT_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                  0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FANOUT_KINDS = ("all", "user", "channel")


class _FanoutLatency:
    """One histogram row per fan-out kind; the last cell counts what exceeds every bucket."""

    __slots__ = ("counts", "sums")

    def __init__(self) -> None:
        self.counts = {k: [0] * (len(FANOUT_BUCKETS) + 1) for k in _FANOUT_KINDS}
        self.sums = dict.fromkeys(_FANOUT_KINDS, 0.0)

    def observe(self, kind: str, started: float) -> None:
        """One fan-out's duration into the histogram: one bisect per call, not per receiver."""
        seconds = time.perf_counter() - started
        self.counts[kind][bisect.bisect_left(FANOUT_BUCKETS, seconds)] += 1
        self.sums[kind] += seconds

    def snapshot(self) -> dict[str, Any]:
        return {
            "buckets": list(FANOUT_BUCKETS),
            "by_kind": {k: {"counts": list(self.counts[k]), "sum": self.sums[k],
                            "count": sum(self.counts[k])} for k in _FANOUT_KINDS},
        }


def local_stats(manager: "WebSocketManager") -> dict[str, Any]:
    """``manager.get_stats()`` for this process (the seed's keys first)."""
    registry = manager._registry
    s = registry.stats()
    stats = {
        "total_connections": s["total_connections"],
        "total_users": s["total_users"],
        "connections_by_user": s["connections_by_user"],
        "open_connections": s["open_connections"],
        "total_channels": s["total_channels"],
        "channels": registry.channels() if s["total_channels"] else {},
        "messages_sent": s["messages_sent"],
        "messages_received": s["messages_received"],
        "bytes_sent": s["bytes_sent"],
        "bytes_received": s["bytes_received"],
        "send_failures": s["send_failures"],
        "total_connects": s["total_connects"],
        "disconnects": s["disconnects"],
        "native_connections": s["native_connections"],
        "uptime_seconds": round(time.time() - manager._started_at, 3),
        "node_id": manager.node_id,
        "backend": manager._backend.stats(),
        "fanout_latency": manager._latency.snapshot(),
        "hooks": manager._hooks.stats(),
    }
    native = sys.modules.get(__package__ + ".uvicorn")  # the native plane, when loaded
    if native is not None and hasattr(native, "handshake_stats"):
        stats["handshakes"] = native.handshake_stats()  # this process, before the 101
    return stats
