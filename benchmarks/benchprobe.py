"""Measurement routes shared by the benchmark apps (imports nothing from wsmanager).

``install(app, get_stats)`` adds:
- ``GET /health`` -- a trivial answer, probed every 10 ms for event-loop freedom;
- ``GET /bench/gc?collect=0|1`` -- the GC-tracked objects (``len(gc.get_objects())`` plus the
  frozen ones, ``gc.get_freeze_count()``: the native plane freezes the app's at its first
  connection, WSMANAGER_GC_FREEZE; ``types`` counts the unfrozen ones only), RSS, the longest generation-2
  pause seen by ``gc.callbacks`` since start (and since the last reset), and with ``collect=1``
  the duration of one forced full collection;
- ``GET /bench/stats_time?n=N`` -- the app's ``get_stats()`` timed in-process (median, max in ms).
Importing this module raises RLIMIT_NOFILE (10 000+ connections need more than 1 024 fds).
"""
from __future__ import annotations

import gc
import os
import resource
import statistics
import time
from typing import Any, Callable

_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
for _want in (200_000, _hard):
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(_soft, _want), max(_hard, _want)))
        break
    except (ValueError, OSError):
        continue

_gen2 = {"start": 0.0, "max_ms": 0.0, "count": 0, "window_max_ms": 0.0}


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if info.get("generation") != 2:
        return
    if phase == "start":
        _gen2["start"] = time.perf_counter()
    elif _gen2["start"]:
        ms = (time.perf_counter() - _gen2["start"]) * 1000
        _gen2["count"] += 1
        _gen2["max_ms"] = max(_gen2["max_ms"], ms)
        _gen2["window_max_ms"] = max(_gen2["window_max_ms"], ms)
        _gen2["start"] = 0.0


gc.callbacks.append(_on_gc)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def install(app: Any, get_stats: Callable[[], dict]) -> None:
    @app.get("/health")
    async def health() -> dict:
        return {"ok": True}

    @app.get("/bench/gc")
    async def gc_info(collect: int = 0, reset: int = 0, types: int = 0) -> dict:
        out: dict[str, Any] = {}
        if collect:
            t0 = time.perf_counter()
            gc.collect()
            out["forced_collect_ms"] = (time.perf_counter() - t0) * 1000
        # frozen objects (WSMANAGER_GC_FREEZE) are still objects, in no generation: counted apart
        out.update(objects=len(gc.get_objects()) + gc.get_freeze_count(), frozen=gc.get_freeze_count(),
                   rss=rss_bytes(), gen2_count=_gen2["count"],
                   gen2_max_ms=_gen2["max_ms"], gen2_window_max_ms=_gen2["window_max_ms"],
                   gc_counts=list(gc.get_count()), pid=os.getpid())
        if types:
            counts: dict[str, int] = {}
            for o in gc.get_objects():
                name = type(o).__qualname__
                counts[name] = counts.get(name, 0) + 1
            out["types"] = counts
        if reset:
            _gen2["window_max_ms"] = 0.0
        return out

    @app.get("/bench/stats_time")
    async def stats_time(n: int = 20) -> dict:
        times = []
        total = None
        for _ in range(max(1, min(n, 1000))):
            t0 = time.perf_counter()
            s = get_stats()
            times.append((time.perf_counter() - t0) * 1000)
            total = s.get("total_connections")
        return {"median_ms": statistics.median(times), "max_ms": max(times), "n": len(times),
                "total_connections": total}
