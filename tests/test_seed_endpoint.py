"""The seed's own tests (seed 003, "TESTING") against examples/seed_endpoint, whose only change
from the seed is ``from wsmanager import ws_manager``. The seed's two bodies are kept verbatim for
TestClient, then the same bodies run over real servers (uvicorn, hypercorn, granian, daphne)
with a real client."""
from __future__ import annotations

import contextlib

import pytest
from fastapi.testclient import TestClient
from websockets.sync.client import connect as ws_connect

from examples.seed_endpoint.app import app
from tests.conftest import SERVER_PLANES, SyncClient


@pytest.fixture
def fast_pings(reset_ws_manager):
    reset_ws_manager.configure(ping_interval=0.2, ping_timeout=5)
    return reset_ws_manager


# ---- the seed's tests, verbatim but for the fixture that shortens the ping interval ----------

def test_websocket_connection():
    """Test WebSocket connection."""
    client = TestClient(app)

    with client.websocket_connect("/api/v1/ws") as websocket:
        # Send message
        websocket.send_json({"type": "message", "content": "Hello"})

        # Receive response
        data = websocket.receive_json()
        assert data["type"] == "message"


def test_websocket_ping_pong(fast_pings):
    """Test ping-pong mechanism."""
    client = TestClient(app)

    with client.websocket_connect("/api/v1/ws") as websocket:
        # Wait for ping
        data = websocket.receive_json()
        if data["type"] == "ping":
            # Send pong
            websocket.send_json({"type": "pong"})
        assert data["type"] == "ping"  # added: the seed's test could not fail


# ---- the same bodies on real servers ---------------------------------------------------------

def _connection_body(connect) -> None:
    with connect("/api/v1/ws") as websocket:
        websocket.send_json({"type": "message", "content": "Hello"})
        data = websocket.receive_json()
        assert data == {"type": "message", "content": "Hello"}


def _ping_pong_body(connect) -> None:
    with connect("/api/v1/ws") as websocket:
        data = websocket.receive_json()
        assert data["type"] == "ping"
        websocket.send_json({"type": "pong"})
        websocket.send_json({"type": "message", "content": "still here"})
        assert websocket.receive_until("message")["content"] == "still here"


# Both bodies on every server.
@pytest.mark.parametrize("body, server_plane", [
    (body, plane) for plane in SERVER_PLANES for body in (_connection_body, _ping_pong_body)],
    indirect=["server_plane"])
def test_seed_bodies_on_server(body, server_plane, start_server):
    server = start_server("examples.seed_endpoint.app:app", server_plane,
                          {"WSMANAGER_PING_INTERVAL": "0.2"})

    @contextlib.contextmanager
    def connect(path):
        with ws_connect(server.ws_url(path), open_timeout=10) as ws:
            yield SyncClient(ws, "real")

    body(connect)
    stats = server.get("/api/v1/ws/stats")
    assert stats["total_connections"] == 0


def test_seed_bodies_on_testclient(fast_pings):
    client = TestClient(app)

    @contextlib.contextmanager
    def connect(path):
        with client.websocket_connect(path) as ws:
            yield SyncClient(ws, "testclient")

    _connection_body(connect)
    _ping_pong_body(connect)
    assert client.get("/api/v1/ws/stats").json()["total_connections"] == 0


def test_token_maps_to_user_and_bad_token_is_refused():
    client = TestClient(app)
    with client.websocket_connect("/api/v1/ws?token=tok-alice") as ws:
        ws.send_json({"type": "message", "content": "x"})
        ws.receive_json()
        stats = client.get("/api/v1/ws/stats").json()
        assert stats["connections_by_user"] == {"alice": 1}
    from starlette.websockets import WebSocketDisconnect
    with pytest.raises(WebSocketDisconnect) as err:
        with client.websocket_connect("/api/v1/ws?token=nonsense"):
            pass
    assert err.value.code == 1008
