"""FastAPI integration: stats, debug and metrics routes, and the JS client.

::

    from fastapi import FastAPI
    from wsmanager import ws_manager
    from wsmanager.fastapi import router, admin_token

    app = FastAPI()
    app.include_router(router(ws_manager, admin=admin_token()))   # token from WSMANAGER_ADMIN_TOKEN

Routes (paths are options of :func:`router`):

=========================================  =========  ===========================================
``GET  /ws/stats``                          open       ``manager.get_stats()`` (seed 003), public view
``GET  /api/debug/websocket-status``        admin      stats, connections, error statistics
``POST /api/debug/cleanup-websockets``      admin      runs ``cleanup_stale_connections()`` (seed 001)
``GET  /metrics``                           open       Prometheus text format
``GET  /wsmanager/wsmanager.js``            open       the browser/node client
=========================================  =========  ===========================================

The debug routes are never open by accident: with ``admin=None`` they answer 403 unless
``WSMANAGER_ADMIN_TOKEN`` is set, and then they want that token as a bearer token.

``/ws/stats`` names no user, channel or connection to a caller ``admin`` does not admit: its
public view drops ``connections_by_user`` and ``channels`` (the counts stay:
``total_users``, ``total_channels``). An admitted caller (every caller with
``protect_stats=True``, where only admins get in) sees all of ``get_stats()``.
"""
from __future__ import annotations

import dataclasses
import hmac
import itertools
import logging
import os
import weakref
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import config as _config

logger = logging.getLogger("wsmanager.fastapi")

STATIC_DIR = Path(__file__).resolve().parent / "static"
CLIENT_JS = STATIC_DIR / "wsmanager.js"

#: The admin token's variable (a row of wsmanager.config.OPTIONS), read on every request.
ADMIN_TOKEN_ENV = _config.option("admin_token").env

# Keys of get_stats() that name users, channels (app-chosen names, often a user's or a pair's)
# or connections: left out of the public /ws/stats. Their counts stay (total_users, ...).
PRIVATE_STATS_KEYS = frozenset({"connections_by_user", "channels"})

# Set in the scope of the admin check /ws/stats runs for every caller: not a refusal to log.
_PROBE = "wsmanager.admin_probe"

__all__ = ["router", "admin_token", "metrics_registry", "ManagerCollector", "CLIENT_JS",
           "PRIVATE_STATS_KEYS"]


# --------------------------------------------------------------------------- admin protection

def admin_token(token: str | None = None, *, env: str = ADMIN_TOKEN_ENV,
                header: str = "X-Admin-Token") -> Callable[..., Any]:
    """A ready-made ``admin`` dependency: a shared secret, as ``Authorization: Bearer <token>``
    or in the ``X-Admin-Token`` header.

    ``token`` defaults to the ``WSMANAGER_ADMIN_TOKEN`` environment variable, read on every
    request (so it can be set after import). No token configured: every caller gets 403.
    Missing credentials: 401 with ``WWW-Authenticate: Bearer``. Wrong token: 403.
    """

    def require_admin_token(request: Request) -> bool:
        expected = token if token is not None else os.environ.get(env, "")
        if not expected:
            if request.scope.get(_PROBE):  # /ws/stats asking, not a debug route refused
                raise HTTPException(status_code=403, detail="forbidden")
            logger.info("debug route %s refused: no admin token configured (%s)",
                        request.url.path, env)
            raise HTTPException(status_code=403, detail=f"debug routes are disabled: set {env}")
        supplied = request.headers.get(header)
        if supplied is None:
            auth = request.headers.get("authorization", "")
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                supplied = value.strip()
        if not supplied:
            raise HTTPException(status_code=401, detail="admin credentials required",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(supplied.encode(), expected.encode()):
            logger.warning("route %s refused: wrong admin token from %s",
                           request.url.path, request.client.host if request.client else "?")
            raise HTTPException(status_code=403, detail="forbidden")
        return True

    return require_admin_token


def _guard(admin: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps the user's dependency: it may raise (401/403 of its choosing) or return ``False``
    (403). Any other return value, including ``None``, lets the request through."""

    async def admin_guard(allowed: Any = Depends(admin)) -> None:
        if allowed is False:
            raise HTTPException(status_code=403, detail="forbidden")

    return admin_guard


# --------------------------------------------------------------------------- JSON helpers

def _timestamp() -> str:
    """ISO 8601 UTC with milliseconds and a Z, as in seed 001's example."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return jsonable_encoder(value)


_INFO_FIELDS = ("connection_id", "user_id", "connected_at", "last_ping", "last_seen", "is_alive",
                "messages_sent", "messages_received", "bytes_sent", "bytes_received",
                "messages_in", "messages_out", "bytes_in", "bytes_out", "state", "native")


def _info_to_dict(connection_id: str, info: Any) -> dict[str, Any]:
    """A ConnectionInfo as JSON, whatever its implementation (pydantic model, dataclass, plain
    object or the registry-backed view)."""
    data: dict[str, Any] = {}
    if info is None:
        pass
    elif hasattr(info, "model_dump"):
        data = dict(info.model_dump())
    elif dataclasses.is_dataclass(info) and not isinstance(info, type):
        data = dataclasses.asdict(info)
    elif isinstance(info, Mapping):
        data = dict(info)
    else:
        for name in _INFO_FIELDS:
            try:
                value = getattr(info, name)
            except Exception:  # a registry-backed view may refuse once the connection is gone
                continue
            if not callable(value):
                data[name] = value
    data.setdefault("connection_id", connection_id)
    return {key: _jsonable(value) for key, value in data.items() if not key.startswith("_")}


def _stats(manager: Any) -> dict[str, Any]:
    return jsonable_encoder(manager.get_stats())


def _public(stats: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in stats.items() if key not in PRIVATE_STATS_KEYS}


def _admin_probe(guard: Any) -> Callable[..., Any]:
    """A dependency that says whether the caller passes the ``admin`` guard, refusing nobody.

    The guard runs through FastAPI as the only dependency of an inner route (built once per
    app), so its own sub-dependencies, ``Security`` scopes and ``app.dependency_overrides``
    work as on the debug routes; an ``HTTPException`` or a validation error anywhere in it,
    or ``False`` from it, means "not an admin" instead of an error response."""
    handlers: "weakref.WeakKeyDictionary[Any, Callable[[Request], Any]]" = weakref.WeakKeyDictionary()

    async def admitted() -> None:
        return None

    async def is_admin(request: Request) -> bool:
        app = request.scope.get("app")
        handler = handlers.get(app) if app is not None else None
        if handler is None:
            provider = app if hasattr(app, "dependency_overrides") else None
            route = APIRoute(request.scope.get("path") or "/", admitted, dependencies=[guard],
                             dependency_overrides_provider=provider, include_in_schema=False)
            handler = route.get_route_handler()
            if app is not None:
                handlers[app] = handler
        probe = Request({**request.scope, _PROBE: True}, request.receive)
        try:
            response = await handler(probe)
        except (StarletteHTTPException, RequestValidationError):
            return False
        return 200 <= response.status_code < 300

    return is_admin


# --------------------------------------------------------------------------- metrics

#: The body of ``GET /metrics`` (501) and the ImportError's message without prometheus_client.
METRICS_MISSING = ("prometheus_client is not installed, so wsmanager has no metrics to serve: "
                   "pip install 'wsmanager[metrics]'")


def _have_prometheus() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class _ManagerMetrics:
    """The per-manager CollectorRegistry and the fan-out latency histogram."""

    def __init__(self, manager: Any) -> None:
        try:
            from prometheus_client import CollectorRegistry
        except ImportError as e:
            raise ImportError(METRICS_MISSING, name=e.name) from e

        self.registry = CollectorRegistry(auto_describe=True)
        self.collector = ManagerCollector(manager)
        self.registry.register(self.collector)


_METRICS: "weakref.WeakKeyDictionary[Any, _ManagerMetrics] | dict[int, _ManagerMetrics]"
_METRICS = weakref.WeakKeyDictionary()
_METRICS_BY_ID: dict[int, tuple[Any, _ManagerMetrics]] = {}


def _metrics_for(manager: Any) -> _ManagerMetrics:
    try:
        found = _METRICS.get(manager)
    except TypeError:  # not weak-referenceable: keep it alive with its metrics
        entry = _METRICS_BY_ID.get(id(manager))
        found = entry[1] if entry and entry[0] is manager else None
        if found is None:
            found = _ManagerMetrics(manager)
            _METRICS_BY_ID[id(manager)] = (manager, found)
        return found
    if found is None:
        found = _ManagerMetrics(manager)
        _METRICS[manager] = found
    return found


class ManagerCollector:
    """A prometheus_client collector reading ``manager.get_stats()`` at scrape time, so the
    counters are the manager's own (no second bookkeeping, nothing lost between scrapes)."""

    def __init__(self, manager: Any, namespace: str = "wsmanager") -> None:
        self.manager = manager
        self.ns = namespace

    def describe(self) -> Iterable[Any]:
        return []  # families depend on the stats: no registration-time collisions to check

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        stats = self.manager.get_stats()
        ns = self.ns

        def number(key: str) -> float | None:
            value = stats.get(key)
            return float(value) if isinstance(value, (int, float)) else None

        gauges = (("total_connections", "connections", "Open WebSocket connections."),
                  ("total_users", "users", "Users with at least one connection."),
                  ("total_channels", "channels", "Channels with at least one member."),
                  ("native_connections", "native_connections",
                   "Connections served by the native engine."))
        for key, name, doc in gauges:
            value = number(key)
            if key == "total_channels" and value is None and isinstance(stats.get("channels"), Mapping):
                value = float(len(stats["channels"]))
            if value is not None:
                yield GaugeMetricFamily(f"{ns}_{name}", doc, value=value)

        counters = (("messages_sent", "Messages sent, one per receiver."),
                    ("messages_received", "Messages received from clients."),
                    ("bytes_sent", "Payload bytes sent, summed over receivers."),
                    ("bytes_received", "Payload bytes received from clients."),
                    ("send_failures", "Sends that failed (peer gone or error)."),
                    ("total_connects", "Connections accepted since start."))
        for key, doc in counters:
            value = number(key)
            if value is not None:
                name = "connects" if key == "total_connects" else key
                yield CounterMetricFamily(f"{ns}_{name}", doc, value=value)

        disconnects = stats.get("disconnects")
        if isinstance(disconnects, Mapping):
            family = CounterMetricFamily(f"{ns}_disconnects", "Disconnects by reason.",
                                         labels=["reason"])
            for reason, count in sorted(disconnects.items()):
                family.add_metric([str(reason)], float(count))
            yield family

        latency = stats.get("fanout_latency")
        if isinstance(latency, Mapping):
            family = HistogramMetricFamily(
                f"{ns}_fanout_latency_seconds",
                "Time from a broadcast/send_to_user/broadcast_to_channel call to its return "
                "(portable plane: every send awaited; native plane: frames queued to the engine).",
                labels=["kind"])
            bounds = latency["buckets"]
            for kind, row in sorted(latency["by_kind"].items()):
                cumulative, buckets = 0, []
                for bound, count in zip(bounds, row["counts"]):
                    cumulative += count
                    buckets.append((repr(float(bound)), float(cumulative)))
                buckets.append(("+Inf", float(row["count"])))
                family.add_metric([kind], buckets, sum_value=float(row["sum"]))
            yield family


def metrics_registry(manager: Any = None) -> Any:
    """The manager's own ``prometheus_client.CollectorRegistry`` (created on first use), e.g.
    to serve it elsewhere with ``generate_latest``."""
    return _metrics_for(_default_manager(manager)).registry


# --------------------------------------------------------------------------- the router

def _default_manager(manager: Any) -> Any:
    if manager is not None:
        return manager
    from . import ws_manager

    return ws_manager


def router(manager: Any = None, *, admin: Callable[..., Any] | None = None,
           stats_path: str | None = "/ws/stats",
           debug_prefix: str | None = "/api/debug",
           metrics_path: str | None = "/metrics",
           static_prefix: str | None = "/wsmanager",
           protect_stats: bool = False,
           protect_metrics: bool = False,
           max_listed_connections: int = 1000,
           tags: list[str] | None = None) -> APIRouter:
    """Routes for one manager; ``app.include_router(router(ws_manager, admin=dep))``.

    ``admin`` is a FastAPI dependency guarding the debug routes (and stats/metrics when
    ``protect_stats``/``protect_metrics``): it raises ``HTTPException(401/403)`` or returns
    ``False`` to refuse; anything else admits. ``None`` means :func:`admin_token()`, i.e.
    ``WSMANAGER_ADMIN_TOKEN`` or 403. Set a path option to ``None`` to leave that route out.

    ``stats_path`` answers everyone (unless ``protect_stats``), but only callers ``admin``
    admits see the users, channels and connections by name: for the others it drops
    ``connections_by_user`` and ``channels`` (:data:`PRIVATE_STATS_KEYS`), the counts stay.
    ``admin`` is evaluated for that without refusing anyone (a refusal just means the public
    view), so it runs on every stats request. With ``protect_stats=True`` only admitted callers
    get in, and they get the full stats.
    """
    manager = _default_manager(manager)
    guard = Depends(_guard(admin if admin is not None else admin_token()))
    caller_is_admin = Depends(_admin_probe(guard))
    api = APIRouter(tags=list(tags) if tags is not None else ["wsmanager"])

    if stats_path and protect_stats:
        @api.get(stats_path, dependencies=[guard], summary="WebSocket connection statistics (admin)")
        async def websocket_stats() -> JSONResponse:
            return JSONResponse(_stats(manager))
    elif stats_path:
        @api.get(stats_path, summary="WebSocket connection statistics (names for admins only)")
        async def websocket_stats_public(full: bool = caller_is_admin) -> JSONResponse:
            stats = _stats(manager)
            return JSONResponse(stats if full else _public(stats))

    if debug_prefix is not None:
        @api.get(f"{debug_prefix}/websocket-status", dependencies=[guard],
                 summary="Connections, stats and error statistics (admin)")
        async def websocket_status() -> JSONResponse:
            stats = _stats(manager)
            view = manager.connection_info
            total = len(view)
            connections = []
            for connection_id, info in itertools.islice(list(view.items()), max_listed_connections):
                entry = _info_to_dict(connection_id, info)
                try:
                    entry["connected"] = bool(manager.is_connected(connection_id))
                    entry["channels"] = list(info.channels)
                except Exception:  # gone between the listing and this call
                    entry["connected"] = False
                    entry["channels"] = []
                connections.append(entry)
            heartbeat = {key: getattr(manager, key) for key in ("ping_interval", "ping_timeout",
                                                                 "max_connections_per_user")
                         if isinstance(getattr(manager, key, None), (int, float))}
            return JSONResponse({
                "status": "ok",
                "timestamp": _timestamp(),
                "current_stats": stats,
                "error_statistics": {
                    "send_failures": stats.get("send_failures", 0),
                    "disconnects": stats.get("disconnects", {}),
                },
                "config": heartbeat,
                "connections": connections,
                "connections_listed": len(connections),
                "connections_total": total,
            })

        @api.post(f"{debug_prefix}/cleanup-websockets", dependencies=[guard],
                  summary="Close stale connections now (admin)")
        async def cleanup_websockets() -> JSONResponse:
            cleaned = await manager.cleanup_stale_connections()
            if cleaned:
                logger.info("Cleaned up %d stale connections", cleaned)
            return JSONResponse({
                "message": "WebSocket cleanup completed",
                "stale_connections_cleaned": cleaned,
                "current_stats": _stats(manager),
                "timestamp": _timestamp(),
            })

    if metrics_path and not _have_prometheus():
        # `pip install wsmanager` has no prometheus_client (the `metrics` extra): every other
        # route works, this one says what to install.
        logger.warning("%s; %s answers 501 until then (metrics_path=None leaves it out)",
                       METRICS_MISSING, metrics_path)

        @api.get(metrics_path, dependencies=[guard] if protect_metrics else [],
                 summary="Prometheus metrics (needs wsmanager[metrics])", response_class=Response)
        async def prometheus_metrics_missing() -> Response:
            return Response(METRICS_MISSING + "\n", status_code=501,
                            media_type="text/plain; charset=utf-8")

    elif metrics_path:
        metrics = _metrics_for(manager)

        @api.get(metrics_path, dependencies=[guard] if protect_metrics else [],
                 summary="Prometheus metrics", response_class=Response)
        def prometheus_metrics() -> Response:
            # A plain def: FastAPI runs it in the thread pool, the scrape never blocks the loop.
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if static_prefix is not None:
        @api.api_route(f"{static_prefix}/wsmanager.js", methods=["GET", "HEAD"],
                       include_in_schema=False)
        async def client_js() -> FileResponse:
            return FileResponse(CLIENT_JS, media_type="text/javascript; charset=utf-8",
                                headers={"Cache-Control": "no-cache"})

    return api
