"""wsmanager.fastapi.router under Starlette's TestClient: auth on the debug routes, the JSON shapes
of seeds 001/003, Prometheus text that prometheus_client's own parser reads, the JS client."""
from __future__ import annotations

import re
import uuid

import pytest
from fastapi import FastAPI, Header, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from wsmanager import WebSocketManager
from wsmanager.fastapi import admin_token, metrics_registry, router

REASONS = {"normal", "abrupt", "stale", "limit", "slow_consumer", "protocol_error", "shutdown"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ADMIN = {"X-Test-Admin": "let-me-in"}


def require_admin(x_test_admin: str | None = Header(default=None)) -> bool:
    if x_test_admin is None:
        raise HTTPException(401, "who are you?")
    if x_test_admin != "let-me-in":
        raise HTTPException(403, "no")
    return True


def make_app(manager: WebSocketManager, **options) -> FastAPI:
    """The seed's endpoint (003), one manager, the kit's router."""
    app = FastAPI()
    options.setdefault("admin", require_admin)
    app.include_router(router(manager, **options))

    @app.websocket("/ws")
    async def endpoint(websocket: WebSocket, user_id: str = "anonymous"):
        connection_id = str(uuid.uuid4())
        if not await manager.connect(websocket, connection_id, user_id):
            return
        try:
            while True:
                data = await websocket.receive_json()
                if data.get("type") == "broadcast":
                    await manager.broadcast({"type": "broadcast", "content": data["content"]},
                                            exclude={connection_id})
                elif data.get("type") == "join":
                    manager.join(connection_id, data["channel"])
                    await manager.send_message(connection_id, {"type": "joined"})
        except WebSocketDisconnect:
            pass
        finally:
            await manager.disconnect(connection_id)

    return app


@pytest.fixture
def manager():
    return WebSocketManager()


@pytest.fixture
def client(manager):
    with TestClient(make_app(manager)) as client:
        yield client


def metric_families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict, family: str, name: str | None = None, **labels) -> float:
    for s in families[family].samples:
        if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((family, name, labels))


def test_stats_has_the_seed_keys_and_counts_connections(client):
    empty = client.get("/ws/stats", headers=ADMIN).json()  # names of users: admins only
    assert {"total_connections", "total_users", "connections_by_user"} <= set(empty)
    assert {"total_channels", "channels", "messages_sent", "messages_received", "bytes_sent",
            "bytes_received", "send_failures", "disconnects"} <= set(empty)
    assert empty["total_connections"] == 0
    with client.websocket_connect("/ws?user_id=u1"), client.websocket_connect("/ws?user_id=u1"), \
            client.websocket_connect("/ws?user_id=u2") as ws:
        ws.send_json({"type": "join", "channel": "room"})
        assert ws.receive_json() == {"type": "joined"}
        stats = client.get("/ws/stats", headers=ADMIN).json()
        assert stats["total_connections"] == 3
        assert stats["total_users"] == 2
        assert stats["connections_by_user"] == {"u1": 2, "u2": 1}
        assert stats["channels"] == {"room": 1}
        assert stats["total_channels"] == 1
    assert set(client.get("/ws/stats").json()["disconnects"]) >= REASONS


@pytest.mark.parametrize("method,path", [("GET", "/api/debug/websocket-status"),
                                         ("POST", "/api/debug/cleanup-websockets")])
def test_debug_routes_need_the_admin_dependency(client, method, path):
    assert client.request(method, path).status_code == 401
    assert client.request(method, path, headers={"X-Test-Admin": "guess"}).status_code == 403
    assert client.request(method, path, headers=ADMIN).status_code == 200


def test_debug_routes_refuse_when_the_dependency_returns_false(manager):
    with TestClient(make_app(manager, admin=lambda: False)) as client:
        assert client.get("/api/debug/websocket-status").status_code == 403
        assert client.post("/api/debug/cleanup-websockets").status_code == 403
        assert client.get("/ws/stats").status_code == 200  # stats stay open by default


def test_websocket_status_shape(client):
    with client.websocket_connect("/ws?user_id=alice"), client.websocket_connect("/ws?user_id=bob") as ws:
        ws.send_json({"type": "join", "channel": "room"})
        assert ws.receive_json() == {"type": "joined"}
        body = client.get("/api/debug/websocket-status", headers=ADMIN).json()
    assert body["status"] == "ok"
    assert TIMESTAMP.match(body["timestamp"])
    assert body["current_stats"]["total_connections"] == 2
    assert body["error_statistics"]["send_failures"] == 0
    assert set(body["error_statistics"]["disconnects"]) >= REASONS
    assert body["connections_total"] == body["connections_listed"] == 2
    users = sorted(c["user_id"] for c in body["connections"])
    assert users == ["alice", "bob"]
    for c in body["connections"]:
        assert {"connection_id", "user_id", "connected_at", "last_ping", "is_alive",
                "connected"} <= set(c)
        assert c["connected"] is True
        assert c["channels"] == (["room"] if c["user_id"] == "bob" else [])
        uuid.UUID(c["connection_id"])


def test_cleanup_shape_is_seed_001s(client):
    with client.websocket_connect("/ws?user_id=alice"):
        body = client.post("/api/debug/cleanup-websockets", headers=ADMIN).json()
    assert set(body) == {"message", "stale_connections_cleaned", "current_stats", "timestamp"}
    assert body["message"] == "WebSocket cleanup completed"
    assert body["stale_connections_cleaned"] == 0  # a live, answering connection is not stale
    assert body["current_stats"]["total_connections"] == 1
    assert TIMESTAMP.match(body["timestamp"])


def test_default_admin_is_the_token_from_the_environment(manager, monkeypatch):
    monkeypatch.delenv("WSMANAGER_ADMIN_TOKEN", raising=False)
    with TestClient(make_app(manager, admin=None)) as client:
        path = "/api/debug/websocket-status"
        assert client.get(path).status_code == 403  # no token configured: closed to everyone
        monkeypatch.setenv("WSMANAGER_ADMIN_TOKEN", "s3cret")
        denied = client.get(path)
        assert denied.status_code == 401
        assert denied.headers["www-authenticate"] == "Bearer"
        assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 403
        assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get(path, headers={"X-Admin-Token": "s3cret"}).status_code == 200


def test_admin_token_with_an_explicit_secret(manager):
    with TestClient(make_app(manager, admin=admin_token("abc"))) as client:
        assert client.post("/api/debug/cleanup-websockets").status_code == 401
        assert client.post("/api/debug/cleanup-websockets",
                           headers={"Authorization": "Bearer abc"}).status_code == 200


def test_metrics_parse_and_match_the_stats(client):
    with client.websocket_connect("/ws?user_id=a") as a, client.websocket_connect("/ws?user_id=b") as b:
        a.send_json({"type": "join", "channel": "c1"})
        assert a.receive_json() == {"type": "joined"}
        a.send_json({"type": "broadcast", "content": "hi"})
        assert b.receive_json() == {"type": "broadcast", "content": "hi"}
        response = client.get("/metrics")
        stats = client.get("/ws/stats").json()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = metric_families(response.text)
    assert families["wsmanager_connections"].type == "gauge"
    assert sample(families, "wsmanager_connections") == stats["total_connections"] == 2
    assert sample(families, "wsmanager_users") == 2
    assert sample(families, "wsmanager_channels") == 1
    for counter in ("messages_sent", "messages_received", "bytes_sent", "bytes_received",
                    "send_failures"):
        family = families[f"wsmanager_{counter}"]
        assert family.type == "counter"
        assert sample(families, f"wsmanager_{counter}", f"wsmanager_{counter}_total") == stats[counter]
    assert sample(families, "wsmanager_messages_sent", "wsmanager_messages_sent_total") >= 2
    reasons = {s.labels["reason"] for s in families["wsmanager_disconnects"].samples
               if s.name == "wsmanager_disconnects_total"}
    assert reasons >= REASONS
    latency = families["wsmanager_fanout_latency_seconds"]
    assert latency.type == "histogram"
    assert sample(families, "wsmanager_fanout_latency_seconds",
                  "wsmanager_fanout_latency_seconds_count", kind="all") >= 1
    assert sample(families, "wsmanager_fanout_latency_seconds",
                  "wsmanager_fanout_latency_seconds_bucket", kind="all", le="+Inf") >= 1


def test_each_manager_has_its_own_registry():
    m1, m2 = WebSocketManager(), WebSocketManager()
    assert metrics_registry(m1) is not metrics_registry(m2)
    assert metrics_registry(m1) is metrics_registry(m1)
    with TestClient(make_app(m1)) as c1, TestClient(make_app(m2)) as c2, \
            TestClient(make_app(m1)) as c1_again:
        with c1.websocket_connect("/ws?user_id=x"):
            assert sample(metric_families(c1.get("/metrics").text), "wsmanager_connections") == 1
            assert sample(metric_families(c1_again.get("/metrics").text), "wsmanager_connections") == 1
            assert sample(metric_families(c2.get("/metrics").text), "wsmanager_connections") == 0


def test_the_js_client_is_served(client):
    response = client.get("/wsmanager/wsmanager.js")
    assert response.status_code == 200
    assert "javascript" in response.headers["content-type"]
    assert "WSManagerClient" in response.text


def test_paths_and_protection_are_options(manager):
    app = make_app(manager, stats_path="/internal/ws-stats", debug_prefix="/ops",
                   metrics_path="/internal/metrics", static_prefix=None, protect_metrics=True)
    with TestClient(app) as client:
        assert client.get("/ws/stats").status_code == 404
        assert client.get("/internal/ws-stats").status_code == 200
        assert client.get("/ops/websocket-status", headers=ADMIN).status_code == 200
        assert client.get("/api/debug/websocket-status", headers=ADMIN).status_code == 404
        assert client.get("/internal/metrics").status_code == 401
        assert client.get("/internal/metrics", headers=ADMIN).status_code == 200
        assert client.get("/wsmanager/wsmanager.js").status_code == 404
