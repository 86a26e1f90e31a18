"""What a node's heartbeat says about it, and the cluster view summed from every live node.

A summary is JSON: ``{"node", "pid", "host", "ts", "stats"}`` where ``stats`` is the node's
``get_stats()`` without its ``"backend"`` entry. The cluster view (``get_stats(scope="cluster")``)
adds up every number of the live nodes' stats (recursively into dicts: ``connections_by_user``,
``disconnects``, ...), takes the largest ``uptime_seconds``, counts a user once however many
nodes hold them, and lists the nodes in ``per_node``. Pure functions: no I/O, no clock of their
own.
"""
from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from typing import Any

__all__ = ["encode_summary", "merge_summaries"]

#: Keys whose cluster value is the largest of the nodes', not their sum.
_LARGEST = frozenset({"uptime_seconds"})
#: Keys every cluster view has, zero when no node is live.
_ALWAYS = ("total_connections", "total_users")


def encode_summary(node_id: str, stats: Mapping[str, Any], now: float) -> bytes:
    """The heartbeat payload of ``node_id`` whose ``get_stats()`` is ``stats`` at ``now``."""
    shared = {key: value for key, value in stats.items() if key != "backend"}
    return json.dumps({"node": node_id, "pid": os.getpid(), "host": socket.gethostname(),
                       "ts": now, "stats": shared},
                      separators=(",", ":"), default=str).encode()


def _add_numbers(into: dict[str, Any], stats: Mapping[str, Any]) -> None:
    """Add the numbers of ``stats`` (and of its dicts, recursively) into ``into``."""
    for key, value in stats.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            if key in _LARGEST:
                into[key] = max(into.get(key, value), value)
            else:
                into[key] = into.get(key, 0) + value
        elif isinstance(value, dict):
            inner = into.get(key)
            if not isinstance(inner, dict):
                inner = into[key] = {}
            _add_numbers(inner, value)


def merge_summaries(summaries: Mapping[str, bytes], now: float) -> dict[str, Any]:
    """The cluster view of the live nodes' raw summaries (node id -> heartbeat payload), as seen
    at ``now``; a summary that is not JSON is left out."""
    merged: dict[str, Any] = {}
    per_node: dict[str, Any] = {}
    for node, raw in summaries.items():
        try:
            summary = json.loads(raw)
        except ValueError:
            continue
        stats = summary.get("stats") or {}
        _add_numbers(merged, stats)
        per_node[node] = {"pid": summary.get("pid"), "host": summary.get("host"),
                          "age": round(max(0.0, now - summary.get("ts", now)), 3),
                          "total_connections": stats.get("total_connections", 0),
                          "total_users": stats.get("total_users", 0)}
    for key in _ALWAYS:
        merged.setdefault(key, 0)
    by_user = merged.get("connections_by_user")
    if isinstance(by_user, dict):
        merged["total_users"] = sum(1 for count in by_user.values() if count)
    merged["nodes"] = len(per_node)
    merged["per_node"] = per_node
    return merged
